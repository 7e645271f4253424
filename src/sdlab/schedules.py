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

A schedule type (the web UI's "Schedule type" since 1.9) replaces that choice by a named one:
`resolve_schedule("karras").function(config, steps)`; "Automatic" keeps each sampler's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .config import ScheduleConfig
from .errors import InputError

SPACINGS = ("linspace", "leading", "trailing", "sgm_uniform", "lcm")
LCM_ORIGINAL_STEPS = 50  # the timesteps LCM was distilled on: every 20th, 999 down to 19 (Luo et al. 2023, Sec. 4.2)


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
    - "lcm": `steps` of the 50 timesteps LCM was distilled on (999, 979, ..., 19), evenly by index
      (diffusers' LCMScheduler: 4 steps visit 999, 759, 499, 259).
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
    if spacing == "lcm":
        if steps > LCM_ORIGINAL_STEPS:
            raise InputError(f"LCM takes at most {LCM_ORIGINAL_STEPS} steps (the timesteps it was distilled on), "
                             f"got {steps}; 2 to 8 is usual")
        distilled = (np.arange(LCM_ORIGINAL_STEPS, 0, -1) * (n // LCM_ORIGINAL_STEPS) - 1).astype(np.float64)
        return distilled[np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, steps, endpoint=False)).astype(np.int64)]
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



def exponential_sigmas(config: ScheduleConfig, steps: int) -> torch.Tensor:
    """(steps + 1,) sigmas evenly spaced in log sigma over the trained range, then 0 (k-diffusion's
    get_sigmas_exponential, diffusers' use_exponential_sigmas)."""
    table = discrete_sigmas(config)
    sigmas = np.exp(np.linspace(np.log(table[-1].item()), np.log(table[0].item()), steps))
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def _log_interpolated_sigmas(config: ScheduleConfig, t: np.ndarray) -> torch.Tensor:
    """sigma at fractional timesteps t, interpolating log sigma (k-diffusion's DiscreteSchedule.t_to_sigma)."""
    log_table = discrete_sigmas(config).double().log().numpy()
    return torch.from_numpy(np.exp(np.interp(t, np.arange(log_table.shape[0]), log_table))).float()


def normal_sigmas(config: ScheduleConfig, steps: int) -> torch.Tensor:
    """(steps + 1,) sigmas at `steps` timesteps evenly from T-1 to 0, then 0: the web UI's "Normal".

    The same timesteps as "linspace" (the Euler family's Automatic, "Uniform"); the web UI interpolates
    log sigma between them where diffusers interpolates sigma, a difference under 1e-5 relative."""
    t = np.linspace(config.num_train_timesteps - 1, 0, steps)
    return torch.cat([_log_interpolated_sigmas(config, t), torch.zeros(1)])


def sgm_uniform_sigmas(config: ScheduleConfig, steps: int) -> torch.Tensor:
    """(steps + 1,) sigmas at steps + 1 timesteps evenly from T-1 to 0 without the last, then 0.

    sgm's and the web UI's "SGM Uniform": the step into sigma = 0 takes the place of t = 0. Unrounded;
    diffusers' DPM-Solver rounds these timesteps ("sgm_uniform" spacing, DPM++ 2M's Automatic)."""
    t = np.linspace(config.num_train_timesteps - 1, 0, steps + 1)[:-1]
    return torch.cat([_log_interpolated_sigmas(config, t), torch.zeros(1)])


def simple_sigmas(config: ScheduleConfig, steps: int) -> torch.Tensor:
    """(steps + 1,) every (T / steps)-th table sigma from the top, then 0 (ComfyUI's and the web UI's "Simple")."""
    table = discrete_sigmas(config)
    stride = table.shape[0] / steps
    return torch.cat([table[[-(1 + int(i * stride)) for i in range(steps)]], torch.zeros(1)])


def ddim_uniform_sigmas(config: ScheduleConfig, steps: int) -> torch.Tensor:
    """(steps + 1,) the table sigmas at SD's DDIM timesteps (every T // steps-th from t = 1), then 0.

    The web UI's "DDIM" walks t = 1, 1 + T // steps, ... up to T - 1, which is one step more than asked
    when T // steps does not fill T (7 steps visit 8 timesteps); we keep the `steps` that "leading"
    spacing gives, identical whenever the web UI's count is right (10, 20, 25, 50 steps ...)."""
    return get_sigmas(config, steps, "leading")


def _beta_quantiles(p: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """The quantile function of the Beta(alpha, beta) distribution at probabilities p.

    With x = sin^2(theta) the density x^(alpha-1) (1-x)^(beta-1) dx becomes the bounded
    2 sin^(2 alpha - 1)(theta) cos^(2 beta - 1)(theta) dtheta (alpha, beta >= 1/2), whose cumulative
    trapezoid sum on a fine grid is inverted by interpolation: 1e-6 accurate, no scipy needed."""
    theta = np.linspace(0.0, np.pi / 2, 400_001)
    density = np.sin(theta) ** (2 * alpha - 1) * np.cos(theta) ** (2 * beta - 1)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    return np.sin(np.interp(p, cdf / cdf[-1], theta)) ** 2


def beta_sigmas(config: ScheduleConfig, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """(steps + 1,) sigma_min + q (sigma_max - sigma_min) at the Beta(alpha, beta) quantiles q of evenly
    spaced probabilities from 1 to 0, then 0 (Lee et al. 2024, "Beta Sampling is All You Need"; the
    web UI's "Beta" and diffusers' use_beta_sigmas, both with alpha = beta = 0.6). Small alpha and beta
    put the steps at both ends of the range, where the paper finds the image changes most."""
    if alpha < 0.5 or beta < 0.5:
        raise InputError(f"the Beta schedule needs alpha and beta of at least 0.5, got {alpha} and {beta}")
    table = discrete_sigmas(config)
    sigma_min, sigma_max = table[0].item(), table[-1].item()
    quantiles = _beta_quantiles(1 - np.linspace(0, 1, steps), alpha, beta)
    return torch.cat([torch.from_numpy(sigma_min + quantiles * (sigma_max - sigma_min)).float(), torch.zeros(1)])


# Sabour et al. 2024, "Align Your Steps": the 10-step schedule optimised for SD 1.5 (NVIDIA's how-to page)
AYS_SD15_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def align_your_steps_sigmas(config: ScheduleConfig, steps: int) -> torch.Tensor:
    """(steps + 1,) the Align Your Steps schedule for SD 1.5, ending in 0.

    10 steps walk the published sigmas with the last (the table's smallest, 0.029) replaced by 0, as
    NVIDIA's how-to, diffusers' AysSchedules and ComfyUI use them; other step counts interpolate the
    11 published values log-linearly to steps + 1 (the paper's recipe). The web UI instead interpolates
    to `steps` values and appends 0. The list is for SD 1.5's schedule; `config` is not consulted."""
    published = np.log(np.array(AYS_SD15_SIGMAS[::-1]))
    log_sigmas = np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, len(published)), published)
    sigmas = torch.from_numpy(np.exp(log_sigmas)[::-1].copy()).float()
    sigmas[-1] = 0.0
    return sigmas


def uniform_sigmas(config: ScheduleConfig, steps: int) -> torch.Tensor:
    """(steps + 1,) sigmas at `steps` timesteps evenly from T-1 to 0, then 0: k-diffusion's get_sigmas and
    the web UI's "Uniform", the Euler family's own schedule ("linspace" spacing)."""
    return get_sigmas(config, steps, "linspace")


# -- schedule types, by the web UI's names ---------------------------------------------------------


@dataclass(frozen=True)
class ScheduleType:
    """A named way of choosing the sigmas, whatever the sampler."""

    key: str  # the CLI's name (`--schedule karras`)
    label: str  # the web UI's display name, the PNG's "Schedule type"
    function: Optional[Callable[[ScheduleConfig, int], torch.Tensor]]  # None: the sampler's own ("Automatic")
    aliases: tuple[str, ...] = ()


SCHEDULE_TYPES = [
    ScheduleType("automatic", "Automatic", None),
    ScheduleType("uniform", "Uniform", uniform_sigmas),
    ScheduleType("karras", "Karras", karras_sigmas),
    ScheduleType("exponential", "Exponential", exponential_sigmas),
    ScheduleType("sgm-uniform", "SGM Uniform", sgm_uniform_sigmas, ("sgm_uniform", "SGMUniform")),
    ScheduleType("simple", "Simple", simple_sigmas),
    ScheduleType("normal", "Normal", normal_sigmas),
    ScheduleType("ddim-uniform", "DDIM", ddim_uniform_sigmas, ("ddim_uniform",)),
    ScheduleType("beta", "Beta", beta_sigmas),
    ScheduleType("align-your-steps", "Align Your Steps", align_your_steps_sigmas, ("align_your_steps", "ays")),
]
_SCHEDULES_BY_KEY = {name.lower(): kind for kind in SCHEDULE_TYPES for name in (kind.key, kind.label, *kind.aliases)}


def list_schedules() -> list[tuple[str, str]]:
    """(CLI name, display name) of every schedule type, in the web UI's order."""
    return [(kind.key, kind.label) for kind in SCHEDULE_TYPES]


def resolve_schedule(name) -> ScheduleType:
    """The schedule type called `name` (CLI name, display name or alias, any case; None: Automatic)."""
    if isinstance(name, ScheduleType):
        return name
    kind = _SCHEDULES_BY_KEY.get("automatic" if name is None else str(name).strip().lower())
    if kind is None:
        known = ", ".join(f"{kind.key} ({kind.label})" for kind in SCHEDULE_TYPES)
        raise InputError(f"unknown schedule type '{name}'; choose one of: {known}")
    return kind
