"""Flow matching as Wan uses it (DESIGN §2): x^t = (1 - t)·x + t·ε, velocity v = ε − x, x̂_0 = x^t − t·v.

Times are flow sigmas in [0, 1]; the transformer takes them as timesteps sigma·1000. The shift warps
sigmas toward the noisy end: sigma' = s·sigma / (1 + (s − 1)·sigma) (diffusers' `flow_shift`).
"""

from __future__ import annotations

from typing import Sequence

import torch


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def few_step_sigmas(steps: Sequence[int], shift: float) -> list[float]:
    """The student's sampling sigmas for a step list such as (1000, 750, 500, 250), ending at 0."""
    return [float(shift_sigma(t / 1000.0, shift)) for t in steps] + [0.0]


def add_noise(x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x^t for a sigma broadcastable to x (e.g. (B, 1, F, 1, 1) for per-chunk times)."""
    return (1 - sigma) * x + sigma * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x


def predict_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    return x_t - sigma * velocity


def euler_step(x_t: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One step of the probability-flow ODE dx/dsigma = v (Eq. 4) from sigma to sigma_next."""
    return x_t + (sigma_next - sigma) * velocity
