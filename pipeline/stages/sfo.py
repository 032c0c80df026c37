"""Stage `sfo`: Subject Fidelity Optimization on CDNS pairs (METHOD.md section 4).

Reads params `sfo` and `loss`, `data/train`, `data/negatives/manifest.parquet` and `models/sft`. The policy is
the SFT base plus a trainable rank-`sfo.lora_rank` LoRA; the reference is the same model with that LoRA
switched off (no second copy of the weights). Each step takes `sfo.pairs_per_step` pairs (x+, x-) with their
original conditions, one t (`sfo.timesteps`) and one eps per pair shared by its two images, runs positives and
negatives through the policy as one batch and through the reference as one no-grad batch, and minimises
L_SFO (flow.sfo_loss). Writes the adapter to `models/sfo` and the diagnostics to `reports/sfo/train.csv`.

Ablations: `sfo.pairs` picks the pairs (made by `cdns`, see there) and, for `sft_additional`, the SFT loss on
the positives instead of L_SFO; `sfo.direct` trains all SFT weights against a frozen copy and writes a whole
model directory to `models/sfo` instead of an adapter.
"""
from __future__ import annotations

import contextlib
import copy
import shutil

import numpy as np
import pyarrow.compute as pc
import torch

from .. import checkpoint, config, flow, manifest, stage
from ..model import Conditioning, SubjectFlux, adapters_disabled, add_lora, save_lora, speed_options

DATA, NEGATIVES, BASE = "data/train", "data/negatives/manifest.parquet", "models/sft"
OUT_DIR, CURVE, WORK = "models/sfo", "reports/sfo/train.csv", "checkpoints/sfo"
ADAPTER = "sfo"
T_BINS = 4


def load_pairs():
    """Positives, negatives, references and prompts of every triplet that has a negative. The positive is the
    triplet's target, or the manifest's `pos_png` where it has one (judge DPO)."""
    negatives = manifest.read(NEGATIVES, manifest.NEGATIVE_SCHEMA)
    train = manifest.read(DATA)
    ids = negatives.column("id")
    idx = pc.index_in(ids, value_set=train.column("id"))
    if idx.null_count:
        missing = ids.filter(pc.is_null(idx))[0].as_py()
        raise config.ConfigError(f"{NEGATIVES}: row id={missing!r} has no triplet in {DATA}")
    train = train.take(idx)

    def img(table, col, src):
        return torch.from_numpy(manifest.to_float(manifest.decode_column(table, col, src)))
    pos = img(train, "target_png", DATA)
    judged = negatives.column("pos_png").is_valid().to_numpy(zero_copy_only=False)
    if judged.any():
        rows = np.flatnonzero(judged)
        pos[rows] = img(negatives.take(rows), "pos_png", NEGATIVES)
    return pos, img(negatives, "neg_png", NEGATIVES), img(train, "ref_png", DATA), train.column("prompt").to_pylist()


def sample_t(cfg: config.Sfo, n: int, g: torch.Generator) -> torch.Tensor:
    if cfg.timesteps == "uniform":
        return flow.uniform(n, generator=g)
    return flow.logit_normal(n, cfg.timestep_mu, cfg.timestep_sigma, generator=g)


def sfo_step(model: SubjectFlux, c: Conditioning, x_pos, x_neg, t, eps, loss_cfg: config.Loss,
             reference=adapters_disabled, reference_model: SubjectFlux | None = None, objective: str = "sfo"):
    """One SFO loss evaluation: the reference on [x+; x-] as one no-grad batch (inside `reference(model)`: by
    default the SFO adapter switched off; or a separate frozen `reference_model`), then the policy likewise.
    With `loss.sft_weight` > 0 the positives' mean error is added (an SFT anchor; 0 is the paper's loss).
    `objective="sft"` minimises the positives' error alone (the SFT-additional control), with the same
    diagnostics."""
    x = torch.cat([x_pos, x_neg])
    eps2, t2, c2 = torch.cat([eps, eps]), torch.cat([t, t]), Conditioning.cat([c, c])
    x_t = flow.interpolate(x, eps2, t2)
    ref = reference_model if reference_model is not None else model
    with torch.no_grad(), (contextlib.nullcontext() if reference_model is not None else reference(model)):
        ref_pos, ref_neg = flow.per_sample_error(ref(x_t, t2, c2), x, eps2).chunk(2)   # first: its transient
    err_pos, err_neg = flow.per_sample_error(model(x_t, t2, c2), x, eps2).chunk(2)     # memory is reused here
    loss, stats = flow.sfo_loss(err_pos, err_neg, ref_pos, ref_neg, loss_cfg.beta)
    if objective == "sft":
        loss = err_pos.mean()
        stats["loss"] = loss.detach()
    elif loss_cfg.sft_weight:
        stats["sft_term"] = err_pos.mean().detach()
        loss = loss + loss_cfg.sft_weight * err_pos.mean()
        stats["loss"] = loss.detach()
    return loss, stats


