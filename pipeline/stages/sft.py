"""Stage `sft`: train the SFT base, the subject-conditioned FLUX transformer (METHOD.md section 2).

Reads params `model` and `sft`, and `data/train`. Writes `models/sft` (diffusers layout: transformer/,
text_encoder/, text_encoder_2/, tokenizer/, subject_flux.json) and `reports/sft/train.csv` (loss curve).
The embedded backbone is trained from scratch with full weights; on backbone `flux`, FLUX.1-dev stays frozen
and the stage trains OminiControl's rank-`sft.lora_rank` LoRA, routed to the condition tokens (or loads a
released one from `sft.init_lora` and trains nothing), and `models/sft` holds that LoRA. In both, prompts are replaced by the generic prompt
with probability `generic_prompt_prob` and dropped with probability `text_dropout`; with probability
`ref_blur_prob` the reference is blurred (a radius from `ref_blur_radii`) while the target stays sharp, so that
the base answers a degraded reference with a coherent subject whose details it must guess: CDNS's near-miss.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import checkpoint, config, degrade, distributed, flow, manifest, stage, world
from ..model import (
    SFT_ADAPTER,
    SubjectFlux,
    add_lora,
    encode_all,
    fill_prompt_cache,
    speed_options,
)

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


def pick_refs(refs, blurred, blank, idx, g: torch.Generator, cfg: config.Sft) -> torch.Tensor:
    """Per sample: the reference, a blurred copy (`sft.ref_blur_prob`) or the black image `blank`
    (`sft.image_dropout`). A probability of 0 draws nothing from `g`."""
    out = refs[idx]
    if blurred and cfg.ref_blur_prob > 0:
        use = torch.rand(len(idx), generator=g) < cfg.ref_blur_prob
        which = torch.randint(0, len(blurred), (len(idx),), generator=g)
        for k, b in enumerate(blurred):
            sel = use & (which == k)
            out[sel] = b[idx[sel]]
    if cfg.image_dropout > 0:
        out[torch.rand(len(idx), generator=g) < cfg.image_dropout] = blank
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
    distributed.relaunch_if_needed(tcfg.processes, "pipeline.stages.sft")
    par = distributed.Parallel()
    stage.set_threads()
    table, refs, targets = load_triplets(DATA)
    prompts, generic = table.column("prompt").to_pylist(), table.column("generic_prompt").to_pylist()
    blurred = blurred_copies(table, cfg.ref_blur_radii, DATA) if cfg.ref_blur_prob > 0 else []
    model = SubjectFlux.build(mcfg, targets.shape[-1], world.vocabulary(), cfg.seed)   # validates the model config
    if mcfg.backbone == "flux":      # FLUX.1-dev frozen; the OminiControl LoRA trains (or is loaded)
        params = add_lora(model, SFT_ADAPTER, cfg.lora_rank, cfg.lora_alpha, routed=True,
                          weights=cfg.init_lora or None)
    else:
        params = list(model.transformer.parameters())
    steps = 0 if cfg.init_lora else cfg.steps
    local = par.local(cfg.batch_size)
    work = par.work_dir(WORK, checkpoint.fingerprint({"model": mcfg, "sft": cfg, "train": tcfg}, [DATA],
                                                     ignore=checkpoint.TRAIN_IGNORED))
    cuda = par.device.type == "cuda"
    policy = par.wrap(model)
    speed_options(model, tcfg, cuda)
    # Tokens of every image and embeddings of every prompt, computed once (at real scale: VAE and T5/CLIP).
    blank = (encode_all(model, torch.full_like(refs[:1], -1.0), "sft: encode the black reference")[0]
             if cfg.image_dropout > 0 else None)
    targets, refs = encode_all(model, targets, "sft: encode targets"), encode_all(model, refs, "sft: encode references")
    blurred = [encode_all(model, b, "sft: encode blurred references") for b in blurred]
    fill_prompt_cache(model, prompts + generic + [""])
    stage.seed_everything(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = stage.optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    start, state = work.resume(model, opt, {"data": g})
    n = len(prompts)
    stage.log.info("sft: %d triplets, %s, %s trainable parameters, %d steps of %d, %s, compile %s, bf16 %s, "
                   "%d process(es)%s", n, f"backbone {mcfg.backbone}" + (f" + LoRA rank {cfg.lora_rank}"
                   if mcfg.backbone == "flux" else ""), f"{sum(p.numel() for p in params):,}", steps, cfg.batch_size,
                   par.device, tcfg.enabled("compile", cuda), tcfg.enabled("bf16", cuda), par.size,
                   f", resumed from step {start}" if start else "")
    if cfg.init_lora:
        stage.log.info("sft: loaded the SFT LoRA from %s; nothing to train", cfg.init_lora)

    rows, window = state.get("rows", []), state.get("window", [])
    bins = state.get("bins", [[] for _ in range(T_BINS)])
    model.train()
    bar = par.progress(range(start, steps), desc="sft", initial=start, total=steps)
    dev = par.device
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)     # the global batch, same on every process
        ref = pick_refs(refs, blurred, blank, idx, g, cfg)
        batch_prompts = pick_prompts(prompts, generic, idx, torch.rand(cfg.batch_size, generator=g), cfg)
        x = targets[idx]
        eps = torch.randn(x.shape, generator=g)
        t = flow.logit_normal(cfg.batch_size, cfg.timestep_mu, cfg.timestep_sigma, generator=g)
        c = model.condition_tokens(ref[local].to(dev), batch_prompts[local])
        x, eps, t_local = x[local].to(dev), eps[local].to(dev), t[local].to(dev)
        err = flow.per_sample_error(policy(flow.interpolate(x, eps, t_local), t_local, c), x, eps)
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        checkpoint.fault_point("sft:step")
        opt.step()
        window.append(par.mean(loss).item())
        stage.check_finite("sft", step + 1, window[-1], "lower sft.lr, or set train.bf16: off")
        for b, e in zip((t * T_BINS).long().clamp(max=T_BINS - 1).tolist(), par.gather(err).cpu().tolist()):
            bins[b].append(e)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "loss": sum(window) / len(window), "lr": lr_at(step, cfg)}
            row.update({f"loss_t{b}": (sum(v) / len(v) if v else float("nan")) for b, v in enumerate(bins)})
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            window, bins = [], [[] for _ in range(T_BINS)]
        if (step + 1) % tcfg.checkpoint_every == 0 and step + 1 < steps and par.main:
            work.save(step + 1, model, opt, {"data": g}, {"rows": rows, "window": window, "bins": bins}, "sft")
    checkpoint.fault_point("sft:save")
    if not par.main:
        return []
    if rows:
        stage.log.info("sft: final loss %.4f (first logged %.4f)", rows[-1]["loss"], rows[0]["loss"])
    model.eval()
    model.save_pretrained(OUT_DIR)
    stage.write_csv(CURVE, rows or [{"step": 0, "loss": float("nan"), "lr": 0.0}])
    work.finish({"stage": "sft", "steps": steps})
    return [OUT_DIR, CURVE]


if __name__ == "__main__":
    stage.run("sft", main)
