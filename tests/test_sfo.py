"""One SFO step on a tiny real model: the loss at initialisation, the SFT anchor, what moves and what does not."""
import math

import pytest
import torch

from pipeline import config, world
from pipeline.model import SubjectFlux, add_lora
from pipeline.stages.sfo import sample_t, sfo_step

TINY = config.Model(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                    axes_dims_rope=[4, 6, 6], text_dim=16, pooled_dim=16)


@pytest.fixture
def setup():
    model = SubjectFlux.build(TINY, 16, world.vocabulary(), seed=0)
    params = add_lora(model, "sfo", rank=4, alpha=4.0)
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    c = model.condition(refs, ["a small circle in the sky on the left"] * 3)
    x_pos, x_neg = torch.randn(3, 16, 48, generator=g), torch.randn(3, 16, 48, generator=g)
    t, eps = torch.rand(3, generator=g), torch.randn(3, 16, 48, generator=g)
    return model, params, c, x_pos, x_neg, t, eps


def test_loss_is_log2_at_init_and_the_sft_anchor_adds_the_positive_error(setup):
    model, _, c, x_pos, x_neg, t, eps = setup
    loss, stats = sfo_step(model, c, x_pos, x_neg, t, eps, config.Loss(beta=1000.0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["err_pos"].item() == pytest.approx(stats["ref_err_pos"].item(), rel=1e-6)
    anchored, _ = sfo_step(model, c, x_pos, x_neg, t, eps, config.Loss(beta=1000.0, sft_weight=0.5))
    assert anchored.item() == pytest.approx(math.log(2) + 0.5 * stats["err_pos"].item(), rel=1e-5)


def test_steps_lower_the_loss_and_touch_only_the_adapter(setup):
    model, params, c, x_pos, x_neg, t, eps = setup
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss, stats = sfo_step(model, c, x_pos, x_neg, t, eps, config.Loss(beta=1000.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert stats["implicit_acc"].item() == 1.0 and stats["reward_margin"].item() > 0
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_timestep_choices():
    g = torch.Generator().manual_seed(0)
    u = sample_t(config.Sfo(timesteps="uniform"), 100_000, g)
    ln = sample_t(config.Sfo(), 100_000, g)
    assert u.min() >= 0 and u.max() < 1 and u.std().item() == pytest.approx(1 / math.sqrt(12), abs=0.005)
    assert ln.std().item() < u.std().item()          # logit-normal concentrates on the middle


def test_micro_batches_accumulate_the_full_batch_gradient(setup):
    """sfo.micro_batch: chunks of pairs, each gradient scaled by its share, add up to the full batch's."""
    from pipeline.stages.sfo import sfo_backward
    model, params, c, x_pos, x_neg, t, eps = setup
    for p in params:                                   # a non-zero adapter, so the two passes differ from log 2
        torch.nn.init.normal_(p, std=0.02)
    grads = []
    for micro in (0, 2, 1):
        for p in params:
            p.grad = None
        stats = sfo_backward(model, c, x_pos, x_neg, t, eps, config.Loss(beta=1000.0), micro)
        grads.append([p.grad.clone() for p in params])
        if micro == 0:
            full = stats
        else:
            assert stats["pair_loss"].shape == (3,)
            assert stats["loss"].item() == pytest.approx(full["loss"].item(), rel=1e-3)   # beta 1000 amplifies float noise
            assert stats["implicit_acc"].item() == pytest.approx(full["implicit_acc"].item())
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3 * a.abs().max().item())