def sfo_backward(model: SubjectFlux, c: Conditioning, x_pos, x_neg, t, eps, loss_cfg: config.Loss,
                 micro_batch: int = 0, **kw) -> dict[str, torch.Tensor]:
    """Forward and backward of `sfo_step` over P pairs, `micro_batch` pairs at a time (0: all at once). The loss
    is a mean of per-pair terms, so the chunks' gradients, each scaled by its share of the pairs, add up to the
    full batch's (up to float summation order): memory of `micro_batch` pairs, the update of P. Returns the
    diagnostics of all P pairs."""
    n = x_pos.shape[0]
    size = micro_batch or n
    parts = []
    for start in range(0, n, size):
        rows = slice(start, start + size)
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
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.requires_grad_(False)
    model.transformer.requires_grad_(True)
    return model, reference, list(model.transformer.parameters())


def main():
    cfg, loss_cfg, tcfg = config.load("sfo", "loss", "train")
    stage.set_threads()
    pos, neg, refs, prompts = load_pairs()
    model, reference, params = policy_and_reference(cfg)
    work = checkpoint.WorkDir(WORK, checkpoint.fingerprint({"sfo": cfg, "loss": loss_cfg, "train": tcfg},
                                                           [DATA, NEGATIVES, BASE], ignore=("train.checkpoint_every",)))
    cuda = torch.cuda.is_available()
    speed_options(model, tcfg.enabled("compile", cuda), tcfg.enabled("bf16", cuda))
    objective = "sft" if cfg.pairs == "sft_additional" else "sfo"
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.text.encode(sorted(set(prompts)))
    g = torch.Generator().manual_seed(cfg.seed)
    start, state = work.resume(model, opt, {"data": g})
    n = len(prompts)
    stage.log.info("sfo: %d pairs (%s), %s (%d trainable parameters), %s, %d steps of %d pairs%s", n, cfg.pairs,
                   "all SFT weights" if cfg.direct else f"LoRA rank {cfg.lora_rank}", sum(p.numel() for p in params),
                   "SFT loss on the positives" if objective == "sft" else f"beta {loss_cfg.beta:g}", cfg.steps,
                   cfg.pairs_per_step, f", resumed from step {start}" if start else "")
    stage.log.info("sfo: compile %s, bf16 %s", tcfg.enabled("compile", cuda), tcfg.enabled("bf16", cuda))
    rows, window = state.get("rows", []), state.get("window", [])
    bins = state.get("bins", [[] for _ in range(T_BINS)])
    bar = stage.progress(range(start, cfg.steps), desc="sfo", initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(0, n, (cfg.pairs_per_step,), generator=g)
        c = model.condition(refs[idx], [prompts[i] for i in idx.tolist()])
        x_pos, x_neg = model.tokens(pos[idx]), model.tokens(neg[idx])
        eps = torch.randn(x_pos.shape, generator=g)
        t = sample_t(cfg, cfg.pairs_per_step, g)
        opt.zero_grad(set_to_none=True)
        stats = sfo_backward(model, c, x_pos, x_neg, t, eps, loss_cfg, cfg.micro_batch, reference_model=reference,
                             objective=objective)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        checkpoint.fault_point("sfo:step")
        opt.step()
        pair_loss = stats.pop("pair_loss")
        window.append({k: v.item() for k, v in stats.items()})
        for b, v in zip((t * T_BINS).long().clamp(max=T_BINS - 1).tolist(), pair_loss.tolist()):
            bins[b].append(v)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, **{k: float(np.mean([w[k] for w in window])) for k in window[0]}}
            row.update({f"loss_t{b}": (float(np.mean(v)) if v else float("nan")) for b, v in enumerate(bins)})
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}")
            window, bins = [], [[] for _ in range(T_BINS)]
        if (step + 1) % tcfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            work.save(step + 1, model, opt, {"data": g}, {"rows": rows, "window": window, "bins": bins}, "sfo")
    checkpoint.fault_point("sfo:save")
    stage.log.info("sfo: final loss %.4f, implicit accuracy %.2f, reward margin %.3g", rows[-1]["loss"],
                   rows[-1]["implicit_acc"], rows[-1]["reward_margin"])
    shutil.rmtree(OUT_DIR, ignore_errors=True)      # an adapter and a whole model must not mix (run by hand)
    if cfg.direct:
        model.eval().save_pretrained(OUT_DIR)
    else:
        save_lora(model, OUT_DIR, ADAPTER)
    stage.write_csv(CURVE, rows)
    work.finish({"stage": "sfo", "steps": cfg.steps})
    return [OUT_DIR, CURVE]


if __name__ == "__main__":
    stage.run("sfo", main)
