"""The SFT stage's per-sample choice of reference (stages/sft.py::pick_refs)."""
import dataclasses

import torch

from pipeline import config
from pipeline.stages.sft import pick_refs


def test_image_dropout_replaces_the_reference_with_the_black_image_and_draws_nothing_at_zero():
    refs = torch.arange(1.0, 65.0).reshape(64, 1)          # 64 references, each its own value
    blank = torch.tensor([-1.0])
    idx = torch.arange(64)
    base = dataclasses.replace(config.Sft(), ref_blur_prob=0.0)

    g = torch.Generator().manual_seed(0)
    assert torch.equal(pick_refs(refs, [], blank, idx, g, dataclasses.replace(base, image_dropout=0.0)), refs)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())      # nothing drawn

    assert (pick_refs(refs, [], blank, idx, g, dataclasses.replace(base, image_dropout=1.0)) == -1).all()

    out = pick_refs(refs, [], blank, idx, torch.Generator().manual_seed(1), dataclasses.replace(base, image_dropout=0.5))
    dropped = out[:, 0] == -1
    assert 16 <= int(dropped.sum()) <= 48
    assert torch.equal(out[~dropped], refs[~dropped])                                     # the rest untouched
