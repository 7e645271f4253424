"""Schedules: SD's discrete sigmas, sigma <-> timestep, step selections (diffusers is the oracle)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from sdlab.config import ScheduleConfig
from sdlab.errors import InputError
from sdlab.schedules import (
    alphas_cumprod, discrete_sigmas, get_sigmas, get_sigmas_karras, karras_sigmas, sigma_to_t, spaced_timesteps,
    t_to_sigma,
)

SD = ScheduleConfig()
SD_DIFFUSERS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1)


def test_discrete_schedule_is_sds_scaled_linear_schedule():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    a = np.cumprod(1 - betas)
    assert np.allclose(alphas_cumprod(SD).numpy(), a, rtol=1e-5)
    sigmas = discrete_sigmas(SD)
    assert sigmas.shape == (1000,)
    assert torch.all(sigmas[1:] > sigmas[:-1])
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=1e-4)


def test_discrete_schedule_is_bit_identical_to_diffusers():
    reference = EulerDiscreteScheduler(**SD_DIFFUSERS)
    assert torch.equal(alphas_cumprod(SD), reference.alphas_cumprod)


def test_sigma_to_t_gives_integer_timesteps_at_table_sigmas():
    t = torch.tensor([0, 1, 57, 500, 998, 999])
    assert torch.equal(sigma_to_t(discrete_sigmas(SD)[t], SD), t.float())


def test_sigma_to_t_interpolates_log_sigma_and_quantize_rounds():
    table = discrete_sigmas(SD)
    between = (table[100].log() * 0.75 + table[101].log() * 0.25).exp()
    assert sigma_to_t(between[None], SD).item() == pytest.approx(100.25, abs=1e-4)
    assert sigma_to_t(between[None], SD, quantize=True).item() == 100
    sigmas = torch.linspace(0.03, 14.6, 200)
    assert torch.all(sigma_to_t(sigmas, SD).diff() > 0)
    # outside the trained range the timestep clamps to the ends
    assert sigma_to_t(torch.tensor([1e-4, 100.0]), SD).tolist() == [0.0, 999.0]


def test_t_to_sigma_interpolates_sigma_linearly_like_diffusers():
    table = discrete_sigmas(SD)
    assert torch.equal(t_to_sigma(np.array([0.0, 10.0, 999.0]), SD), table[[0, 10, 999]])
    assert t_to_sigma(np.array([10.5]), SD).item() == pytest.approx(((table[10] + table[11]) / 2).item(), rel=1e-6)


@pytest.mark.parametrize("steps", [1, 7, 10, 20, 50])
def test_spacings_match_diffusers(steps):
    euler = EulerDiscreteScheduler(**SD_DIFFUSERS)
    euler.set_timesteps(steps)
    assert np.allclose(spaced_timesteps(SD, steps, "linspace"), euler.timesteps.numpy(), atol=1e-4)
    assert torch.allclose(get_sigmas(SD, steps, "linspace"), euler.sigmas, rtol=1e-6)
    for spacing in ("leading", "trailing"):
        ddim = DDIMScheduler(**SD_DIFFUSERS, timestep_spacing=spacing)
        ddim.set_timesteps(steps)
        assert np.array_equal(spaced_timesteps(SD, steps, spacing), ddim.timesteps.numpy())
    dpm = DPMSolverMultistepScheduler(**SD_DIFFUSERS)
    dpm.set_timesteps(steps)
    assert np.array_equal(spaced_timesteps(SD, steps, "sgm_uniform"), dpm.timesteps.numpy())
    assert torch.equal(get_sigmas(SD, steps, "sgm_uniform"), dpm.sigmas)


def test_leading_spacing_is_sds_ddim_timesteps():
    assert spaced_timesteps(SD, 50, "leading")[:3].tolist() == [981, 961, 941]
    assert spaced_timesteps(SD, 50, "leading")[-1] == 1


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "sgm_uniform"])
def test_sigmas_decrease_and_end_where_asked(spacing):
    sigmas = get_sigmas(SD, 12, spacing)
    assert sigmas.shape == (13,)
    assert sigmas[-1] == 0
    assert torch.all(sigmas.diff() < 0)
    sigma_min = discrete_sigmas(SD)[0].item()
    assert get_sigmas(SD, 12, spacing, final_sigma=sigma_min)[-1].item() == pytest.approx(sigma_min)


def test_karras_sigmas_follow_the_formula():
    sigma_min, sigma_max, rho, n = 0.0292, 14.6146, 7.0, 10
    sigmas = get_sigmas_karras(n, sigma_min, sigma_max, rho)
    i = torch.arange(n, dtype=torch.float64)
    expected = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    assert torch.allclose(sigmas[:-1].double(), expected, rtol=1e-6)
    assert sigmas[-1] == 0 and torch.all(sigmas.diff() < 0)


def test_karras_sigmas_span_the_trained_range_like_diffusers():
    sigmas = karras_sigmas(SD, 15)
    assert sigmas[0] == discrete_sigmas(SD)[-1] and sigmas[-2] == discrete_sigmas(SD)[0]
    euler = EulerDiscreteScheduler(**SD_DIFFUSERS, use_karras_sigmas=True)
    euler.set_timesteps(15)
    assert torch.equal(sigmas, euler.sigmas)


def test_bad_spacing_and_step_counts_are_input_errors():
    with pytest.raises(InputError, match="linspace"):
        spaced_timesteps(SD, 10, "cosine")
    for steps in (0, 1001, 2.5):
        with pytest.raises(InputError, match="steps"):
            spaced_timesteps(SD, steps, "linspace")
