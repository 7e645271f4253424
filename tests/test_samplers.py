"""Samplers, denoisers and guidance.

1. Parity: diffusers' scheduler loop and sdlab's sampler drive the SAME tiny random UNet from the same
   noise, text embeddings and per-step noise; final latents agree to 1e-3 (they reach |x| ~ 60 here).
2. Analytics: on Gaussian data x0 ~ N(mu, s^2) the exact denoiser is known, so every sampler must
   reproduce the data distribution and the ODE samplers the exact probability-flow solution.
3. The wrappers and the registry, as specifications.
"""

import inspect
import textwrap
import types

import pytest
import torch
from diffusers import (
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSDEScheduler, EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
    LCMScheduler, LMSDiscreteScheduler, PNDMScheduler, UNet2DConditionModel, UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
from torch import nn

from sdlab.config import ScheduleConfig
from sdlab.denoisers import Denoiser
from sdlab.errors import ConfigError, InputError, UnknownSamplerError
from sdlab.guidance import CFGDenoiser
from sdlab.samplers import (
    SAMPLERS, chosen_schedule, list_samplers, resolve_sampler, sample, sampler_and_schedule_names, sampler_sigmas,
)
from sdlab.schedules import alphas_cumprod, discrete_sigmas, karras_sigmas

SD = ScheduleConfig()
# SD 1.x's scheduler_config.json; each scheduler keeps its own default timestep_spacing, as in diffusers
SD_DIFFUSERS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1)
DDIM_LIKE = dict(clip_sample=False, set_alpha_to_one=False)
TOLERANCE = 1e-3
BATCH, GUIDANCE = 2, 7.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a UNet this small runs faster on one thread than two fighting over two cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    text_embeddings = torch.randn(BATCH, 7, 32, generator=generator)  # (B, L, D)
    uncond_embeddings = torch.randn(BATCH, 7, 32, generator=generator)
    noise = torch.randn(BATCH, 4, 8, 8, generator=generator)
    init_latents = torch.randn(BATCH, 4, 8, 8, generator=generator)
    return text_embeddings, uncond_embeddings, noise, init_latents


