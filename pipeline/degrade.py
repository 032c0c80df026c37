"""CDNS condition degradations (METHOD.md section 3): what the SFT base is given to produce a near-miss.

Image: Gaussian blur of the reference (PIL's GaussianBlur; `radius` is its sigma in pixels at the image's
resolution), erasing pattern and mark while keeping class and colour; or `none`.
Text: the prompt replaced by the generic "a photo of a {class}"; or `none`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def blur(img: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a uint8 (H, W, 3) image; radius 0 returns it unchanged."""
    if radius == 0:
        return img.copy()
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def degrade_image(img: np.ndarray, kind: str, blur_radius: float) -> np.ndarray:
    if kind == "blur":
        return blur(img, blur_radius)
    if kind == "none":
        return img.copy()
    raise ValueError(f"unknown image degradation {kind!r}")


def degrade_text(prompt: str, generic_prompt: str, kind: str) -> str:
    if kind == "generic":
        return generic_prompt
    if kind == "none":
        return prompt
    raise ValueError(f"unknown text degradation {kind!r}")
