"""CDNS degradations."""
import numpy as np
import pytest

from pipeline import degrade, world


def test_blur_radius_zero_is_identity_and_blur_keeps_colour_but_removes_detail():
    rng = np.random.default_rng(0)
    s = world.sample_subject(rng)
    ref, mask = world.render(s, world.Context(0, 1, 1), 32, reference=True)
    assert np.array_equal(degrade.blur(ref, 0), ref)
    b = degrade.blur(ref, 1.5)
    assert b.shape == ref.shape and b.dtype == np.uint8
    assert np.abs(b.astype(float).mean((0, 1)) - ref.astype(float).mean((0, 1))).max() < 2.0   # colour kept
    hf = lambda im: np.abs(np.diff(im.astype(float), axis=1)).mean()                          # detail removed
    assert hf(b) < 0.5 * hf(ref)
    assert hf(degrade.blur(ref, 3.0)) < hf(b)


def test_checkerboard_is_erased_by_blur():
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    out = degrade.blur(checker, 1.5).astype(float)
    assert out.std() < 10 and abs(out.mean() - 127.5) < 3


def test_degrade_choices():
    img = np.zeros((4, 4, 3), np.uint8)
    assert np.array_equal(degrade.degrade_image(img, "none", 5.0), img)
    assert degrade.degrade_text("a small circle in the sky on the left", "a photo of a circle", "generic") == \
        "a photo of a circle"
    assert degrade.degrade_text("p", "g", "none") == "p"
    with pytest.raises(ValueError):
        degrade.degrade_image(img, "sharpen", 1.0)
