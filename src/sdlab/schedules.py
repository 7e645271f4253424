"""Noise schedules: SD's discrete DDPM schedule seen as noise levels sigma, and the step selections.

Stable Diffusion was trained on 1000 discrete timesteps t with `scaled_linear` betas (Ho et al. 2020,
with the betas of the CompVis `ldm` configs). Sampling works in the variance-exploding view of
Karras et al. 2022 ("Elucidating the Design Space", Sec. 2): a latent noised to timestep t is
`x_vp = sqrt(a_t) x0 + sqrt(1 - a_t) eps`, and `x = x_vp / sqrt(a_t) = x0 + sigma_t eps` with
`sigma_t = sqrt((1 - a_t) / a_t)`. Every schedule below is a 1-D tensor of sigmas, decreasing,
one more than the number of steps; the k-samplers' schedules end in 0.

Which timesteps a sampler visits is what diffusers calls `timestep_spacing` (Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2). Each sampler uses the
spacing that diffusers gives it with SD's scheduler config, so both produce the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ScheduleConfig
from .errors import InputError

SPACINGS = ("linspace", "leading", "trailing", "sgm_uniform")


def betas(config: ScheduleConfig) -> torch.Tensor:
    """(T,) betas, `scaled_linear`: linear in sqrt(beta). float32, as SD and diffusers compute them."""
    root = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps, dtype=torch.float32)
    return root**2


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """(T,) a_t = prod_{s<=t} (1 - beta_s): the signal fraction left at timestep t."""
    return torch.cumprod(1.0 - betas(config), dim=0)


def discrete_sigmas(config: ScheduleConfig) -> torch.Tensor:
    """(T,) sigma_t = sqrt((1 - a_t) / a_t), increasing with t (SD: 0.0292 at t=0 to 14.61 at t=999)."""
    a = alphas_cumprod(config)
    return ((1 - a) / a) ** 0.5


def sigma_to_t(sigma: torch.Tensor, config: ScheduleConfig, quantize: bool = False) -> torch.Tensor:
    """The continuous timestep of a noise level: linear interpolation of log sigma between table entries.

    This is k-diffusion's `DiscreteSchedule.sigma_to_t` and diffusers' `_sigma_to_t`; at a table sigma
    it returns that entry's integer t exactly. `quantize` rounds to the nearest integer timestep, which
    is what diffusers' DPMSolverMultistepScheduler feeds the UNet for Karras sigmas.
    """
    log_sigmas = discrete_sigmas(config).double().log().to(sigma.device)
    log_sigma = sigma.double().clamp(min=1e-10).log()
    last = log_sigmas.shape[0] - 2
    low = ((log_sigmas[None, :] <= log_sigma.reshape(-1, 1)).sum(dim=1) - 1).clamp(0, last).reshape(sigma.shape)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    t = (1 - w) * low + w * (low + 1)
    return (t.round() if quantize else t).float()


def t_to_sigma(t: torch.Tensor | np.ndarray, config: ScheduleConfig) -> torch.Tensor:
    """sigma at (possibly fractional) timesteps, interpolating sigma linearly between table entries.

    diffusers interpolates sigma itself (np.interp in EulerDiscreteScheduler.set_timesteps) where
    k-diffusion interpolates log sigma; at SD's table the two differ by under 1e-5 relative. We follow
    diffusers so the Euler-family schedules are the same numbers.
    """
    table = discrete_sigmas(config).double().numpy()
    t = np.asarray(t, dtype=np.float64)
    return torch.from_numpy(np.interp(t, np.arange(table.shape[0]), table)).float()


def spaced_timesteps(config: ScheduleConfig, steps: int, spacing: str = "linspace", steps_offset: int = 1) -> np.ndarray:
    """The (steps,) decreasing timesteps a sampler evaluates the model at, diffusers' way.

    - "linspace": evenly from T-1 down to 0, fractional (diffusers' Euler/Heun/LMS/DPM-SDE default).
    - "leading": multiples of T // steps plus `steps_offset` (DDIM/PNDM/DDPM default; SD's config
      sets steps_offset 1: 50 steps visit 981, 961, ..., 1).
    - "trailing": T - 1 down by T / steps, rounded (Lin et al. 2023).
    - "sgm_uniform": steps + 1 points evenly from T-1 to 0, rounded, the last (t=0) dropped because
      the sampler ends at sigma 0 there (diffusers' DPMSolverMultistepScheduler "linspace"; sgm and
      ComfyUI call the unrounded version sgm_uniform).
    """
    n = config.num_train_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= n:
        raise InputError(f"steps must be an integer from 1 to {n}, got {steps!r}")
    if spacing == "linspace":
        # float64 like DPMSolverSDEScheduler; the Euler family's float32 differs by 1e-7 relative, which
        # only a Brownian-tree noise sampler (Hölder-1/2 in its query times) would notice
        return np.linspace(0, n - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (n // steps))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)).astype(np.float64) - 1
    if spacing == "sgm_uniform":
        return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy()
    raise InputError(f"unknown timestep spacing '{spacing}'; choose one of: {', '.join(SPACINGS)}")


def get_sigmas(config: ScheduleConfig, steps: int, spacing: str = "linspace", final_sigma: float = 0.0) -> torch.Tensor:
    """(steps + 1,) sigmas at the spaced timesteps, then `final_sigma` where sampling stops.

    k-samplers stop at 0 (clean latents). DDIM and PLMS as SD configures them (`set_alpha_to_one`
    false) stop at the table's smallest sigma instead: pass `final_sigma=discrete_sigmas(config)[0]`.
    """
    sigmas = t_to_sigma(spaced_timesteps(config, steps, spacing), config)
    return torch.cat([sigmas, sigmas.new_tensor([final_sigma])])


def get_sigmas_karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(steps + 1,) noise levels of Karras et al. 2022, eq. 5, then 0.

    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho; rho = 7 spends
    more steps at low noise, where detail forms.
    """
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def karras_sigmas(config: ScheduleConfig, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras sigmas spanning the trained range: from sigma at t=T-1 down to sigma at t=0, then 0."""
    table = discrete_sigmas(config)
    return get_sigmas_karras(steps, table[0].item(), table[-1].item(), rho)

