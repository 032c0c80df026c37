"""The embedded judges' self-report: what one identity error costs in the DINO measure (stages/judges.py)."""
import numpy as np
import torch

from pipeline import config, world
from pipeline.stages.judges import near_miss_costs


def test_near_miss_costs_with_a_pixel_embedding():
    """With the raw pixels as the embedding every error costs something, and the true target is mostly the closer
    (a rotated pattern can render the same, e.g. dots or a checker turned by 90 degrees); an embedding that sees
    nothing gives zero cost."""
    w = config.World(image_size=32, seed=0, jitter=0.0, reference_size="target")
    out = near_miss_costs(lambda x: x.flatten(1), w, 64, np.random.default_rng(1))
    for field in world.SUBJECT_FIELDS:
        assert out[f"dino_near_miss_cost_{field}"] > 0, field
        assert out[f"dino_near_miss_true_closer_{field}"] > (0.4 if field == "pattern_angle" else 0.6), field
    blind = near_miss_costs(lambda x: torch.ones(len(x), 4), w, 16, np.random.default_rng(1))
    assert blind["dino_ref_target_cos"] > 0.999
    assert all(abs(blind[f"dino_near_miss_cost_{f}"]) < 1e-6 for f in world.SUBJECT_FIELDS)
