"""Stages `sfo` and `control`: Subject Fidelity Optimization on CDNS pairs (METHOD.md section 4), and the
SFT-additional control it is always compared with.

Reads params `sfo` and `loss`, `data/train`, `data/negatives/manifest.parquet` and `models/sft`. The policy is
the SFT base plus a trainable rank-`sfo.lora_rank` LoRA; the reference is the same model with that LoRA
switched off (no second copy of the weights). Each step takes `sfo.pairs_per_step` pairs (x+, x-) with their
original conditions, one t (`sfo.timesteps`) and one eps per pair shared by its two images, runs positives and
negatives through the policy as one batch and through the reference as one no-grad batch, and minimises
L_SFO (flow.sfo_loss). Writes the adapter to `models/sfo` and the diagnostics to `reports/sfo/train.csv`.

`--control` (the DVC stage `control`) trains the same LoRA with the same optimiser, steps and data order, but with
the SFT stage's loss on the positives alone (the paper's "SFT-additional" row): the flow-matching error with
the SFT's timestep distribution (`sft.timestep_mu`, `sft.timestep_sigma`), on the first `cdns.num_triplets`
training targets, the triplets CDNS made its negatives for. It writes `models/control` and
`reports/control/train.csv`, and needs no negatives, so it is shared by every experiment that changes only CDNS.

Ablations: `sfo.pairs` picks the pairs (made by `cdns`, see there); `sft_additional` makes this stage train the
control's objective; `sfo.direct` trains all SFT weights against a frozen copy and writes a whole model
directory to `models/sfo` instead of an adapter.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import shutil

import numpy as np
import torch

from .. import checkpoint, config, distributed, flow, manifest, stage
from ..model import (
    Conditioning,
    SubjectFlux,
    add_lora,
    encode_all,
    fill_prompt_cache,
    reference_of,
    save_lora,
    speed_options,
)

DATA, NEGATIVES, BASE = "data/train", "data/negatives/manifest.parquet", "models/sft"
ADAPTER = "sfo"
OUTPUTS = {  # run -> (model directory, curve, work directory)
    "sfo": ("models/sfo", "reports/sfo/train.csv", "checkpoints/sfo"),
    "control": ("models/control", "reports/control/train.csv", "checkpoints/control")}
T_BINS = 4


def images(table, column: str, path: str) -> torch.Tensor:
    """A PNG column as float images (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(manifest.to_float(manifest.decode_column(table, column, path)))


def load_pairs():
    """Positives, negatives, references and prompts of every triplet that has a negative (the positive: the
    triplet's target, or the manifest's `pos_png` where it has one: judge DPO)."""
    negatives = manifest.read(NEGATIVES, manifest.NEGATIVE_SCHEMA)
    train = manifest.triplets_of(negatives, manifest.read(DATA), NEGATIVES, DATA)
    pos = torch.from_numpy(manifest.to_float(manifest.positives(negatives, train, NEGATIVES, DATA)))
    return pos, images(negatives, "neg_png", NEGATIVES), images(train, "ref_png", DATA), \
        train.column("prompt").to_pylist()


def load_positives(n: int):
    """The SFT-additional data: targets, references and prompts of the first `n` training triplets (0: all)."""
    train = manifest.read(DATA)
    train = train.slice(0, train.num_rows if n == 0 else min(n, train.num_rows))
    return images(train, "target_png", DATA), None, images(train, "ref_png", DATA), train.column("prompt").to_pylist()


def sample_t(cfg: config.Sfo, n: int, g: torch.Generator) -> torch.Tensor:
    if cfg.timesteps == "uniform":
        return flow.uniform(n, generator=g)
    return flow.logit_normal(n, cfg.timestep_mu, cfg.timestep_sigma, generator=g)


def reference_errors(model: SubjectFlux, x_t, t, c, x, eps,
                     reference_model: SubjectFlux | None = None) -> torch.Tensor:
    """The reference's per-sample errors, no grad: the SFT base, i.e. `model` inside `reference_of(model)` (the SFO
    adapter switched off, the SFT LoRA kept), or a separate frozen `reference_model` (`sfo.direct`)."""
    ref = reference_model if reference_model is not None else model
    with torch.no_grad(), (contextlib.nullcontext() if reference_model is not None else reference_of(model)):
        return flow.per_sample_error(ref(x_t, t, c), x, eps)


def sfo_step(model: SubjectFlux, c: Conditioning, x_pos, x_neg, t, eps, loss_cfg: config.Loss, policy=None,
             **ref_kw):
    """One SFO loss evaluation: the reference on [x+; x-] as one no-grad batch, then the policy likewise (the
    reference first: the policy's pass reuses its transient memory). `policy` is what computes the policy's
    forward (the DDP-wrapped model under accelerate; the model itself by default). With `loss.sft_weight` > 0
    the positives' mean error is added (an SFT anchor; 0 is the paper's loss)."""
    x = torch.cat([x_pos, x_neg])
    eps2, t2, c2 = torch.cat([eps, eps]), torch.cat([t, t]), Conditioning.cat([c, c])
    x_t = flow.interpolate(x, eps2, t2)
    ref_pos, ref_neg = reference_errors(model, x_t, t2, c2, x, eps2, **ref_kw).chunk(2)
    err_pos, err_neg = flow.per_sample_error((policy or model)(x_t, t2, c2), x, eps2).chunk(2)
    loss, stats = flow.sfo_loss(err_pos, err_neg, ref_pos, ref_neg, loss_cfg.beta)
    if loss_cfg.sft_weight:
        stats["sft_term"] = err_pos.mean().detach()
        loss = loss + loss_cfg.sft_weight * err_pos.mean()
        stats["loss"] = loss.detach()
    return loss, stats


def sft_additional_step(model: SubjectFlux, c: Conditioning, x_pos, t, eps, policy=None, **ref_kw):
    """The SFT-additional control: the flow-matching error of the policy on the positives alone, with the
    reference's error on the same noisy inputs beside it (a diagnostic, no grad)."""
    x_t = flow.interpolate(x_pos, eps, t)
    ref_pos = reference_errors(model, x_t, t, c, x_pos, eps, **ref_kw)
    err_pos = flow.per_sample_error((policy or model)(x_t, t, c), x_pos, eps)
    loss = err_pos.mean()
    return loss, {"loss": loss.detach(), "pair_loss": err_pos.detach(), "err_pos": loss.detach(),
                  "ref_err_pos": ref_pos.mean()}


def sfo_backward(model: SubjectFlux, c: Conditioning, x_pos, x_neg, t, eps, loss_cfg: config.Loss,
                 micro_batch: int = 0, objective: str = "sfo", **kw) -> dict[str, torch.Tensor]:
    """Forward and backward of `sfo_step` (or, with `objective="sft"`, of `sft_additional_step` on the positives alone)
    over P pairs, `micro_batch` pairs at a time (0: all at once). The loss
    is a mean of per-pair terms, so the chunks' gradients, each scaled by its share of the pairs, add up to the
    full batch's (up to float summation order): memory of `micro_batch` pairs, the update of P. Returns the
    diagnostics of all P pairs."""
    n = x_pos.shape[0]
    size = micro_batch or n
    parts = []
    for start in range(0, n, size):
        rows = slice(start, start + size)
        if objective == "sft":
            loss, stats = sft_additional_step(model, c.select(rows), x_pos[rows], t[rows], eps[rows], **kw)
        else:
            loss, stats = sfo_step(model, c.select(rows), x_pos[rows], x_neg[rows], t[rows], eps[rows], loss_cfg, **kw)
        share = x_pos[rows].shape[0] / n
        (loss * share if share != 1 else loss).backward()
        parts.append((share, stats))
    if len(parts) == 1:
        return parts[0][1]
    out = {k: sum(w * st[k] for w, st in parts) for k in parts[0][1] if k != "pair_loss"}
    out["pair_loss"] = torch.cat([st["pair_loss"] for _, st in parts])
    return out


def policy_and_reference(cfg: config.Sfo) -> tuple[SubjectFlux, SubjectFlux | None, list]:
    """The policy, a separate reference (only for `sfo.direct`) and the trainable parameters. By default the
    policy is the SFT base plus a new LoRA and the reference is the same weights with it switched off."""
    model = SubjectFlux.from_pretrained(BASE)
    stage.seed_everything(cfg.seed)
    if not cfg.direct:
        return model, None, add_lora(model, ADAPTER, cfg.lora_rank, cfg.lora_alpha)
    if model.cfg.backbone == "flux":
        raise config.ConfigError("params.yaml: sfo.direct is implemented for the embedded backbone only (a frozen "
                                 "copy of FLUX.1-dev as the reference would double the memory)")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.requires_grad_(False)
    model.transformer.requires_grad_(True)
    return model, reference, list(model.transformer.parameters())


def main(run: str):
    """`run` is "sfo" or "control" (the DVC stage)."""
    out_dir, curve, work_dir = OUTPUTS[run]
    cfg, loss_cfg, tcfg, cdns_cfg, sft_cfg = config.load("sfo", "loss", "train", "cdns", "sft")
    distributed.relaunch_if_needed(tcfg.processes, "pipeline.stages.sfo")
    par = distributed.Parallel()
    stage.set_threads()
    objective = "sft" if run == "control" or cfg.pairs == "sft_additional" else "sfo"
    if objective == "sft":    # the SFT loss, timestep distribution included, on the positives CDNS paired
        cfg = dataclasses.replace(cfg, pairs="sft_additional", timesteps="logit_normal",
                                  timestep_mu=sft_cfg.timestep_mu, timestep_sigma=sft_cfg.timestep_sigma)
        pos, neg, refs, prompts = load_positives(cdns_cfg.num_triplets)
        fp_params, inputs = {"sfo": cfg, "train": tcfg, "cdns": {"num_triplets": cdns_cfg.num_triplets}}, [DATA, BASE]
    else:
        pos, neg, refs, prompts = load_pairs()
        fp_params, inputs = {"sfo": cfg, "loss": loss_cfg, "train": tcfg}, [DATA, NEGATIVES, BASE]
    local = par.local(cfg.pairs_per_step)
    model, reference, params = policy_and_reference(cfg)
    work = par.work_dir(work_dir, checkpoint.fingerprint(fp_params, inputs, ignore=checkpoint.TRAIN_IGNORED))
    cuda = par.device.type == "cuda"
    if reference is not None:       # the frozen copy of `sfo.direct` runs with the policy's bf16/compile options
        speed_options(reference.to(par.device), tcfg, cuda)
    policy = par.wrap(model)
    speed_options(model, tcfg, cuda)
    opt = stage.optimizer(cfg.optimizer, params, cfg.lr)
    pos, neg, refs = (encode_all(model, x, f"{run}: encode {k}") for k, x in (("positives", pos), ("negatives", neg),
                                                                             ("references", refs)))
    fill_prompt_cache(model, prompts)
    g = torch.Generator().manual_seed(cfg.seed)
    start, state = work.resume(model, opt, {"data": g})
    n = len(prompts)
    stage.log.info("%s: %d %s, %s (%d trainable parameters), %s, %d steps of %d pairs%s", run, n,
                   "positives (SFT-additional)" if objective == "sft" else f"pairs ({cfg.pairs})",
                   "all SFT weights" if cfg.direct else f"LoRA rank {cfg.lora_rank}", sum(p.numel() for p in params),
                   "SFT loss on the positives" if objective == "sft" else f"beta {loss_cfg.beta:g}", cfg.steps,
                   cfg.pairs_per_step, f", resumed from step {start}" if start else "")
    stage.log.info("%s: %s, compile %s, bf16 %s, %d process(es)", run, par.device, tcfg.enabled("compile", cuda),
                   tcfg.enabled("bf16", cuda), par.size)
    rows, window = state.get("rows", []), state.get("window", [])
    bins = state.get("bins", [[] for _ in range(T_BINS)])
    bar = par.progress(range(start, cfg.steps), desc=run, initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(0, n, (cfg.pairs_per_step,), generator=g)       # the global batch, same on every process
        eps = torch.randn((cfg.pairs_per_step, *pos.shape[1:]), generator=g)
        t = sample_t(cfg, cfg.pairs_per_step, g)
        mine = idx[local]
        dev = par.device
        c = model.condition_tokens(refs[mine].to(dev), [prompts[i] for i in mine.tolist()])
        x_pos, x_neg = pos[mine].to(dev), (neg[mine].to(dev) if neg is not None else None)
        opt.zero_grad(set_to_none=True)
        stats = sfo_backward(model, c, x_pos, x_neg, t[local].to(dev), eps[local].to(dev), loss_cfg, cfg.micro_batch,
                             reference_model=reference, objective=objective, policy=policy)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        checkpoint.fault_point("sfo:step")
        opt.step()
        pair_loss = par.gather(stats.pop("pair_loss")).cpu()
        window.append({k: par.mean(v).item() for k, v in stats.items()})
        stage.check_finite(run, step + 1, window[-1]["loss"], "lower sfo.lr, or set train.bf16: off")
        for b, v in zip((t * T_BINS).long().clamp(max=T_BINS - 1).tolist(), pair_loss.tolist()):
            bins[b].append(v)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, **{k: float(np.mean([w[k] for w in window])) for k in window[0]}}
            row.update({f"loss_t{b}": (float(np.mean(v)) if v else float("nan")) for b, v in enumerate(bins)})
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('implicit_acc', float('nan')):.2f}")
            window, bins = [], [[] for _ in range(T_BINS)]
        if (step + 1) % tcfg.checkpoint_every == 0 and step + 1 < cfg.steps and par.main:
            work.save(step + 1, model, opt, {"data": g}, {"rows": rows, "window": window, "bins": bins}, run)
    checkpoint.fault_point(f"{run}:save")
    if not par.main:
        return []
    last = rows[-1]
    stage.log.info("%s: final loss %.4f, %s", run, last["loss"],
                   f"error on positives {last['err_pos']:.4f} (reference {last['ref_err_pos']:.4f})" if objective == "sft"
                   else f"implicit accuracy {last['implicit_acc']:.2f}, reward margin {last['reward_margin']:.3g}")
    shutil.rmtree(out_dir, ignore_errors=True)      # an adapter and a whole model must not mix (run by hand)
    if cfg.direct:
        model.eval().save_pretrained(out_dir)
    else:
        save_lora(model, out_dir, ADAPTER)
    stage.write_csv(curve, rows)
    work.finish({"stage": run, "steps": cfg.steps})
    return [out_dir, curve]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--control", action="store_true", help="train the SFT-additional control (stage `control`)")
    which = "control" if parser.parse_args().control else "sfo"
    stage.run(which, functools.partial(main, which))
