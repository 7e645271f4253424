"""The DPM-Solver family: exponential integrators in lambda = -log sigma, and UniPC.

Over a step from sigma to sigma_next (h = log(sigma / sigma_next)) the probability-flow ODE solves
exactly to x_next = (sigma_next / sigma) x + (1 - e^-h) x0 when the denoised x0 is constant (Lu et al.
2022, "DPM-Solver++", eq. 9); the solvers differ in how they estimate x0 along the step: from earlier
steps (multistep, "2M", "3M"), from an extra model call (singlestep, "2S", "SDE") or with a corrector
(UniPC). The SDE variants solve the reverse SDE instead, keeping e^-2h less of x and adding noise.
"""

from __future__ import annotations

import torch

from .common import default_noise_sampler, get_ancestral_step, report_step, to_d


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
        report_step(callback, i, sigmas, x, denoised)
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
        report_step(callback, i, sigmas, x, denoised)
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


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, eta=1.0, noise_sampler=None):
    """DPM-Solver++(2M) for the reverse SDE (Lu et al. 2022, "DPM-Solver++", eq. 18 and App. B), midpoint rule.

    With eta = 1 the step keeps (sigma_next / sigma) e^-h of x, takes (1 - e^-2h) of x0 (extrapolated
    from the last step's denoised, as DPM++ 2M) and adds sigma_next sqrt(1 - e^-2h) of fresh noise;
    eta = 0 is DPM++ 2M. diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, i, sigmas, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x - (-h - eta_h).expm1() * denoised
            if old_denoised is not None:
                x = x - 0.5 * (-h - eta_h).expm1() * (denoised - old_denoised) * (h / h_last)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-(-2 * eta_h).expm1()).sqrt()
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, eta=1.0, noise_sampler=None):
    """DPM-Solver++(3M) for the reverse SDE (Lu et al. 2022, "DPM-Solver++", App. B; k-diffusion's form).

    x0 is extrapolated in lambda from the last three denoised (first and second divided differences
    d1, d2), integrated against the exponential weights phi_2, phi_3 of h(1 + eta); the first two steps
    use what history there is. eta = 1 adds sigma_next sqrt(1 - e^-2h) of fresh noise, eta = 0 is the ODE.
    diffusers' `sde-dpmsolver++` of order 3 is this sampler but for the sign of phi_3's 0.5 in its third-order
    update, where the paper's coefficient vanishes as h -> 0 and diffusers' does not (tests/test_samplers.py).
    """
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, i, sigmas, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = (-h_eta).exp() * x - (-h_eta).expm1() * denoised
            phi_2 = (-h_eta).expm1() / h_eta + 1
            if h_2 is not None:
                d1_0, d1_1 = (denoised - denoised_1) * (h / h_1), (denoised_1 - denoised_2) * (h / h_2)
                r0, r1 = h_1 / h, h_2 / h
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) * (h / h_1)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-(-2 * h * eta).expm1()).sqrt()
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, noise_sampler=None):
    """DPM-Solver++(2S) (Lu et al. 2022, "DPM-Solver++", Alg. 1 with r = 1/2) down to sigma_down, then fresh
    noise up to sigma_next ("DPM++ 2S a"): x0 re-estimated at the midpoint in lambda, one extra call a step."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, i, sigmas, x, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            h = sigmas[i].log() - torch.as_tensor(sigma_down).log()
            sigma_mid = sigmas[i] * (-h / 2).exp()
            x_2 = (sigma_mid / sigmas[i]) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            x = (sigma_down / sigmas[i]) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def unic_weights(h: torch.Tensor, rks: list) -> torch.Tensor:
    """The UniC corrector's weights a_1..a_p for the divided differences at the ratios rks (the new point,
    1, last) of h: the solution of sum_k a_k r_k^(i-1) = i! phi_(i+1)(h) / B(h), i = 1..p, with
    B(h) = e^h - 1 ("bh2") and phi the exponential integrator's weights (Zhao et al. 2023, "UniPC", eq. 8)."""
    hh = -h
    b_h = hh.expm1()
    phi, factorial, rhs = hh.expm1() / hh - 1, 1, []
    for i in range(1, len(rks) + 1):
        rhs.append(phi * factorial / b_h)
        factorial *= i + 1
        phi = phi / hh - 1 / factorial
    rks = torch.stack([torch.as_tensor(r, dtype=h.dtype) for r in rks])
    return torch.linalg.solve(torch.stack([rks ** (i - 1) for i in range(1, len(rks) + 1)]), torch.stack(rhs))


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None):
    """UniPC, order 2, "bh2", x0 prediction (Zhao et al. 2023, "UniPC", Alg. 1-2; diffusers' default for SD).

    The predictor UniP-2 is DPM-Solver++(2M)'s step. The corrector UniC re-does the step just taken
    with the model's answer at its end, an answer the next step needs anyway: a higher order for no
    extra call. The model sees the uncorrected point; the next step starts from the corrected one.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    history, x_start = [], None  # (sigma, denoised) of the steps so far; where the last step started
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, i, sigmas, x, denoised)
        if history:  # UniC: correct the step from sigmas[i-1] to sigmas[i] with this step's denoised
            (sigma_0, m0), h = history[-1], sigmas[i - 1].log() - sigmas[i].log()
            rks, d1s = [], []
            if len(history) > 1:
                sigma_1, m1 = history[-2]
                rks.append((sigma_0.log() - sigma_1.log()) / h)
                d1s.append((m1 - m0) / rks[-1])
            weights = unic_weights(h, rks + [torch.ones_like(h)]) if rks else [0.5]
            correction = sum(w * d for w, d in zip(weights, d1s + [denoised - m0]))
            x = (sigmas[i] / sigma_0) * x_start - (-h).expm1() * (m0 + correction)
        history, x_start = (history + [(sigmas[i], denoised)])[-2:], x
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = sigmas[i].log() - sigmas[i + 1].log()
        denoised_d = denoised
        if len(history) > 1:  # UniP-2: DPM++ 2M's linear extrapolation of x0 in lambda
            r = (history[0][0].log() - sigmas[i].log()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * history[0][1]
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
    return x
