"""Samplers: flat no-grad loops over one denoiser, `model(x, sigma, **extra_args) -> denoised`.

Every sampler works in sigma space, `x = x0 + sigma * eps` (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", Sec. 2), takes a decreasing tensor of sigmas
(schedules.py) and never sees the UNet, the prediction type or guidance (denoisers.py, guidance.py).
Each calls `callback({"x", "i", "total", "sigma", "sigma_next", "denoised"})` once per step, before
the update. Stochastic samplers draw fresh noise from `noise_sampler(sigma, sigma_next) -> (B, C, h, w)`
so any tool's noise can be replayed; it defaults to `torch.randn_like`.

`sample()` is what pipelines call: it picks the schedule each sampler gets in diffusers with SD's
scheduler config, scales the initial noise, runs the sampler and returns latents ready for the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from numpy.polynomial import Polynomial

from .config import ScheduleConfig
from .errors import InputError, UnknownSamplerError
from .schedules import discrete_sigmas, get_sigmas, karras_sigmas


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


def _report(callback, i: int, sigmas: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "total": len(sigmas) - 1, "sigma": sigmas[i], "sigma_next": sigmas[i + 1],
                  "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 with S_churn = 0)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas, x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, noise_sampler=None):
    """Euler down to sigma_down, then fresh noise up to sigma_next: the ancestral sampler ("Euler a")."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas, x, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Alg. 1); a plain Euler step into sigma = 0."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2) with lambda = -log sigma.

    The exponential integrator of x0 over one step, with x0 extrapolated linearly in lambda from
    this step's and the last step's denoised. First order on the first step and into sigma = 0.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            denoised_d = denoised
            if old_denoised is not None:
                r = (sigmas[i - 1].log() - sigmas[i].log()) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, eta=1.0, noise_sampler=None, r=0.5):
    """DPM-Solver++ SDE: a stochastic second-order step via the point r of the way in lambda = -log sigma.

    k-diffusion's `sample_dpmpp_sde` (Lu et al. 2022, with ancestral noise as in get_ancestral_step).
    Two model calls per step. k-diffusion draws the noise from a Brownian tree (torchsde) so it stays
    coherent across step counts; here any `noise_sampler(sigma, sigma_next)` plugs in.
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas, x, denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        s = t + (t_next - t) * r
        sigma_down, sigma_up = get_ancestral_step(sigma_fn(t), sigma_fn(s), eta)
        s_ = t_fn(sigma_down)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)) * sigma_up
        denoised_2 = model(x_2, sigma_fn(s) * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
        t_next_ = t_fn(sigma_down)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * sigma_up
    return x


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """The weight of d(sigma_{i-j}) in the linear multistep step from sigma_i to sigma_{i+1}.

    The integral over [sigma_i, sigma_{i+1}] of the Lagrange polynomial that is 1 at sigma_{i-j} and 0
    at the other nodes sigma_i, ..., sigma_{i-order+1}: Adams-Bashforth for uneven steps.
    """
    basis = Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, order=4):
    """Linear multistep in sigma over the last `order` derivatives (k-diffusion's LMS)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    nodes = sigmas.double().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas, x, denoised)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(nodes, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, eta=0.0, noise_sampler=None):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) in sigma space.

    Dividing x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s_t^2) eps + s_t z by sqrt(a_prev) gives
    x = x0 + sigma_down eps + sigma_up z (get_ancestral_step): eta = 0 is Euler's method on the ODE,
    eta = 1 DDPM's posterior. SD's DDIM stops at the table's smallest sigma, not 0.
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas, x, denoised)
        eps = to_d(x, sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = denoised + sigma_down * eps
        if eta and sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020, Alg. 2, eq. 7).

    Over any subsequence of timesteps its mean and variance (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)
    are DDIM's at eta = 1 (Song et al. 2021, Sec. 4.1), so the loop is DDIM's.
    """
    return sample_ddim(model, x, sigmas, extra_args, callback, eta=1.0, noise_sampler=noise_sampler)


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None):
    """Pseudo linear multistep (Liu et al. 2022, "PNDM", eq. 12) as SD runs it (`skip_prk_steps`).

    PNDM's transfer step is DDIM's at eta = 0, i.e. x + (sigma_next - sigma) eps in sigma space, with eps
    replaced by an Adams-Bashforth combination of the last four (equal weights for uneven steps, as in
    the paper). The first step, with no history, is Heun's (two model calls) instead of Runge-Kutta.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    history = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, sigmas, x, denoised)
        eps = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if not history and sigmas[i + 1] > 0:
            x_2 = x + eps * dt
            eps_prime = (eps + to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))) / 2
        elif len(history) == 0:
            eps_prime = eps
        elif len(history) == 1:
            eps_prime = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            eps_prime = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [eps])[-3:]
        x = x + eps_prime * dt
    return x


# -- registry and the pipelines' entry point ------------------------------------------------------


