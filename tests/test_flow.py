"""The method's math pinned to hand-computed numbers (METHOD.md sections 2 and 4)."""
import math

import pytest
import torch

from pipeline import flow


def test_interpolation_endpoints_and_velocity():
    x, eps = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), -1.0)
    assert torch.equal(flow.interpolate(x, eps, torch.zeros(2)), x)
    assert torch.equal(flow.interpolate(x, eps, torch.ones(2)), eps)
    assert torch.allclose(flow.interpolate(x, eps, torch.tensor([0.25, 0.5]))[:, 0, 0], torch.tensor([1.25, 0.5]))
    assert torch.equal(flow.velocity_target(x, eps), torch.full_like(x, -3.0))


def test_per_sample_error_is_a_mean_over_tokens_and_channels():
    x, eps = torch.zeros(2, 2, 2), torch.ones(2, 2, 2)     # target v = 1 everywhere
    pred = torch.tensor([[[1.0, 1.0], [1.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert torch.allclose(flow.per_sample_error(pred, x, eps), torch.tensor([1.0, 1.0]))   # (0+0+0+4)/4, 4*1/4
    assert flow.flow_loss(pred, x, eps).item() == pytest.approx(1.0)


def test_sfo_loss_hand_computed():
    # delta_theta = 0.5 - 0.7 = -0.2, delta_ref = 0.6 - 0.6 = 0, margin = -10 * (-0.2 - 0) = 2
    loss, stats = flow.sfo_loss(torch.tensor([0.5]), torch.tensor([0.7]), torch.tensor([0.6]), torch.tensor([0.6]), 10.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)   # -log sigmoid(2) = 0.126928
    assert stats["reward_margin"].item() == pytest.approx(2.0)
    assert stats["implicit_acc"].item() == 1.0


def test_sfo_loss_is_log2_when_policy_equals_reference():
    e_pos, e_neg = torch.rand(8), torch.rand(8)
    loss, stats = flow.sfo_loss(e_pos, e_neg, e_pos.clone(), e_neg.clone(), 1000.0)
    assert loss.item() == pytest.approx(math.log(2.0))
    assert stats["implicit_acc"].item() == 0.0


def test_sfo_gradient_lowers_positive_error_and_raises_negative_error():
    e_pos, e_neg = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    loss, _ = flow.sfo_loss(e_pos, e_neg, torch.tensor([0.5]), torch.tensor([0.5]), 1000.0)
    loss.backward()
    assert e_pos.grad.item() > 0 and e_neg.grad.item() < 0          # descent: err(x+) down, err(x-) up
    assert e_pos.grad.item() == pytest.approx(1000.0 * 0.5)          # d/d err_pos = beta * sigmoid(-0) = beta/2
    assert e_neg.grad.item() == pytest.approx(-1000.0 * 0.5)


def test_logit_normal_moments():
    g = torch.Generator().manual_seed(0)
    t = flow.logit_normal(200_000, mu=0.5, sigma=0.8, generator=g)
    z = torch.logit(t.double())
    assert z.mean().item() == pytest.approx(0.5, abs=0.01)
    assert z.std().item() == pytest.approx(0.8, abs=0.01)
    t0 = flow.logit_normal(200_000, generator=g)
    assert t0.mean().item() == pytest.approx(0.5, abs=0.005) and 0 < t0.min() and t0.max() < 1


def test_time_grid_and_shift():
    assert torch.allclose(flow.time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = flow.time_grid(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert shifted[2].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))    # 0.75: more steps near noise
    assert torch.all(shifted[1:] < shifted[:-1])


def test_euler_is_exact_on_a_straight_path():
    x0, noise = torch.randn(3, 5), torch.randn(3, 5)
    out = flow.euler_sample(lambda x, t: noise - x0, noise, steps=7)   # the true velocity of the straight path
    assert torch.allclose(out, x0, atol=1e-5)


def test_guidance():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert flow.guided(c, u, 1.0).item() == 2.0
    assert flow.guided(c, u, 3.0).item() == 4.0
