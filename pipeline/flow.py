"""The method's math, as pure functions (METHOD.md sections 2 and 4). Shapes: B batch, N tokens, D channels.

Rectified flow: x_t = (1 - t) x + t eps, t in [0, 1], t = 1 is pure noise; the model predicts the velocity
v = eps - x. Sampling integrates dx/dt = v from t = 1 to t = 0 with Euler steps.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------------------------------------
def logit_normal(n: int, mu: float = 0.0, sigma: float = 1.0, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """t = sigmoid(z), z ~ N(mu, sigma^2): the training timesteps of OminiControl and SFO. Shape (n,)."""
    return torch.sigmoid(mu + sigma * torch.randn(n, generator=generator, device=device))


def uniform(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """t ~ U(0, 1), the ablation of the paper's Table C. Shape (n,)."""
    return torch.rand(n, generator=generator, device=device)


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Sampling times from 1 to 0, (steps + 1,), optionally shifted towards noise: t' = s t / (1 + (s - 1) t)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


# ---------------------------------------------------------------------------------------------------------
# Rectified-flow objective
# ---------------------------------------------------------------------------------------------------------
def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t eps, with t (B,) broadcast over the other dims."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * eps


def velocity_target(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x


def per_sample_error(pred: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """err(x) = mean over tokens and channels of (f(x_t) - (eps - x))^2. Shape (B,)."""
    return (pred.float() - velocity_target(x, eps).float()).pow(2).flatten(1).mean(1)


def flow_loss(pred: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L_SFT: the mean of the per-sample errors."""
    return per_sample_error(pred, x, eps).mean()


# ---------------------------------------------------------------------------------------------------------
# SFO (METHOD.md section 4, the paper's Eq. 3)
# ---------------------------------------------------------------------------------------------------------
def sfo_loss(err_pos: torch.Tensor, err_neg: torch.Tensor, ref_err_pos: torch.Tensor, ref_err_neg: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_SFO = -log sigmoid(-beta (delta_theta - delta_ref)), delta = err(x+) - err(x-), averaged over pairs.

    All errors are (B,) and computed with the same t and eps for the two images of a pair. Returns the loss
    and detached diagnostics: the per-pair losses (B,), implicit accuracy (fraction of pairs with delta_theta < delta_ref) and the
    reward margin -beta (delta_theta - delta_ref).
    """
    delta_theta = err_pos - err_neg
    delta_ref = ref_err_pos - ref_err_neg
    margin = -beta * (delta_theta - delta_ref)
    pair_loss = -F.logsigmoid(margin)
    loss = pair_loss.mean()
    with torch.no_grad():
        stats = {"loss": loss, "pair_loss": pair_loss, "implicit_acc": (margin > 0).float().mean(), "reward_margin": margin.mean(),
                 "err_pos": err_pos.mean(), "err_neg": err_neg.mean(),
                 "ref_err_pos": ref_err_pos.mean(), "ref_err_neg": ref_err_neg.mean()}
    return loss, {k: v.detach() for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------
def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 steps: int, shift: float = 1.0, grid: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0. `velocity` takes t as a (B,) tensor.
    `grid` (steps + 1 times from 1 to 0) replaces `time_grid(steps, shift)` (FLUX's scheduler sigmas)."""
    x = noise
    ts = (time_grid(steps, shift) if grid is None else grid).to(noise.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t.expand(x.shape[0]))
        x = x + (t_next - t) * v
    return x


def guided(cond_v: torch.Tensor, uncond_v: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + s (v_c - v_u); s = 1 returns the conditional velocity."""
    return uncond_v + scale * (cond_v - uncond_v)
