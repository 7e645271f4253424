"""What every sampler shares: the ODE's derivative, the ancestral split of a step, the step report."""

from __future__ import annotations

from typing import Callable

import torch


def default_noise_sampler(x: torch.Tensor) -> Callable:
    return lambda sigma, sigma_next: torch.randn_like(x)


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step from sigma_from to sigma_to into a deterministic step to sigma_down and fresh noise sigma_up.

    sigma_up^2 = eta^2 sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 is DDIM's sigma_t (Song et al.
    2021, eq. 16) divided by sqrt(a_prev); sigma_down^2 + sigma_up^2 = sigma_to^2 keeps the noise level right.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def report_step(callback, i: int, sigmas: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> None:
    """Call `callback` with the step dict (samplers/__init__.py's docstring), if there is one."""
    if callback is not None:
        callback({"x": x, "i": i, "total": len(sigmas) - 1, "sigma": sigmas[i], "sigma_next": sigmas[i + 1],
                  "denoised": denoised})