class DiffusersUNet(nn.Module):
    """A diffusers UNet behind the interface sdlab's Denoiser calls: `unet(x, t, crossattn=...)`."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, crossattn):
        return self.unet(x, t, encoder_hidden_states=crossattn).sample


@torch.no_grad()
def diffusers_loop(unet, inputs, scheduler, steps, guidance_scale=GUIDANCE, start_step=0, img2img=False, **step_kwargs):
    """StableDiffusionPipeline's (and StableDiffusionImg2ImgPipeline's) denoising loop."""
    text_embeddings, uncond_embeddings, noise, init_latents = inputs
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[start_step * scheduler.order:]
    if img2img:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start_step * scheduler.order)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1])
    else:
        latents = noise * scheduler.init_noise_sigma
    guided = guidance_scale != 1
    context = torch.cat([uncond_embeddings, text_embeddings]) if guided else text_embeddings
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = torch.Generator().manual_seed(5)
    for t in timesteps:
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=context).sample
        if guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
    return latents


@torch.no_grad()
def sdlab_loop(unet, inputs, sampler, steps, guidance_scale=GUIDANCE, prediction="epsilon", img2img=False, **kwargs):
    text_embeddings, uncond_embeddings, noise, init_latents = inputs
    spec = resolve_sampler(sampler)
    denoiser = Denoiser(DiffusersUNet(unet), SD, prediction, quantize=spec.quantize)
    model = CFGDenoiser(denoiser, text_embeddings, uncond_embeddings, guidance_scale)
    generator = torch.Generator().manual_seed(5)  # drawn from the same way diffusers' step() draws
    step_noise = lambda: torch.randn(noise.shape, generator=generator)  # noqa: E731
    init = init_latents if img2img else None
    return sample(spec, model, noise, SD, steps, step_noise=step_noise, init_latents=init, **kwargs)


PARITY = [  # (our sampler, diffusers scheduler, steps, our kwargs, diffusers step kwargs)
    ("Euler", lambda: EulerDiscreteScheduler(**SD_DIFFUSERS), 15, {}, {}),
    ("Euler", lambda: EulerDiscreteScheduler(**SD_DIFFUSERS, use_karras_sigmas=True), 10, {"karras": True}, {}),
    ("Euler a", lambda: EulerAncestralDiscreteScheduler(**SD_DIFFUSERS), 15, {}, {}),
    ("Heun", lambda: HeunDiscreteScheduler(**SD_DIFFUSERS), 10, {}, {}),
    ("Heun", lambda: HeunDiscreteScheduler(**SD_DIFFUSERS, use_karras_sigmas=True), 10, {"karras": True}, {}),
    ("DPM++ 2M", lambda: DPMSolverMultistepScheduler(**SD_DIFFUSERS, algorithm_type="dpmsolver++", solver_order=2),
     15, {}, {}),
    ("DPM++ 2M Karras", lambda: DPMSolverMultistepScheduler(
        **SD_DIFFUSERS, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True), 15, {}, {}),
    ("LMS", lambda: LMSDiscreteScheduler(**SD_DIFFUSERS), 15, {}, {}),
    ("LMS Karras", lambda: LMSDiscreteScheduler(**SD_DIFFUSERS, use_karras_sigmas=True), 10, {}, {}),
    ("DDIM", lambda: DDIMScheduler(**SD_DIFFUSERS, **DDIM_LIKE), 15, {}, {}),
    ("DDIM", lambda: DDIMScheduler(**SD_DIFFUSERS, **DDIM_LIKE), 15, {"eta": 0.7}, {"eta": 0.7}),
    ("PLMS", lambda: PNDMScheduler(**SD_DIFFUSERS, skip_prk_steps=True, set_alpha_to_one=False), 15, {}, {}),
    ("DDPM", lambda: DDPMScheduler(**SD_DIFFUSERS, clip_sample=False), 15, {}, {}),
    ("DPM2", lambda: KDPM2DiscreteScheduler(**SD_DIFFUSERS), 10, {}, {}),
    ("DPM2 a", lambda: KDPM2AncestralDiscreteScheduler(**SD_DIFFUSERS), 10, {}, {}),
    ("DPM++ 2M SDE", lambda: DPMSolverMultistepScheduler(
        **SD_DIFFUSERS, algorithm_type="sde-dpmsolver++", solver_order=2), 15, {}, {}),
    ("DPM++ 2M SDE", lambda: DPMSolverMultistepScheduler(
        **SD_DIFFUSERS, algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True), 12,
     {"schedule_type": "Karras"}, {}),
    # 3 steps: diffusers' first- and second-order updates and the final step to sigma 0; its third-order
    # update is matched in test_dpmpp_3m_sde_matches_diffusers_with_its_third_order_sign_corrected
    ("DPM++ 3M SDE", lambda: DPMSolverMultistepScheduler(
        **SD_DIFFUSERS, algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"), 3, {}, {}),
    ("DPM++ 3M SDE", lambda: DPMSolverMultistepScheduler(
        **SD_DIFFUSERS, algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun",
        use_karras_sigmas=True), 3, {"schedule_type": "Karras"}, {}),
    ("UniPC", lambda: UniPCMultistepScheduler(**SD_DIFFUSERS), 15, {}, {}),
    ("UniPC", lambda: UniPCMultistepScheduler(**SD_DIFFUSERS), 5, {}, {}),
    ("LCM", lambda: LCMScheduler(**SD_DIFFUSERS), 4, {}, {}),
    ("LCM", lambda: LCMScheduler(**SD_DIFFUSERS), 8, {}, {}),
    ("Euler", lambda: EulerDiscreteScheduler(**SD_DIFFUSERS, use_exponential_sigmas=True), 10,
     {"schedule_type": "exponential"}, {}),
    ("Euler", lambda: EulerDiscreteScheduler(**SD_DIFFUSERS, use_beta_sigmas=True), 10, {"schedule_type": "beta"}, {}),
]


@pytest.mark.parametrize(
    "sampler, scheduler, steps, kwargs, step_kwargs", PARITY,
    ids=[f"{case[0]}{''.join(f'-{k}={v}' for k, v in case[3].items())}" for case in PARITY],
)
def test_sampler_matches_diffusers_scheduler(unet, inputs, sampler, scheduler, steps, kwargs, step_kwargs):
    expected = diffusers_loop(unet, inputs, scheduler(), steps, **step_kwargs)
    latents = sdlab_loop(unet, inputs, sampler, steps, **kwargs)
    assert (latents - expected).abs().max().item() <= TOLERANCE


def test_dpmpp_3m_sde_matches_diffusers_with_its_third_order_sign_corrected(unet, inputs):
    """diffusers' `sde-dpmsolver++` third-order update (added in its PR #9104) weights the second difference
    D2 by (1 - e^-2h - 2h) / (2h)^2 - 0.5, which tends to -1 as h -> 0 where the paper's (and k-diffusion's,
    the web UI's DPM++ 3M SDE) tends to 0: the 0.5 takes the other sign. With that one sign turned, diffusers'
    sampler is sdlab's over 12 steps (its lower-order final steps off: sdlab runs third order to the end)."""
    import diffusers.schedulers.scheduling_dpmsolver_multistep as module

    source = textwrap.dedent(inspect.getsource(DPMSolverMultistepScheduler.multistep_dpm_solver_third_order_update))
    shipped = "(2.0 * h) ** 2 - 0.5)) * D2"
    scheduler = DPMSolverMultistepScheduler(**SD_DIFFUSERS, algorithm_type="sde-dpmsolver++", solver_order=3,
                                            solver_type="heun", lower_order_final=False)
    if shipped in source:  # as of diffusers 0.42
        namespace: dict = {}
        exec(source.replace(shipped, "(2.0 * h) ** 2 + 0.5)) * D2"), vars(module), namespace)
        scheduler.multistep_dpm_solver_third_order_update = types.MethodType(
            namespace["multistep_dpm_solver_third_order_update"], scheduler)
    expected = diffusers_loop(unet, inputs, scheduler, 12)
    latents = sdlab_loop(unet, inputs, "DPM++ 3M SDE", 12)
    assert (latents - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("karras", [True, False])
@pytest.mark.filterwarnings("ignore:Should have ta>=t0")  # torchsde: sigma_min after exp(-(-log)) rounding
def test_dpmpp_sde_matches_diffusers_with_the_same_brownian_noise(unet, inputs, karras):
    seed, steps = 42, 10
    expected = diffusers_loop(
        unet, inputs, DPMSolverSDEScheduler(**SD_DIFFUSERS, use_karras_sigmas=karras, noise_sampler_seed=seed), steps)
    sigmas = sampler_sigmas("DPM++ SDE", SD, steps, karras=karras)
    brownian = BrownianTreeNoiseSampler(inputs[2], sigmas[sigmas > 0].min().item(), sigmas.max().item(), seed)
    latents = sdlab_loop(unet, inputs, "DPM++ SDE", steps, karras=karras, noise_sampler=brownian)
    assert (latents - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("sampler, scheduler", [
    ("Euler", lambda: EulerDiscreteScheduler(**SD_DIFFUSERS, prediction_type="v_prediction")),
    ("DDIM", lambda: DDIMScheduler(**SD_DIFFUSERS, **DDIM_LIKE, prediction_type="v_prediction")),
])
def test_v_prediction_matches_diffusers(unet, inputs, sampler, scheduler):
    expected = diffusers_loop(unet, inputs, scheduler(), 12)
    latents = sdlab_loop(unet, inputs, sampler, 12, prediction="v")
    assert (latents - expected).abs().max().item() <= TOLERANCE


def test_guidance_scale_one_is_the_plain_conditional_model_as_in_diffusers(unet, inputs):
    expected = diffusers_loop(unet, inputs, EulerDiscreteScheduler(**SD_DIFFUSERS), 10, guidance_scale=1.0)
    latents = sdlab_loop(unet, inputs, "Euler", 10, guidance_scale=1.0)
    assert (latents - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("sampler, scheduler", [
    ("Euler", lambda: EulerDiscreteScheduler(**SD_DIFFUSERS)),
    ("Euler a", lambda: EulerAncestralDiscreteScheduler(**SD_DIFFUSERS)),
    ("DDIM", lambda: DDIMScheduler(**SD_DIFFUSERS, **DDIM_LIKE)),
])
def test_img2img_partial_schedule_matches_diffusers(unet, inputs, sampler, scheduler):
    steps, start_step = 12, 5  # strength 7/12: diffusers skips int(12 * (1 - 7/12)) steps
    expected = diffusers_loop(unet, inputs, scheduler(), steps, start_step=start_step, img2img=True)
    latents = sdlab_loop(unet, inputs, sampler, steps, start_step=start_step, img2img=True)
    assert (latents - expected).abs().max().item() <= TOLERANCE


# -- the Gaussian toy: the exact denoiser of x0 ~ N(mu, s^2) ------------------------------------------

MU, S = 0.5, 0.6


def gaussian_denoiser(x, sigma):
    """E[x0 | x0 + sigma eps = x] for x0 ~ N(MU, S^2): (S^2 x + sigma^2 MU) / (S^2 + sigma^2)."""
    sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def gaussian_samples(sampler, steps, noise, **kwargs):
    # starting from init_latents = MU makes x_T ~ N(MU, sigma_max^2), the data's own marginal up to S^2
    return sample(sampler, gaussian_denoiser, noise, SD, steps, init_latents=torch.full_like(noise, MU), **kwargs)


@pytest.mark.parametrize("sampler", [name for name in SAMPLERS if name != "LCM"])
def test_every_sampler_reproduces_gaussian_data(sampler):
    torch.manual_seed(0)
    latents = gaussian_samples(sampler, 400, torch.randn(4096, 1, 4, 4))
    assert latents.mean().item() == pytest.approx(MU, abs=0.01)
    assert latents.std().item() == pytest.approx(S, rel=0.025)


def gaussian_consistency_function(x, sigma):
    """The probability-flow ODE's end point from (x, sigma) for x0 ~ N(MU, S^2): what a consistency model
    learns (Song et al. 2023, Def. 1), where a denoiser learns the posterior mean."""
    sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return MU + (x - MU) * S / (S**2 + sigma**2) ** 0.5


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_with_a_consistency_function_samples_the_data_in_any_number_of_steps(steps):
    torch.manual_seed(0)
    noise = torch.randn(4096, 1, 4, 4)
    latents = sample("LCM", gaussian_consistency_function, noise, SD, steps, init_latents=torch.full_like(noise, MU))
    assert latents.mean().item() == pytest.approx(MU, abs=0.01)
    assert latents.std().item() == pytest.approx(S, rel=0.025)


@pytest.mark.parametrize("sampler", [name for name, spec in SAMPLERS.items() if not spec.stochastic] + ["DDIM"])
def test_ode_samplers_converge_to_the_exact_probability_flow(sampler):
    """Along the probability-flow ODE, x(sigma) - MU scales by sqrt(S^2 + sigma^2) (Song et al. 2021b, eq. 13)."""
    torch.manual_seed(0)
    noise = torch.randn(256, 1, 4, 4)
    errors = []
    for steps in (20, 80):
        sigmas = sampler_sigmas(sampler, SD, steps)
        exact = MU + noise * sigmas[0] * ((S**2 + sigmas[-1] ** 2) / (S**2 + sigmas[0] ** 2) / (1 + sigmas[-1] ** 2)) ** 0.5
        errors.append((gaussian_samples(sampler, steps, noise) - exact).abs().max().item())
    assert errors[1] < 0.08
    assert errors[1] < errors[0] / 3  # at least first order: 4x the steps, well under a third of the error


def flow_error(sampler, steps, noise, schedule_type="karras", **kwargs):
    sigmas = sampler_sigmas(sampler, SD, steps, schedule_type=schedule_type)
    exact = MU + noise * sigmas[0] * ((S**2 + sigmas[-1] ** 2) / (S**2 + sigmas[0] ** 2) / (1 + sigmas[-1] ** 2)) ** 0.5
    return (gaussian_samples(sampler, steps, noise, schedule_type=schedule_type, **kwargs) - exact).abs().max().item()


@pytest.mark.parametrize("sde, ode", [("DPM++ 2M SDE", "DPM++ 2M"), ("DPM2 a", "DPM2")])
def test_at_eta_zero_the_sde_and_ancestral_samplers_are_their_ode_solvers(sde, ode):
    """Lu et al. 2022 (DPM-Solver++, App. B): without the noise term the SDE step is the ODE step."""
    torch.manual_seed(0)
    noise = torch.randn(64, 1, 4, 4)
    assert torch.allclose(gaussian_samples(sde, 12, noise, eta=0.0), gaussian_samples(ode, 12, noise), atol=1e-5)


def test_dpmpp_3m_sde_at_eta_zero_is_third_order():
    """The x0 extrapolation from three denoised (DPM-Solver++(3M)) beats the two-point one: 20 Karras steps
    on the Gaussian toy land ~20x closer to the exact flow than DPM++ 2M."""
    torch.manual_seed(0)
    noise = torch.randn(256, 1, 4, 4)
    assert flow_error("DPM++ 3M SDE", 20, noise, eta=0.0) < flow_error("DPM++ 2M", 20, noise) / 8


def test_dpmpp_2s_ancestral_at_eta_zero_is_second_order():
    """DPM-Solver++(2S): 4x the steps, about 10x closer to the exact flow (Euler: 4x)."""
    torch.manual_seed(0)
    noise = torch.randn(256, 1, 4, 4)
    errors = [flow_error("DPM++ 2S a", steps, noise, eta=0.0) for steps in (10, 40)]
    assert errors[1] < errors[0] / 7
    assert flow_error("Euler", 40, noise) > flow_error("Euler", 10, noise) / 5


# -- denoisers ------------------------------------------------------------------------------------


class PerfectUNet(nn.Module):
    """Knows the clean latents; answers with the true epsilon or v for its VP input at integer timestep t."""

    def __init__(self, x0, prediction):
        super().__init__()
        self.x0, self.prediction, self.timesteps = x0, prediction, []

    def forward(self, x_in, t, **cond):
        self.timesteps.append(t)
        a = alphas_cumprod(SD)[t.long()].reshape(-1, 1, 1, 1)
        eps = (x_in - a.sqrt() * self.x0) / (1 - a).sqrt()
        return eps if self.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.x0


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_a_perfect_unet_denoises_to_the_clean_latents(prediction):
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 999])
    sigma = discrete_sigmas(SD)[t]
    unet = PerfectUNet(x0, prediction)
    denoised = Denoiser(unet, SD, prediction)(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma)
    assert torch.allclose(denoised, x0, atol=1e-4)
    assert torch.equal(unet.timesteps[0], t.float())  # table sigmas map to their integer timesteps


def test_denoiser_scales_the_input_and_quantize_rounds_the_timestep():
    seen = {}

    def unet_probe(x_in, t, **cond):
        seen.update(x_in=x_in, t=t, cond=cond)
        return torch.zeros_like(x_in)

    unet = nn.Module()
    unet.forward = unet_probe
    table = discrete_sigmas(SD)
    sigma = (table[300].log() * 0.6 + table[301].log() * 0.4).exp()  # t = 300.4
    x = torch.ones(1, 4, 2, 2)
    Denoiser(unet, SD, quantize=True)(x, sigma, crossattn="text")
    assert torch.allclose(seen["x_in"], x / (sigma**2 + 1) ** 0.5)
    assert seen["t"].tolist() == [300.0] and seen["cond"] == {"crossattn": "text"}
    Denoiser(unet, SD)(x, sigma)
    assert seen["t"].item() == pytest.approx(300.4, abs=1e-4)


def test_denoiser_runs_the_unet_in_its_own_dtype():
    class HalfUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float16))

        def forward(self, x_in, t):
            assert x_in.dtype == torch.float16
            return x_in * self.scale

    denoised = Denoiser(HalfUNet(), SD)(torch.ones(1, 4, 2, 2), torch.tensor(1.0))
    assert denoised.dtype == torch.float32


