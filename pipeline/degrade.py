"""CDNS condition degradations (METHOD.md section 3): what the SFT base is given to produce a near-miss.

Image (`cdns.image`): `blur`, a Gaussian blur of the reference (PIL's GaussianBlur; the radius is its sigma in
pixels at the image's resolution) that erases pattern and mark but keeps class and colour; `noise`, Gaussian
pixel noise; `semantic`, the target scene itself instead of the plain-background reference (the paper's
Table 4); `none`.
Text (`cdns.text`): `generic`, "a photo of a {class}"; `perturbed`, the prompt with one context attribute
swapped (the world's "hallucinated caption"; embedded world only: real rows carry no context labels); `none`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from . import world


def blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a uint8 (H, W, 3) image; radius 0 returns it unchanged."""
    if radius == 0:
        return img.copy()
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def add_noise(img: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian pixel noise of `std` (a fraction of the 0-255 range), clipped."""
    return np.clip(img + rng.normal(0.0, std * 255.0, img.shape), 0, 255).astype(np.uint8)


def degrade_image(ref: np.ndarray, target: np.ndarray, kind: str, blur_radius: float, noise_std: float,
                  rng: np.random.Generator) -> np.ndarray:
    if kind == "blur":
        return blur(ref, blur_radius)
    if kind == "noise":
        return add_noise(ref, noise_std, rng)
    if kind == "semantic":
        return target.copy()
    if kind == "none":
        return ref.copy()
    raise ValueError(f"unknown image degradation {kind!r}")


def perturbed_prompt(cls: int, ctx: world.Context, rng: np.random.Generator) -> str:
    """The prompt of the same class with one context attribute (background, position or size) changed. Needs the
    embedded world's labels: a real-scale row's are `manifest.UNKNOWN` (-1), which would index the world's
    vocabulary from the end and caption a photo with an unrelated embedded scene."""
    if min(cls, ctx.background, ctx.position, ctx.size) < 0:
        raise ValueError(f"perturbed prompt: the row has no world labels (class {cls}, context {ctx}); "
                         "cdns.text=perturbed needs prepare.source: embedded")
    attr = tuple(world.CONTEXT_ATTRS)[rng.integers(len(world.CONTEXT_ATTRS))]
    subject = world.Subject(cls, 0, 0, 0, 0, 0, 0, 0)                    # prompts name the class only
    return world.prompt(subject, world.with_other_value(ctx, attr, rng))


def degrade_text(prompt: str, generic_prompt: str, kind: str, cls: int, ctx: world.Context,
                 rng: np.random.Generator) -> str:
    if kind == "generic":
        return generic_prompt
    if kind == "perturbed":
        return perturbed_prompt(cls, ctx, rng)
    if kind == "none":
        return prompt
    raise ValueError(f"unknown text degradation {kind!r}")
