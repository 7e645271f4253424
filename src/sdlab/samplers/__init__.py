"""Samplers: flat no-grad loops over one denoiser, `model(x, sigma, **extra_args) -> denoised`.

The loops live by family: karras.py (Euler, Heun, DPM2, LMS), dpm_solver.py (DPM++ and UniPC),
ddpm.py (DDIM, DDPM, PLMS, LCM); common.py holds what they share. This file names them (the web UI's
names) and runs them for the pipelines.

Every sampler works in sigma space, `x = x0 + sigma * eps` (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", Sec. 2), takes a decreasing tensor of sigmas
(schedules.py) and never sees the UNet, the prediction type or guidance (denoisers.py, guidance.py).
Each calls `callback({"x", "i", "total", "sigma", "sigma_next", "denoised"})` once per step, before
the update. Stochastic samplers draw fresh noise from `noise_sampler(sigma, sigma_next) -> (B, C, h, w)`
so any tool's noise can be replayed; it defaults to `torch.randn_like`.

`sample()` is what pipelines call: it picks the schedule each sampler gets in diffusers with SD's
scheduler config (the "Automatic" schedule type) or the schedule type asked for (schedules.py),
scales the initial noise, runs the sampler and returns latents ready for the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from ..config import ScheduleConfig
from ..errors import InputError, UnknownSamplerError
from ..schedules import SCHEDULE_TYPES, ScheduleType, discrete_sigmas, get_sigmas, resolve_schedule
from .common import default_noise_sampler, get_ancestral_step, to_d
from .ddpm import sample_ddim, sample_ddpm, sample_lcm, sample_plms
from .dpm_solver import (
    sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_unipc,
)
from .karras import (
    lms_coefficient, sample_dpm_2, sample_dpm_2_ancestral, sample_euler, sample_euler_ancestral, sample_heun, sample_lms,
)


# -- registry and the pipelines' entry point ------------------------------------------------------

__all__ = [
    "SAMPLERS", "LEGACY_NAMES", "SamplerSpec", "chosen_schedule", "list_samplers", "resolve_sampler", "sample",
    "sampler_and_schedule_names", "sampler_sigmas", "default_noise_sampler", "get_ancestral_step", "to_d",
    "lms_coefficient", "sample_ddim", "sample_ddpm", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde", "sample_dpmpp_sde", "sample_euler",
    "sample_euler_ancestral", "sample_heun", "sample_lcm", "sample_lms", "sample_plms", "sample_unipc",
]


@dataclass(frozen=True)
class SamplerSpec:
    """A named sampler and the schedule diffusers gives it under SD's scheduler config."""

    name: str  # the web UI's display name
    aliases: tuple[str, ...]
    function: Callable
    spacing: str = "linspace"  # schedules.spaced_timesteps; diffusers' default for the matching scheduler
    schedule: str = "automatic"  # the schedule type it walks unless told: a legacy name's ("DPM++ 2M Karras")
    takes_schedule_types: bool = True  # False: it walks SD's DDPM timesteps only (DDIM, PLMS, DDPM)
    eta: Optional[float] = None  # the default eta of samplers that take one
    stochastic: bool = False  # draws noise every step
    vp: bool = False  # diffusers runs it on VP latents, so the initial noise is sqrt(sigma_max^2 + 1) wide
    ends_at_sigma_min: bool = False  # SD's `set_alpha_to_one: false`: stops at the table's smallest sigma
    quantize: bool = False  # diffusers feeds the UNet integer timesteps (Denoiser(quantize=...))


