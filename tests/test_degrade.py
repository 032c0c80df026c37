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


def test_image_degradations():
    rng = np.random.default_rng(0)
    ref, target = np.full((8, 8, 3), 100, np.uint8), np.full((8, 8, 3), 7, np.uint8)
    assert np.array_equal(degrade.degrade_image(ref, target, "none", 5.0, 0.3, rng), ref)
    assert np.array_equal(degrade.degrade_image(ref, target, "semantic", 5.0, 0.3, rng), target)
    noisy = degrade.degrade_image(ref, target, "noise", 5.0, 0.1, rng).astype(float)
    assert abs(noisy.mean() - 100) < 5 and 20 < noisy.std() < 30                      # std 0.1 * 255
    with pytest.raises(ValueError):
        degrade.degrade_image(ref, target, "sharpen", 1.0, 0.3, rng)


def test_text_degradations():
    s = world.Subject(cls=0, body_color=1, pattern=2, pattern_color=0, pattern_scale=0, pattern_angle=0,
                      mark_corner=0, mark_color=0)
    ctx = world.Context(background=0, position=0, size=0)
    prompt = world.prompt(s, ctx)
    rng = np.random.default_rng(0)
    assert degrade.degrade_text(prompt, "a photo of a circle", "generic", 0, ctx, rng) == "a photo of a circle"
    assert degrade.degrade_text(prompt, "g", "none", 0, ctx, rng) == prompt
    for _ in range(50):     # exactly one context attribute differs, the class stays
        p = degrade.degrade_text(prompt, "g", "perturbed", 0, ctx, rng)
        others = [world.prompt(s, world.Context(**{**ctx.__dict__, a: v}))
                  for a, values in world.CONTEXT_ATTRS.items() for v in range(len(values)) if v != getattr(ctx, a)]
        assert p in others
    unknown = world.Context(background=-1, position=-1, size=-1)   # a real-scale row: manifest.UNKNOWN labels
    with pytest.raises(ValueError, match="prepare.source: embedded"):
        degrade.degrade_text("a photo of a dog", "g", "perturbed", -1, unknown, rng)