def test_unknown_prediction_type_is_a_config_error():
    with pytest.raises(ConfigError, match="epsilon"):
        Denoiser(nn.Identity(), SD, "sample")


# -- guidance -------------------------------------------------------------------------------------


class RecordingDenoiser(nn.Module):
    """Denoises to the mean of whatever text embedding it is given, and records each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, crossattn, **shared):
        self.calls.append(dict(x=x, sigma=sigma, crossattn=crossattn, **shared))
        return torch.zeros_like(x) + crossattn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_cfg_batches_uncond_then_cond_and_extrapolates():
    cond, uncond = torch.full((2, 3, 5), 2.0), torch.full((2, 3, 5), 0.5)
    concat = torch.randn(2, 5, 4, 4)
    denoiser = RecordingDenoiser()
    guided = CFGDenoiser(denoiser, cond, uncond, 7.5, concat=concat)(torch.zeros(2, 4, 4, 4), torch.tensor(3.0))
    assert torch.allclose(guided, torch.full_like(guided, 0.5 + 7.5 * (2.0 - 0.5)))
    (call,) = denoiser.calls
    assert torch.equal(call["crossattn"], torch.cat([uncond, cond]))  # diffusers' order
    assert torch.equal(call["concat"], torch.cat([concat, concat]))
    assert call["x"].shape[0] == 4 and call["sigma"].tolist() == [3.0] * 4


def test_cfg_with_scale_one_makes_one_conditional_call():
    cond, uncond = torch.full((2, 3, 5), 2.0), torch.full((2, 3, 5), 0.5)
    denoiser = RecordingDenoiser()
    out = CFGDenoiser(denoiser, {"crossattn": cond}, {"crossattn": uncond}, 1.0)(torch.zeros(2, 4, 4, 4), 3.0)
    assert torch.allclose(out, torch.full_like(out, 2.0))
    assert len(denoiser.calls) == 1 and torch.equal(denoiser.calls[0]["crossattn"], cond)


# -- registry and sample() ------------------------------------------------------------------------

WEB_UI_NAMES = ["Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE",
                "DPM++ 2S a", "LMS", "DDIM", "PLMS", "DDPM", "UniPC", "LCM"]
LEGACY_NAMES = ["DPM++ 2M Karras", "DPM++ SDE Karras", "LMS Karras"]


def test_samplers_are_listed_by_the_web_uis_names_with_aliases():
    assert [name for name, _ in list_samplers()] == WEB_UI_NAMES + LEGACY_NAMES
    aliases = {alias for _, names in list_samplers() for alias in names}
    assert {"euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde", "dpmpp_sde_karras", "lms",
            "lms_karras", "ddim", "plms", "pndm", "ddpm", "dpm2", "dpm2_a", "dpmpp_2m_sde", "dpmpp_3m_sde",
            "dpmpp_2s_a", "unipc", "lcm"} <= aliases
    assert all(resolve_sampler(alias) for alias in aliases)


@pytest.mark.parametrize("name, schedule_type, expected", [
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
    ("dpmpp_2m_karras", None, ("DPM++ 2M", "Karras")),
    ("DPM++ 2M", "karras", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M", None, ("DPM++ 2M", "Automatic")),
    ("DPM++ 2M SDE Exponential", "Automatic", ("DPM++ 2M SDE", "Exponential")),
    ("euler_sgm_uniform", None, ("Euler", "SGM Uniform")),
    ("LMS Karras", "beta", ("LMS", "Beta")),
    ("Euler a", "align-your-steps", ("Euler a", "Align Your Steps")),
    ("DDIM", None, ("DDIM", "Automatic")),
])
def test_legacy_names_are_a_sampler_and_a_schedule_type_as_the_web_ui_reads_them(name, schedule_type, expected):
    """Web UI 1.9+ writes `Sampler: DPM++ 2M, Schedule type: Karras` and reads an old `DPM++ 2M Karras` so."""
    assert sampler_and_schedule_names(name, schedule_type) == expected


def test_a_legacy_name_walks_its_schedule_and_keeps_its_name():
    spec = resolve_sampler("DPM++ 2M SDE Karras")
    assert spec.name == "DPM++ 2M SDE Karras" and spec.function is SAMPLERS["DPM++ 2M SDE"].function
    assert torch.equal(sampler_sigmas(spec, SD, 9), karras_sigmas(SD, 9))
    assert torch.equal(sampler_sigmas(spec, SD, 9, schedule_type="automatic"), karras_sigmas(SD, 9))
    assert chosen_schedule("LMS Karras", karras=False).key == "automatic"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_automatic_is_each_samplers_own_schedule_as_before(sampler):
    for schedule_type in (None, "automatic", "Automatic"):
        assert torch.equal(sampler_sigmas(sampler, SD, 10, schedule_type=schedule_type), sampler_sigmas(sampler, SD, 10))
    if not SAMPLERS[sampler].takes_schedule_types:
        with pytest.raises(InputError, match="Exponential"):
            sampler_sigmas(sampler, SD, 10, schedule_type="exponential")


def test_schedule_type_errors():
    with pytest.raises(InputError, match="karras.*align-your-steps"):
        sampler_sigmas("Euler", SD, 10, schedule_type="cosine")
    with pytest.raises(InputError, match="not both"):
        sampler_sigmas("Euler", SD, 10, schedule_type="beta", karras=True)
    with pytest.raises(InputError, match="at most 50"):
        sampler_sigmas("LCM", SD, 51)
    with pytest.raises(UnknownSamplerError):
        resolve_sampler("DDIM Karras")  # DDIM walks SD's own timesteps


@pytest.mark.parametrize("name, expected", [
    ("euler a", "Euler a"), ("EULER_A", "Euler a"), ("dpm++ 2m karras", "DPM++ 2M Karras"), ("PNDM", "PLMS"),
    ("dpmpp_sde_karras", "DPM++ SDE Karras"), ("ddpm", "DDPM"),
])
def test_names_resolve_case_insensitively(name, expected):
    assert resolve_sampler(name).name == expected


def test_unknown_sampler_error_lists_the_known_names():
    with pytest.raises(UnknownSamplerError) as error:
        resolve_sampler("Euler b")
    assert isinstance(error.value, InputError)
    assert all(name in str(error.value) for name in WEB_UI_NAMES)


def test_karras_variants_use_karras_sigmas():
    assert torch.equal(sampler_sigmas("DPM++ 2M Karras", SD, 10), sampler_sigmas("DPM++ 2M", SD, 10, karras=True))
    assert not torch.equal(sampler_sigmas("DPM++ 2M Karras", SD, 10), sampler_sigmas("DPM++ 2M", SD, 10))
    assert sampler_sigmas("LMS Karras", SD, 10)[0] == discrete_sigmas(SD)[-1]


def test_ddim_and_plms_stop_at_the_smallest_trained_sigma_and_the_rest_at_zero():
    for name in SAMPLERS:
        sigmas = sampler_sigmas(name, SD, 10)
        assert torch.all(sigmas.diff() < 0)
        assert sigmas[-1].item() == (discrete_sigmas(SD)[0].item() if name in ("DDIM", "PLMS") else 0.0)


def test_callback_reports_every_step():
    steps, reports = 5, []
    torch.manual_seed(0)
    sample("Heun", gaussian_denoiser, torch.randn(2, 1, 2, 2), SD, steps, callback=reports.append)
    assert [r["i"] for r in reports] == list(range(steps))
    assert all(r["total"] == steps for r in reports)
    assert set(reports[0]) == {"x", "i", "total", "sigma", "sigma_next", "denoised"}
    assert reports[-1]["sigma_next"] == 0 and reports[0]["sigma"] == discrete_sigmas(SD)[-1]


@pytest.mark.parametrize("sampler, draws", [
    ("Euler a", 5), ("DDPM", 5), ("DPM++ SDE", 10), ("DDIM", 0), ("Euler", 0), ("DPM2 a", 5), ("DPM++ 2M SDE", 5),
    ("DPM++ 3M SDE", 5), ("DPM++ 2S a", 5), ("LCM", 5), ("UniPC", 0),
])
def test_stochastic_steps_take_their_noise_from_step_noise(sampler, draws):
    calls = []

    def step_noise():
        calls.append(1)
        return torch.zeros(2, 1, 2, 2)

    sample(sampler, gaussian_denoiser, torch.randn(2, 1, 2, 2), SD, 6, step_noise=step_noise)
    assert len(calls) == draws  # one per step, two for DPM++ SDE, none into sigma 0


def test_options_a_sampler_cannot_take_are_input_errors():
    noise = torch.randn(1, 1, 2, 2)
    with pytest.raises(InputError, match="eta"):
        sample("Euler", gaussian_denoiser, noise, SD, 5, eta=0.5)
    with pytest.raises(InputError, match="eta must be"):
        sample("Euler a", gaussian_denoiser, noise, SD, 5, eta=-1.0)
    with pytest.raises(InputError, match="Karras"):
        sample("DDIM", gaussian_denoiser, noise, SD, 5, karras=True)
    with pytest.raises(InputError, match="init_latents"):
        sample("Euler", gaussian_denoiser, noise, SD, 5, start_step=2)
    with pytest.raises(InputError, match="start_step"):
        sample("Euler", gaussian_denoiser, noise, SD, 5, start_step=5, init_latents=noise)
    with pytest.raises(InputError, match="steps"):
        sample("Euler", gaussian_denoiser, noise, SD, 0)
