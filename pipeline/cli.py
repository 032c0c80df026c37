"""`sfo generate`: a reference image and a prompt in, images out, from a trained model directory.

    sfo generate --model models/sfo --ref my_subject.png --prompt "a circle on a beach" --out out.png
    python -m pipeline generate ...        # the same

`--model` is a directory the pipeline wrote: `models/sft` (a whole model) or `models/sfo` (an SFO adapter on
top of its base, `--base`, by default the `sft` directory beside it; a whole model when `sfo.direct` was on).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ConfigError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sfo", description="SFO Pipeline commands")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images of a reference subject in a prompt's context",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--model", required=True, help="models/sft or models/sfo (a directory a stage wrote)")
    g.add_argument("--ref", required=True,
                   help="the subject's reference image (any format PIL reads; a non-square one is centre-cropped)")
    g.add_argument("--prompt", required=True, help="the context, e.g. 'a photo of a circle on a beach'")
    g.add_argument("--out", required=True, help="output PNG; with --num-images N > 1, OUT-0.png ... OUT-(N-1).png")
    g.add_argument("--seed", type=int, default=0, help="noise seed of the first image (image k uses seed + k)")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--steps", type=int, default=20, help="Euler steps")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; default: the one reports/guidance.json chose, else 1")
    g.add_argument("--size", type=int, default=None,
                   help="output side in pixels; the embedded model samples at its trained size and resizes")
    g.add_argument("--base", default=None, help="the SFT base of an adapter directory (default: ../sft)")
    return ap


def load_reference(path: str, size: int) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such image file")
    try:
        with Image.open(p) as im:
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return np.asarray(ImageOps.fit(img, (size, size), Image.BICUBIC))   # centre crop to a square, then resize


def default_guidance() -> tuple[float, str]:
    from .evaluation import GUIDANCE_FILE, chosen_guidance
    try:
        return chosen_guidance(), f"chosen on the validation split ({GUIDANCE_FILE})"
    except ConfigError:
        return 1.0, f"off (no {GUIDANCE_FILE} here)"


def generate(args) -> list[Path]:
    import torch

    from . import manifest
    from .model import load_trained, seeded_noise
    if not args.prompt.strip():
        raise ConfigError("--prompt is empty: describe the context (e.g. 'a photo of a circle on a beach')")
    for name in ("num_images", "steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.size is not None and args.size < 1:
        raise ConfigError("--size must be >= 1")
    model = load_trained(args.model, args.base)
    ref = load_reference(args.ref, model.pixel_size)
    vocab = model.text.tokenizer.get_vocab() if model.cfg.backbone == "embedded" else None   # a closed world
    unknown = sorted({w for w in args.prompt.lower().split() if w not in vocab}) if vocab else []
    if unknown:
        print(f"sfo generate: note: words outside the model's vocabulary are read as unknown: {unknown}",
              file=sys.stderr)
    guidance, why = (args.guidance, "from --guidance") if args.guidance is not None else default_guidance()
    seeds = [args.seed + k for k in range(args.num_images)]
    refs = torch.from_numpy(manifest.to_float(ref[None]))
    # one image at a time: an image depends on its seed alone, not on --num-images (batched convolutions and
    # matmuls round differently by batch size, enough to flip a pixel of the FLUX VAE's output)
    images = np.concatenate([manifest.to_uint8(model.sample(refs, [args.prompt], seeded_noise([s], model.noise_shape),
                                                            args.steps, guidance)) for s in seeds])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix or '.png'}")
                                           for k in range(len(seeds))]
    size = args.size or model.pixel_size
    for img, path in zip(images, paths):
        Image.fromarray(img).resize((size, size), Image.BICUBIC).save(path)
    print(f"sfo generate: {len(paths)} image(s) from {args.model}, seeds {seeds}, {args.steps} steps, "
          f"guidance {guidance:g} ({why}), {model.pixel_size} px"
          + (f" resized to {size} px" if size != model.pixel_size else "") + ": " + ", ".join(map(str, paths)))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .stage import quiet_libraries
    quiet_libraries()                       # no loading bars from transformers/diffusers
    try:
        generate(args)
    except ConfigError as e:
        print(f"sfo generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
