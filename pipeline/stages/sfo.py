"""Stage `sfo`: Subject Fidelity Optimization on CDNS pairs (METHOD.md section 4).

Reads params `sfo` and `loss`, `data/train`, `data/negatives/manifest.parquet` and `models/sft`. The policy is
the SFT base plus a trainable rank-`sfo.lora_rank` LoRA; the reference is the same model with that LoRA
switched off (no second copy of the weights). Each step takes `sfo.pairs_per_step` pairs (x+, x-) with their
original conditions, one t (`sfo.timesteps`) and one eps per pair shared by its two images, runs positives and
negatives through the policy as one batch and through the reference as one no-grad batch, and minimises
L_SFO (flow.sfo_loss). Writes the adapter to `models/sfo` and the diagnostics to `reports/sfo/train.csv`.
"""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch

from .. import checkpoint, config, flow, manifest, stage
from ..model import Conditioning, SubjectFlux, adapters_disabled, add_lora, save_lora

DATA, NEGATIVES, BASE = "data/train", "data/negatives/manifest.parquet", "models/sft"
OUT_DIR, CURVE, WORK = "models/sfo", "reports/sfo/train.csv", "checkpoints/sfo"
ADAPTER = "sfo"
T_BINS = 4


def load_pairs():
    """Positives (targets), negatives, references and prompts of every triplet that has a negative."""
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
    return (img(train, "target_png", DATA), img(negatives, "neg_png", NEGATIVES), img(train, "ref_png", DATA),
            train.column("prompt").to_pylist())


def sample_t(cfg: config.Sfo, n: int, g: torch.Generator) -> torch.Tensor:
    if cfg.timesteps == "uniform":
        return flow.uniform(n, generator=g)
    return flow.logit_normal(n, cfg.timestep_mu, cfg.timestep_sigma, generator=g)


def sfo_step(model: SubjectFlux, c: Conditioning, x_pos, x_neg, t, eps, loss_cfg: config.Loss,
             reference=adapters_disabled):
    """One SFO loss evaluation: policy on [x+; x-] as one batch, reference (inside the context `reference(model)`:
    by default the SFO adapter off) likewise, no grad. With `loss.sft_weight` > 0 the positives' mean error is
    added (an SFT anchor; 0 is the paper's loss)."""
    x = torch.cat([x_pos, x_neg])
    eps2, t2, c2 = torch.cat([eps, eps]), torch.cat([t, t]), Conditioning.cat([c, c])
    x_t = flow.interpolate(x, eps2, t2)
    with torch.no_grad(), reference(model):     # first: its transient memory is reused by the policy's pass
        ref_pos, ref_neg = flow.per_sample_error(model(x_t, t2, c2), x, eps2).chunk(2)
    err_pos, err_neg = flow.per_sample_error(model(x_t, t2, c2), x, eps2).chunk(2)
    loss, stats = flow.sfo_loss(err_pos, err_neg, ref_pos, ref_neg, loss_cfg.beta)
    if loss_cfg.sft_weight:
        stats["sft_term"] = err_pos.mean().detach()
        loss = loss + loss_cfg.sft_weight * err_pos.mean()
        stats["loss"] = loss.detach()
    return loss, stats


def main():
    cfg, loss_cfg, tcfg = config.load("sfo", "loss", "train")
    stage.set_threads()
    pos, neg, refs, prompts = load_pairs()
    model = SubjectFlux.from_pretrained(BASE)
    work = checkpoint.WorkDir(WORK, checkpoint.fingerprint({"sfo": cfg, "loss": loss_cfg}, [DATA, NEGATIVES, BASE]))
    stage.seed_everything(cfg.seed)
    params = add_lora(model, ADAPTER, cfg.lora_rank, cfg.lora_alpha)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.text.encode(sorted(set(prompts)))
    g = torch.Generator().manual_seed(cfg.seed)
    start, state = work.resume(model, opt, {"data": g})
    n = len(prompts)
    stage.log.info("sfo: %d pairs, LoRA rank %d (%d trainable parameters), beta %g, %d steps of %d pairs%s", n,
                   cfg.lora_rank, sum(p.numel() for p in params), loss_cfg.beta, cfg.steps, cfg.pairs_per_step,
                   f", resumed from step {start}" if start else "")
    rows, window = state.get("rows", []), state.get("window", [])
    bins = state.get("bins", [[] for _ in range(T_BINS)])
    bar = stage.progress(range(start, cfg.steps), desc="sfo", initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(0, n, (cfg.pairs_per_step,), generator=g)
        c = model.condition(refs[idx], [prompts[i] for i in idx.tolist()])
        x_pos, x_neg = model.tokens(pos[idx]), model.tokens(neg[idx])
        eps = torch.randn(x_pos.shape, generator=g)
        t = sample_t(cfg, cfg.pairs_per_step, g)
        loss, stats = sfo_step(model, c, x_pos, x_neg, t, eps, loss_cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
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
    save_lora(model, OUT_DIR, ADAPTER)
    stage.write_csv(CURVE, rows)
    work.finish({"stage": "sfo", "steps": cfg.steps})
    return [OUT_DIR, CURVE]


if __name__ == "__main__":
    stage.run("sfo", main)
