"""Samplers born on SD's discrete DDPM timesteps: DDIM, DDPM, PLMS and LCM, written in sigma space.

Each was stated for VP latents x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps; dividing by sqrt(a_t) turns its
update into one on x = x0 + sigma eps (schedules.py), so they share the k-samplers' denoiser interface.
"""

from __future__ import annotations

import torch

from .common import default_noise_sampler, get_ancestral_step, report_step, to_d


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
        report_step(callback, i, sigmas, x, denoised)
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
        report_step(callback, i, sigmas, x, denoised)
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


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Latent Consistency Model sampling (Luo et al. 2023, "Latent Consistency Models", Alg. 3; Song et al.
    2023, "Consistency Models", Alg. 1): jump to the clean latents, noise them afresh to the next level.

    For LCM-distilled models, whose UNet maps any noise level straight to x0 in 2-8 steps. LCM's
    boundary scalings c_skip, c_out (its eq. 10 with timestep scaling 10) differ from 0 and 1 by under
    1e-5 at every timestep it visits, so the denoised is taken as it comes.
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, i, sigmas, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x
