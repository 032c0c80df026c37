"""Stage `sft`: train the SFT base, the subject-conditioned FLUX transformer (METHOD.md section 2).

Reads params `model` and `sft`, and `data/train`. Writes `models/sft` (diffusers layout: transformer/,
text_encoder/, text_encoder_2/, tokenizer/, subject_flux.json) and `reports/sft/train.csv` (loss curve).
The embedded backbone is trained from scratch with full weights; prompts are replaced by the generic prompt
with probability `generic_prompt_prob` and dropped with probability `text_dropout`; with probability
`ref_blur_prob` the reference is blurred (a radius from `ref_blur_radii`) while the target stays sharp, so that
the base answers a degraded reference with a coherent subject whose details it must guess: CDNS's near-miss.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import checkpoint, config, degrade, flow, manifest, stage, world
from ..model import SubjectFlux, speed_options

DATA, OUT_DIR, CURVE, WORK = "data/train", "models/sft", "reports/sft/train.csv", "checkpoints/sft"
T_BINS = 4   # loss per timestep bin, logged beside the loss (minRF-style)


def load_triplets(path: str):
    table = manifest.read(path)
    refs = torch.from_numpy(manifest.to_float(manifest.decode_column(table, "ref_png", path)))
    targets = torch.from_numpy(manifest.to_float(manifest.decode_column(table, "target_png", path)))
    return table, refs, targets


def blurred_copies(table, radii: list[float], path: str) -> list[torch.Tensor]:
    """The references blurred at each radius (PIL, the same blur CDNS uses), precomputed once."""
    refs = manifest.decode_column(table, "ref_png", path)
    return [torch.from_numpy(manifest.to_float(np.stack([degrade.blur(r, rad) for r in refs]))) for rad in radii]


def pick_refs(refs, blurred, idx, g: torch.Generator, cfg: config.Sft) -> torch.Tensor:
    out = refs[idx]
    if blurred and cfg.ref_blur_prob > 0:
        use = torch.rand(len(idx), generator=g) < cfg.ref_blur_prob
        which = torch.randint(0, len(blurred), (len(idx),), generator=g)
        for k, b in enumerate(blurred):
            sel = use & (which == k)
            out[sel] = b[idx[sel]]
    return out


def pick_prompts(prompts, generic, idx, u, cfg: config.Sft) -> list[str]:
    """Per sample: empty prompt (CFG's unconditional), generic prompt (CDNS's degraded text), or the prompt."""
    out = []
    for i, ui in zip(idx.tolist(), u.tolist()):
        out.append("" if ui < cfg.text_dropout else
                   generic[i] if ui < cfg.text_dropout + cfg.generic_prompt_prob else prompts[i])
    return out


def lr_at(step: int, cfg: config.Sft) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def main():
    mcfg, cfg, tcfg = config.load("model", "sft", "train")
    stage.set_threads()
    table, refs, targets = load_triplets(DATA)
    prompts, generic = table.column("prompt").to_pylist(), table.column("generic_prompt").to_pylist()
    blurred = blurred_copies(table, cfg.ref_blur_radii, DATA) if cfg.ref_blur_prob > 0 else []
    model = SubjectFlux.build(mcfg, targets.shape[-1], world.vocabulary(), cfg.seed)   # validates the model config
    work = checkpoint.WorkDir(WORK, checkpoint.fingerprint({"model": mcfg, "sft": cfg, "train": tcfg}, [DATA],
                                                           ignore=("train.checkpoint_every",)))
    cuda = torch.cuda.is_available()
    speed_options(model, tcfg.enabled("compile", cuda), tcfg.enabled("bf16", cuda))
    model.text.encode(sorted(set(prompts) | set(generic) | {""}))   # fill the prompt cache once
    stage.seed_everything(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, state = work.resume(model, opt, {"data": g})
    n = len(prompts)
    stage.log.info("sft: %d triplets, %.2fM parameters, %d steps of %d, compile %s, bf16 %s%s", n,
                   sum(p.numel() for p in model.transformer.parameters()) / 1e6, cfg.steps, cfg.batch_size,
                   tcfg.enabled("compile", cuda), tcfg.enabled("bf16", cuda),
                   f", resumed from step {start}" if start else "")

    rows, window = state.get("rows", []), state.get("window", [])
    bins = state.get("bins", [[] for _ in range(T_BINS)])
    model.train()
    bar = stage.progress(range(start, cfg.steps), desc="sft", initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        ref = pick_refs(refs, blurred, idx, g, cfg)
        c = model.condition(ref, pick_prompts(prompts, generic, idx, torch.rand(cfg.batch_size, generator=g), cfg))
        x = model.tokens(targets[idx])
        eps = torch.randn(x.shape, generator=g)
        t = flow.logit_normal(cfg.batch_size, cfg.timestep_mu, cfg.timestep_sigma, generator=g)
        err = flow.per_sample_error(model(flow.interpolate(x, eps, t), t, c), x, eps)
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.transformer.parameters(), cfg.grad_clip)
        checkpoint.fault_point("sft:step")
        opt.step()
        window.append(loss.item())
        for b, e in zip((t * T_BINS).long().clamp(max=T_BINS - 1).tolist(), err.detach().tolist()):
            bins[b].append(e)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "loss": sum(window) / len(window), "lr": lr_at(step, cfg)}
            row.update({f"loss_t{b}": (sum(v) / len(v) if v else float("nan")) for b, v in enumerate(bins)})
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            window, bins = [], [[] for _ in range(T_BINS)]
        if (step + 1) % tcfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            work.save(step + 1, model, opt, {"data": g}, {"rows": rows, "window": window, "bins": bins}, "sft")
    checkpoint.fault_point("sft:save")
    stage.log.info("sft: final loss %.4f (first logged %.4f)", rows[-1]["loss"], rows[0]["loss"])
    model.eval()
    model.save_pretrained(OUT_DIR)
    stage.write_csv(CURVE, rows)
    work.finish({"stage": "sft", "steps": cfg.steps})
    return [OUT_DIR, CURVE]


if __name__ == "__main__":
    stage.run("sft", main)
