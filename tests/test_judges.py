"""The embedded judges (stages/judges.py): the DINO stand-in's near-miss negatives, and the self-report of what one
identity error costs in the DINO measure."""
import math

import numpy as np
import torch

from pipeline import config, world
from pipeline.stages.judges import info_nce, near_miss_costs, near_misses


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


def test_near_misses_change_exactly_one_attribute_the_reader_scores():
    rng = np.random.default_rng(0)
    subjects = world.sample_subjects(rng, 300)
    changed = [[k for k in world.SUBJECT_FIELDS if getattr(s, k) != getattr(m, k)]
               for s, m in zip(subjects, near_misses(subjects, rng))]
    assert all(len(c) == 1 for c in changed)                         # one field, never an unscored one
    assert {c[0] for c in changed} == set(world.IDENTITY_ATTRS)      # every attribute the reader scores is drawn


def test_info_nce_negatives_count_against_each_positive():
    """Negatives that duplicate the positives make each a coin toss (+log 2 in that direction, half the symmetric
    loss); negatives opposite to every row change next to nothing."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=g).abs()           # every pair of rows at an acute angle
    b = a + 0.01 * torch.randn(16, 8, generator=g)
    plain = info_nce(a, b)
    assert abs(info_nce(a, b, negatives=-b) - plain) < 1e-3
    assert info_nce(a, b, negatives=b.clone()) > plain + math.log(2) / 2 - 1e-3