@dataclass(frozen=True)
class SamplerSpec:
    """A named sampler and the schedule diffusers gives it under SD's scheduler config."""

    name: str  # the web UI's display name
    aliases: tuple[str, ...]
    function: Callable
    spacing: str = "linspace"  # schedules.spaced_timesteps; diffusers' default for the matching scheduler
    karras: Optional[bool] = False  # Karras sigmas by default; None: this sampler has no Karras option
    eta: Optional[float] = None  # the default eta of samplers that take one
    stochastic: bool = False  # draws noise every step
    vp: bool = False  # diffusers runs it on VP latents, so the initial noise is sqrt(sigma_max^2 + 1) wide
    ends_at_sigma_min: bool = False  # SD's `set_alpha_to_one: false`: stops at the table's smallest sigma
    quantize: bool = False  # diffusers feeds the UNet integer timesteps (Denoiser(quantize=...))


_SPECS = [
    SamplerSpec("Euler", ("euler",), sample_euler),
    SamplerSpec("Euler a", ("euler_a", "euler_ancestral"), sample_euler_ancestral, eta=1.0, stochastic=True),
    SamplerSpec("Heun", ("heun",), sample_heun),
    SamplerSpec("DPM++ 2M", ("dpmpp_2m",), sample_dpmpp_2m, spacing="sgm_uniform", vp=True, quantize=True),
    SamplerSpec("DPM++ 2M Karras", ("dpmpp_2m_karras",), sample_dpmpp_2m, spacing="sgm_uniform", karras=True,
                vp=True, quantize=True),
    SamplerSpec("DPM++ SDE", ("dpmpp_sde",), sample_dpmpp_sde, eta=1.0, stochastic=True),
    SamplerSpec("DPM++ SDE Karras", ("dpmpp_sde_karras",), sample_dpmpp_sde, karras=True, eta=1.0, stochastic=True),
    SamplerSpec("LMS", ("lms",), sample_lms),
    SamplerSpec("LMS Karras", ("lms_karras",), sample_lms, karras=True),
    SamplerSpec("DDIM", ("ddim",), sample_ddim, spacing="leading", karras=None, eta=0.0, stochastic=True, vp=True,
                ends_at_sigma_min=True),
    SamplerSpec("PLMS", ("plms", "pndm"), sample_plms, spacing="leading", karras=None, vp=True, ends_at_sigma_min=True),
    SamplerSpec("DDPM", ("ddpm",), sample_ddpm, spacing="leading", karras=None, stochastic=True, vp=True),
]
SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}
_BY_KEY = {key.lower(): spec for spec in _SPECS for key in (spec.name, *spec.aliases)}


def list_samplers() -> list[tuple[str, tuple[str, ...]]]:
    """(display name, aliases) of every sampler, in the web UI's order."""
    return [(spec.name, spec.aliases) for spec in _SPECS]


def resolve_sampler(name) -> SamplerSpec:
    """The sampler called `name` (display name or alias, any case); a SamplerSpec passes through."""
    if isinstance(name, SamplerSpec):
        return name
    spec = _BY_KEY.get(str(name).strip().lower())
    if spec is None:
        known = "; ".join(f"{s.name} ({', '.join(s.aliases)})" for s in _SPECS)
        raise UnknownSamplerError(f"unknown sampler '{name}'; choose one of: {known}")
    return spec


def sampler_sigmas(sampler, schedule: ScheduleConfig, steps: int, karras: Optional[bool] = None) -> torch.Tensor:
    """(steps + 1,) the sigmas `sampler` walks for `steps` steps, as diffusers schedules them for SD."""
    spec = resolve_sampler(sampler)
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if karras and spec.karras is None:
        with_karras = ", ".join(s.name for s in _SPECS if s.karras is not None)
        raise InputError(f"{spec.name} has no Karras schedule; Karras sigmas work with: {with_karras}")
    if spec.karras if karras is None else karras:
        return karras_sigmas(schedule, steps)
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
) -> torch.Tensor:
    """Run `sampler` (a name or SamplerSpec) from standard-normal `noise` (B, C, h, w) to clean latents.

    `model(x, sigma) -> denoised`: a Denoiser, usually inside a CFGDenoiser. Build the Denoiser with
    `quantize=resolve_sampler(sampler).quantize` to feed the UNet the timesteps diffusers feeds it.

    Initial latents: the noise times diffusers' `init_noise_sigma` for the same scheduler, sigma_max
    for the k-samplers (their "linspace" spacing; k-diffusion does the same) and sqrt(sigma_max^2 + 1)
    for DDIM, PLMS, DDPM and DPM++ 2M, which diffusers runs on VP latents x / sqrt(sigma^2 + 1).
    img2img: `init_latents` (B, C, h, w) are noised to the first sigma used, `init + sigma * noise`
    (diffusers' `add_noise`, in either space), and `start_step` skips that many steps of the schedule.

    `step_noise() -> (B, C, h, w)` gives each stochastic step's standard-normal noise (default
    torch.randn_like); `noise_sampler(sigma, sigma_next)`, e.g. a Brownian tree, replaces it.
    `eta` (Euler a, DPM++ SDE, DDIM) defaults to the sampler's own; `karras` overrides its schedule.
    `callback` gets the step dict of every step (module docstring).

    Returns VP latents x / sqrt(sigma_last^2 + 1), ready for the VAE: x itself when the schedule ends
    at 0; DDIM and PLMS stop at the smallest trained sigma, as diffusers' do for SD.
    """
    spec = resolve_sampler(sampler)
    sigmas = sampler_sigmas(spec, schedule, steps, karras).to(noise.device)
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