# diffusers' multistep solvers (DPMSolverMultistep, UniPC): rounded timesteps ending in sigma 0, VP latents
_MULTISTEP = dict(spacing="sgm_uniform", vp=True, quantize=True)
_SPECS = [
    SamplerSpec("Euler", ("euler",), sample_euler),
    SamplerSpec("Euler a", ("euler_a", "euler_ancestral"), sample_euler_ancestral, eta=1.0, stochastic=True),
    SamplerSpec("Heun", ("heun",), sample_heun),
    SamplerSpec("DPM2", ("dpm2", "dpm_2"), sample_dpm_2),
    SamplerSpec("DPM2 a", ("dpm2_a", "dpm_2_ancestral"), sample_dpm_2_ancestral, eta=1.0, stochastic=True),
    SamplerSpec("DPM++ 2M", ("dpmpp_2m",), sample_dpmpp_2m, **_MULTISTEP),
    SamplerSpec("DPM++ SDE", ("dpmpp_sde",), sample_dpmpp_sde, eta=1.0, stochastic=True),
    SamplerSpec("DPM++ 2M SDE", ("dpmpp_2m_sde",), sample_dpmpp_2m_sde, eta=1.0, stochastic=True, **_MULTISTEP),
    SamplerSpec("DPM++ 3M SDE", ("dpmpp_3m_sde",), sample_dpmpp_3m_sde, eta=1.0, stochastic=True, **_MULTISTEP),
    SamplerSpec("DPM++ 2S a", ("dpmpp_2s_a", "dpmpp_2s_ancestral"), sample_dpmpp_2s_ancestral, eta=1.0,
                stochastic=True),
    SamplerSpec("LMS", ("lms",), sample_lms),
    SamplerSpec("DDIM", ("ddim",), sample_ddim, spacing="leading", takes_schedule_types=False, eta=0.0,
                stochastic=True, vp=True, ends_at_sigma_min=True),
    SamplerSpec("PLMS", ("plms", "pndm"), sample_plms, spacing="leading", takes_schedule_types=False, vp=True,
                ends_at_sigma_min=True),
    SamplerSpec("DDPM", ("ddpm",), sample_ddpm, spacing="leading", takes_schedule_types=False, stochastic=True,
                vp=True),
    SamplerSpec("UniPC", ("unipc", "uni_pc"), sample_unipc, **_MULTISTEP),
    SamplerSpec("LCM", ("lcm",), sample_lcm, spacing="lcm", stochastic=True, vp=True),
]
SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}
_BY_KEY = {key.lower(): spec for spec in _SPECS for key in (spec.name, *spec.aliases)}
# sampler + schedule names that sdlab listed before schedule types; any "<sampler> <schedule>" resolves
LEGACY_NAMES = ("DPM++ 2M Karras", "DPM++ SDE Karras", "LMS Karras")


def list_samplers() -> list[tuple[str, tuple[str, ...]]]:
    """(display name, aliases) of every sampler, then the legacy sampler + schedule names still accepted."""
    legacy = [(name, (f"{spec.aliases[0]}_{kind.key}",)) for name in LEGACY_NAMES
              for spec, kind in [_split_schedule_suffix(name)]]
    return [(spec.name, spec.aliases) for spec in _SPECS] + legacy


def _split_schedule_suffix(name: str) -> Optional[tuple[SamplerSpec, ScheduleType]]:
    """("DPM++ 2M", Karras) for "DPM++ 2M Karras" or "dpmpp_2m_karras", as the web UI reads old infotexts."""
    lowered = name.lower()
    for kind in SCHEDULE_TYPES[1:]:
        for suffix in {kind.key, kind.key.replace("-", "_"), kind.label, *kind.aliases}:
            for separator in (" ", "_"):
                if lowered.endswith(separator + suffix.lower()):
                    spec = _BY_KEY.get(lowered[: -len(suffix) - 1].strip())
                    if spec is not None and spec.takes_schedule_types:
                        return spec, kind
    return None


def resolve_sampler(name) -> SamplerSpec:
    """The sampler called `name` (display name or alias, any case); a SamplerSpec passes through.

    A sampler name followed by a schedule type ("DPM++ 2M Karras", "euler_exponential"), the web UI's
    names before 1.9, gives that sampler walking that schedule, under the combined name."""
    if isinstance(name, SamplerSpec):
        return name
    spec = _BY_KEY.get(str(name).strip().lower())
    if spec is not None:
        return spec
    split = _split_schedule_suffix(str(name).strip())
    if split is not None:
        spec, kind = split
        return replace(spec, name=f"{spec.name} {kind.label}", aliases=(), schedule=kind.key)
    known = "; ".join(f"{s.name} ({', '.join(s.aliases)})" for s in _SPECS)
    raise UnknownSamplerError(f"unknown sampler '{name}'; choose one of: {known} "
                              "(a schedule type may follow the name: 'DPM++ 2M Karras')")


def chosen_schedule(sampler, schedule_type=None, karras: Optional[bool] = None) -> ScheduleType:
    """The schedule type `sampler` walks: `schedule_type` (a name, see schedules.resolve_schedule), else the
    one a legacy name carries, else the sampler's own ("Automatic"). `karras` is the older switch."""
    spec = resolve_sampler(sampler)
    kind = resolve_schedule(schedule_type)
    if karras is not None:
        if kind.function is not None:
            raise InputError(f"give either a schedule type ({kind.label}) or karras, not both")
        kind = resolve_schedule("karras" if karras else "automatic")
    elif kind.function is None:
        kind = resolve_schedule(spec.schedule)
    if kind.function is not None and not spec.takes_schedule_types:
        takes = ", ".join(s.name for s in _SPECS if s.takes_schedule_types)
        raise InputError(f"{spec.name} walks SD's own timesteps and has no {kind.label} schedule; "
                         f"schedule types work with: {takes}")
    return kind


def sampler_and_schedule_names(sampler, schedule_type=None, karras: Optional[bool] = None) -> tuple[str, str]:
    """("DPM++ 2M", "Karras"): the web UI's `Sampler:` and `Schedule type:` fields for a run.

    Also how to read an infotext: `sampler_and_schedule_names(fields["Sampler"], fields.get("Schedule
    type"))` splits an old "DPM++ 2M Karras" into ("DPM++ 2M", "Karras"), as the web UI does."""
    spec = resolve_sampler(sampler)
    base = SAMPLERS.get(spec.name) or _split_schedule_suffix(spec.name)[0]
    return base.name, chosen_schedule(spec, schedule_type, karras).label


