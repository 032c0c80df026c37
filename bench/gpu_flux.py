"""GPU benchmark of the real-scale training steps (issues 4 and 6): a full-size FLUX.1-dev transformer.

The transformer is built from FLUX.1-dev's config with random bf16 weights (nothing is downloaded; the cost of
a step does not depend on the weights' values) and wrapped in the same `SubjectFlux` forward the pipeline
trains: text tokens | noisy latent tokens | condition tokens at t = 0 with the position delta (0, -W/16).
At 512 px the latents are 64 x 64 x 16, packed 2 x 2 into 1024 tokens of 64 channels, and the condition
(the reference) adds another 1024; the T5 sequence is 512 tokens. Gradient checkpointing per block, bf16.

Measured for P samples / P pairs (median of `--repeats` after `--warmup`), each on the same weights:
- `sft_r4_step_s`, `sft_r4_peak_mb`: the `sft` stage's step, the rank-4 SFT LoRA trainable alone;
- with the SFO configuration (SFT LoRA r4 frozen + SFO LoRA r16 trainable), `fwd_s` (no-grad forward of P
  samples), `sft_step_s` (flow-matching loss on P samples, forward + backward + AdamW step), `sfo_step_s`
  (P pairs: policy on [x+; x-] as one batch, reference = SFT LoRA alone, one no-grad batch) and their peak
  memory; `sfo_step_over_floor = sfo_step_s / (2 sft_step_s + 2 fwd_s)`, `sfo_over_sft_mem` (SFO peak over
  the SFT-stage peak at the same P); for P > `--micro`, the same SFO update in micro-batches of `--micro`
  pairs (`sfo.micro_batch`, gradient accumulation: `sfo_micro_*`).

    python bench/gpu_flux.py --out reports/bench_gpu.json          # on a CUDA machine
    python bench/gpu_flux.py --tiny --device cpu --out /tmp/b.json  # a seconds-long check that it still runs
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from pipeline import flow
from pipeline.config import Loss, Model
from pipeline.model import Conditioning, SubjectFlux, add_lora
from pipeline.stages.sfo import sfo_backward

# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json): 11.9 B parameters.
FLUX_DEV = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, in_channels=64, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def build(tiny: bool, device: str, dtype: torch.dtype, image_px: int, checkpointing: bool = True) -> SubjectFlux:
    cfg = TINY if tiny else FLUX_DEV
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)                # build straight in bf16: no fp32 copy of 12 B weights
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(patch_size=1, **cfg)
    finally:
        torch.set_default_dtype(previous)
    latent = image_px // 8                        # the FLUX VAE downsamples by 8; tokens pack 2 x 2 latents
    model_cfg = Model(patch_size=2, num_layers=cfg["num_layers"], num_single_layers=cfg["num_single_layers"],
                      num_attention_heads=cfg["num_attention_heads"], attention_head_dim=cfg["attention_head_dim"],
                      axes_dims_rope=list(cfg["axes_dims_rope"]), position_delta=[0, -image_px // 16],
                      text_dim=cfg["joint_attention_dim"], pooled_dim=cfg["pooled_projection_dim"],
                      max_text_len=8 if tiny else 512)
    model = SubjectFlux(transformer, None, model_cfg, latent).to(device)
    if checkpointing and device == "cuda":
        transformer.enable_gradient_checkpointing()
    return model


def batch(model: SubjectFlux, n: int, device: str, dtype: torch.dtype, g: torch.Generator):
    cfg, side = model.cfg, model.image_size
    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)
    tokens = (side // 2) ** 2
    c = Conditioning(randn(n, tokens, 64), randn(n, cfg.max_text_len, cfg.text_dim), randn(n, cfg.pooled_dim))
    x, x_neg, eps = randn(n, tokens, 64), randn(n, tokens, 64), randn(n, tokens, 64)
    t = flow.logit_normal(n, generator=g, device=device).to(dtype)
    return c, x, x_neg, eps, t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny config (a CPU check that the script runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent side = size / 8)")
    ap.add_argument("--pairs", type=int, nargs="+", default=[1, 2, 4], help="P: samples per SFT step, pairs per SFO step")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro", type=int, default=2, help="also time SFO at P > MICRO in micro-batches of MICRO pairs")
    ap.add_argument("--no-checkpointing", action="store_true", help="keep every activation (more memory)")
    ap.add_argument("--sft-lora", choices=("routed", "all"), default="routed",
                    help="routed: the SFT LoRA on the layers that read condition tokens, acting on them alone (as "
                         "`sft` trains it); all: on every linear layer and every token (the table before routing)")
    ap.add_argument("--out", default="reports/bench_gpu.json")
    args = ap.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cuda = device == "cuda"
    if cuda:   # torch 2.11's cuDNN attention fails its backward here (mha_graph.execute, seen on an H200): use flash
        torch.backends.cuda.enable_cudnn_sdp(False)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> tuple[float, float]:
        """Median seconds over `repeats` after `warmup`, and the peak allocated MiB of one more call."""
        for _ in range(args.warmup):
            fn()
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        peak = float("nan")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync()
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        return statistics.median(times), peak

    t0 = time.perf_counter()
    model = build(args.tiny, device, dtype, args.size, not args.no_checkpointing)
    sync()
    n_params = sum(p.numel() for p in model.transformer.parameters())
    print(f"built {n_params / 1e9:.2f} B parameters in {time.perf_counter() - t0:.1f} s on {device}", flush=True)
    tr = model.transformer
    sft_params = add_lora(model, "sft", 4, 4, routed=args.sft_lora == "routed")   # OminiControl: condition tokens only
    sfo_params = add_lora(model, "sfo", 16, 16)
    opt_sft = torch.optim.AdamW(sft_params, lr=1e-4)
    opt_sfo = torch.optim.AdamW(sfo_params, lr=1e-4)
    loss_cfg = Loss(beta=1000.0)
    g = torch.Generator(device).manual_seed(0)
    weights_mb = torch.cuda.memory_allocated() / 2 ** 20 if cuda else float("nan")

    def use(active, trainable):
        tr.set_adapters(active)
        for n, p in tr.named_parameters():
            p.requires_grad_(f".{trainable}." in n)

    rows = []
    for P in args.pairs:
        c, x, x_neg, eps, t = batch(model, P, device, dtype, g)
        x_t = flow.interpolate(x, eps, t)

        def train_step(opt, loss_fn):
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()

        def sft_loss():
            return flow.flow_loss(model(x_t, t, c), x, eps)

        def fwd():
            with torch.no_grad():
                model(x_t, t, c)

        def sfo_train(micro):
            opt_sfo.zero_grad(set_to_none=True)
            sfo_backward(model, c, x, x_neg, t, eps, loss_cfg, micro)
            opt_sfo.step()

        use(["sft"], "sft")                                     # the sft stage: LoRA r4 alone, trainable
        sft_r4 = timed(lambda: train_step(opt_sft, sft_loss))
        use(["sft", "sfo"], "sfo")                              # SFO: SFT LoRA frozen, SFO LoRA trainable
        fwd_s = timed(fwd)
        sft_same = timed(lambda: train_step(opt_sfo, sft_loss))
        sfo = timed(lambda: sfo_train(0))
        micro = timed(lambda: sfo_train(args.micro)) if P > args.micro else None
        row = {"P": P, "fwd_s": fwd_s[0], "sft_r4_step_s": sft_r4[0], "sft_r4_peak_mb": sft_r4[1],
               "sft_step_s": sft_same[0], "sft_peak_mb": sft_same[1], "sfo_step_s": sfo[0], "sfo_peak_mb": sfo[1],
               "sfo_step_over_floor": sfo[0] / (2 * sft_same[0] + 2 * fwd_s[0]),
               "sfo_over_sft_mem": sfo[1] / sft_r4[1] if cuda else float("nan")}
        if micro:       # the same P pairs per update, `--micro` pairs per forward/backward (sfo.micro_batch)
            row.update({"micro_batch": args.micro, "sfo_micro_step_s": micro[0], "sfo_micro_peak_mb": micro[1],
                        "sfo_micro_step_over_floor": micro[0] / (2 * sft_same[0] + 2 * fwd_s[0]),
                        "sfo_micro_over_sft_mem": micro[1] / sft_r4[1] if cuda else float("nan")})
        rows.append(row)
        print(json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
        out = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
               "torch": torch.__version__, "dtype": str(dtype), "parameters": n_params, "weights_mb": weights_mb,
               "image_px": args.size, "image_tokens": (model.image_size // 2) ** 2,
               "condition_tokens": (model.image_size // 2) ** 2, "text_tokens": model.cfg.max_text_len,
               "gradient_checkpointing": bool(tr.is_gradient_checkpointing), "lora": {"sft": 4, "sfo": 16},
               "sft_lora": args.sft_lora,
               "warmup": args.warmup, "repeats": args.repeats, "tiny": args.tiny, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")     # after every P: a timeout keeps the rest
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
