"""Schedules: SD's discrete sigmas, sigma <-> timestep, step selections (diffusers is the oracle)."""

import numpy as np
import pytest
import torch
import scipy.stats
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.schedulers.scheduling_utils import AysSchedules

from sdlab.config import ScheduleConfig
from sdlab.errors import InputError
from sdlab.schedules import (
    AYS_SD15_SIGMAS, SCHEDULE_TYPES, _beta_quantiles, align_your_steps_sigmas, alphas_cumprod, beta_sigmas,
    ddim_uniform_sigmas, discrete_sigmas, exponential_sigmas, get_sigmas, get_sigmas_karras, karras_sigmas,
    list_schedules, normal_sigmas, resolve_schedule, sgm_uniform_sigmas, sigma_to_t, simple_sigmas, spaced_timesteps,
    t_to_sigma, uniform_sigmas,
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


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_spacing_is_lcm_schedulers_timesteps(steps):
    lcm = LCMScheduler(**SD_DIFFUSERS)
    lcm.set_timesteps(steps)
    assert np.array_equal(spaced_timesteps(SD, steps, "lcm"), lcm.timesteps.numpy())
    with pytest.raises(InputError, match="at most 50"):
        spaced_timesteps(SD, 51, "lcm")


# -- schedule types --------------------------------------------------------------------------------

WEB_UI_SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform", "Simple", "Normal", "DDIM", "Beta",
                    "Align Your Steps"]


def test_schedule_types_are_the_web_uis_with_cli_names():
    assert [label for _, label in list_schedules()] == WEB_UI_SCHEDULES
    assert [key for key, _ in list_schedules()] == [
        "automatic", "uniform", "karras", "exponential", "sgm-uniform", "simple", "normal", "ddim-uniform", "beta",
        "align-your-steps"]


@pytest.mark.parametrize("name, key", [
    ("karras", "karras"), ("Karras", "karras"), ("SGM Uniform", "sgm-uniform"), ("sgm_uniform", "sgm-uniform"),
    ("DDIM", "ddim-uniform"), ("ddim_uniform", "ddim-uniform"), ("Align Your Steps", "align-your-steps"),
    ("ays", "align-your-steps"), (" BETA ", "beta"), (None, "automatic"),
])
def test_schedule_names_resolve_case_insensitively(name, key):
    assert resolve_schedule(name).key == key


def test_unknown_schedule_type_is_an_input_error_listing_them():
    with pytest.raises(InputError) as error:
        resolve_schedule("cosine")
    assert all(label in str(error.value) for label in WEB_UI_SCHEDULES)


@pytest.mark.parametrize("kind", SCHEDULE_TYPES[1:], ids=lambda kind: kind.key)
@pytest.mark.parametrize("steps", [1, 7, 10, 30])
def test_every_schedule_type_decreases_to_zero(kind, steps):
    sigmas = kind.function(SD, steps)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32
    assert sigmas[-1] == 0 and torch.all(sigmas.diff() < 0)
    assert sigmas[0] <= discrete_sigmas(SD)[-1] + 1e-3


@pytest.mark.parametrize("steps", [5, 10, 25])
@pytest.mark.parametrize("option, ours", [
    ("use_karras_sigmas", karras_sigmas), ("use_exponential_sigmas", exponential_sigmas),
    ("use_beta_sigmas", beta_sigmas),
])
def test_karras_exponential_and_beta_are_diffusers_sigma_options(steps, option, ours):
    euler = EulerDiscreteScheduler(**SD_DIFFUSERS, **{option: True})
    euler.set_timesteps(steps)
    assert torch.allclose(ours(SD, steps), euler.sigmas, rtol=1e-6, atol=2e-6)


def test_beta_quantiles_are_scipys():
    p = np.linspace(0, 1, 101)
    for a, b in ((0.6, 0.6), (0.5, 0.5), (2.0, 0.7)):
        assert np.allclose(_beta_quantiles(p, a, b), scipy.stats.beta.ppf(p, a, b), atol=1e-6)
    with pytest.raises(InputError, match="at least 0.5"):
        beta_sigmas(SD, 10, alpha=0.3)


def test_uniform_is_the_euler_familys_own_and_normal_its_log_interpolated_twin():
    table = discrete_sigmas(SD)
    assert torch.equal(uniform_sigmas(SD, 12), get_sigmas(SD, 12, "linspace"))
    t = np.linspace(999, 0, 12)
    expected = np.exp(np.interp(t, np.arange(1000), table.double().log().numpy()))
    assert np.allclose(normal_sigmas(SD, 12)[:-1].numpy(), expected, rtol=1e-6)
    assert torch.allclose(normal_sigmas(SD, 12), uniform_sigmas(SD, 12), rtol=1e-4)


@pytest.mark.parametrize("steps", [4, 10, 15])
def test_sgm_uniform_is_evenly_spaced_in_t_without_t0_and_rounds_to_dpm_solvers(steps):
    sigmas = sgm_uniform_sigmas(SD, steps)
    t = sigma_to_t(sigmas[:-1], SD)
    assert np.allclose(t.numpy(), np.linspace(999, 0, steps + 1)[:-1], atol=2e-3)
    assert np.array_equal(t.round().numpy(), spaced_timesteps(SD, steps, "sgm_uniform"))


@pytest.mark.parametrize("steps", [3, 10, 20, 30])
def test_simple_takes_every_nth_table_sigma_from_the_top(steps):
    table = discrete_sigmas(SD)
    expected = [table[999 - int(i * 1000 / steps)].item() for i in range(steps)]
    assert simple_sigmas(SD, steps)[:-1].tolist() == expected


@pytest.mark.parametrize("steps", [10, 20, 25, 50])
def test_ddim_uniform_is_the_web_uis_ddim_schedule_and_sds_ddim_timesteps(steps):
    table, stride = discrete_sigmas(SD), 1000 // steps
    web_ui = [table[t].item() for t in range(1, 1000, stride)][::-1] + [0.0]  # the web UI's loop
    assert ddim_uniform_sigmas(SD, steps).tolist() == web_ui
    ddim = DDIMScheduler(**SD_DIFFUSERS)
    ddim.set_timesteps(steps)
    assert torch.equal(ddim_uniform_sigmas(SD, steps)[:-1], table[ddim.timesteps])


def test_align_your_steps_at_10_steps_is_the_published_schedule():
    published = torch.tensor(AYS_SD15_SIGMAS[:-1] + (0.0,))
    assert torch.allclose(align_your_steps_sigmas(SD, 10), published, rtol=1e-6)
    assert torch.allclose(align_your_steps_sigmas(SD, 10), torch.tensor(AysSchedules["StableDiffusionSigmas"]))
    # 20 steps interpolate log-linearly: every other sigma is a published one, the rest their geometric means
    sigmas = align_your_steps_sigmas(SD, 20)
    assert torch.allclose(sigmas[:-1:2], torch.tensor(AYS_SD15_SIGMAS[:-1]), rtol=1e-6)
    assert torch.allclose(sigmas[1:-1:2], (sigmas[:-2:2] * sigmas[2::2].clamp(min=0.029)).sqrt(), rtol=1e-6)