def sampler_sigmas(sampler, schedule: ScheduleConfig, steps: int, karras: Optional[bool] = None,
                   schedule_type=None) -> torch.Tensor:
    """(steps + 1,) the sigmas `sampler` walks for `steps` steps: the schedule type asked for, or with
    "Automatic" the ones diffusers schedules for SD with the sampler's scheduler."""
    spec = resolve_sampler(sampler)
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    kind = chosen_schedule(spec, schedule_type, karras)
    if kind.function is not None:
        return kind.function(schedule, steps)
    final_sigma = discrete_sigmas(schedule)[0].item() if spec.ends_at_sigma_min else 0.0
    return get_sigmas(schedule, steps, spec.spacing, final_sigma)


@torch.no_grad()
def sample(
    sampler,
    model,
    noise: torch.Tensor,
    schedule: ScheduleConfig,
    steps: int,
    *,
    step_noise: Optional[Callable[[], torch.Tensor]] = None,
    noise_sampler: Optional[Callable] = None,
    callback: Optional[Callable[[dict], None]] = None,
    eta: Optional[float] = None,
    karras: Optional[bool] = None,
    start_step: int = 0,
    init_latents: Optional[torch.Tensor] = None,
    schedule_type=None,
) -> torch.Tensor:
    """Run `sampler` (a name or SamplerSpec) from standard-normal `noise` (B, C, h, w) to clean latents.

    `model(x, sigma) -> denoised`: a Denoiser, usually inside a CFGDenoiser. Build the Denoiser with
    `quantize=resolve_sampler(sampler).quantize` to feed the UNet the timesteps diffusers feeds it.

    Initial latents: the noise times diffusers' `init_noise_sigma` for the same scheduler, sigma_max
    for the k-samplers (their "linspace" spacing; k-diffusion does the same) and sqrt(sigma_max^2 + 1)
    for DDIM, PLMS, DDPM, LCM and the multistep solvers (DPM++ 2M, 2M SDE, 3M SDE, UniPC), which
    diffusers runs on VP latents x / sqrt(sigma^2 + 1).
    img2img: `init_latents` (B, C, h, w) are noised to the first sigma used, `init + sigma * noise`
    (diffusers' `add_noise`, in either space), and `start_step` skips that many steps of the schedule.

    `step_noise() -> (B, C, h, w)` gives each stochastic step's standard-normal noise (default
    torch.randn_like); `noise_sampler(sigma, sigma_next)`, e.g. a Brownian tree, replaces it.
    `eta` (the ancestral and SDE samplers, DDIM) defaults to the sampler's own. `schedule_type` (a
    schedules.SCHEDULE_TYPES name: "karras", "Exponential" ...) replaces the sampler's schedule; None or
    "automatic" keeps it (a legacy name's, else diffusers'); `karras=True` is the older "karras".
    `callback` gets the step dict of every step (module docstring).

    Returns VP latents x / sqrt(sigma_last^2 + 1), ready for the VAE: x itself when the schedule ends
    at 0; DDIM and PLMS stop at the smallest trained sigma, as diffusers' do for SD.
    """
    spec = resolve_sampler(sampler)
    sigmas = sampler_sigmas(spec, schedule, steps, karras, schedule_type).to(noise.device)
    if not isinstance(start_step, int) or not 0 <= start_step < steps:
        raise InputError(f"start_step must be an integer from 0 to {steps - 1}, got {start_step!r}")
    sigmas = sigmas[start_step:]
    if init_latents is not None:
        x = init_latents.to(noise) + noise * sigmas[0]
    elif start_step:
        raise InputError("starting part-way (start_step > 0) needs init_latents to noise")
    else:
        x = noise * ((sigmas[0] ** 2 + 1) ** 0.5 if spec.vp else sigmas[0])
    kwargs = {}
    if eta is not None and not eta >= 0:
        raise InputError(f"eta must be 0 or more (0: deterministic, 1: full ancestral noise), got {eta!r}")
    if spec.eta is not None:
        kwargs["eta"] = spec.eta if eta is None else float(eta)
    elif eta is not None:
        takes_eta = ", ".join(s.name for s in _SPECS if s.eta is not None)
        raise InputError(f"{spec.name} takes no eta; eta works with: {takes_eta}")
    if spec.stochastic:
        if noise_sampler is None and step_noise is not None:
            noise_sampler = lambda sigma, sigma_next: step_noise().to(noise)  # noqa: E731
        kwargs["noise_sampler"] = noise_sampler
    x = spec.function(model, x, sigmas, callback=callback, **kwargs)
    return x / (sigmas[-1] ** 2 + 1) ** 0.5
