"""Hires fix: txt2img at the base size, the latents (or pixels) enlarged, then the web UI's second pass:
`hires_steps` steps run from step int(N / strength) - N of a schedule int(N / strength) steps long,
with fresh noise of the large size from the same seed; the web UI's parameter fields."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdlab
from sdlab import devices
from sdlab.errors import InputError
from sdlab.infotext import parse_infotext
from sdlab.noise import noise_source
from sdlab.pipelines.latents import encode_posterior
from sdlab.pipelines.hires import hires_fix, second_pass_steps
from sdlab.pipelines.images import to_pixels
from sdlab.samplers import sampler_sigmas

BASE = 64  # the demo model's latents are 1/8 of the image


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load("demo")


def run(pipe, **options):
    """hires_fix with the step dicts of both passes recorded."""
    steps = {1: [], 2: []}
    defaults = dict(steps=4, seed=11, width=BASE, height=BASE, sampler="Euler", hires_steps=3, hires_strength=0.5)
    result = hires_fix(pipe, "a red circle", callback=lambda info: steps[info["pass"]].append(info),
                       **{**defaults, **options})
    return result, steps


def first_sigma(pipe, hires_steps: int, strength: float) -> float:
    """The web UI's sigma_sched[0]: sigmas[steps - t_enc - 1] with steps = int(N / strength), t_enc = N - 1."""
    total = int(hires_steps / min(strength, 0.999))
    return sampler_sigmas("Euler", pipe.config.schedule, total)[total - hires_steps].item()


@pytest.mark.parametrize("mode, interpolation", [("latent", "bilinear"), ("latent-nearest-exact", "nearest-exact")])
def test_latent_upscaler_starts_the_second_pass_from_the_interpolated_latents(pipe, mode, interpolation):
    result, steps = run(pipe, hires_upscaler=mode)
    base = pipe.txt2img("a red circle", steps=4, seed=11, width=BASE, height=BASE, sampler="Euler")
    enlarged = F.interpolate(base.latents, scale_factor=2, mode=interpolation, antialias=False)
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(11))  # the same seed, the large shape
    sigma = first_sigma(pipe, 3, 0.5)
    assert len(steps[1]) == 4 and len(steps[2]) == 3
    assert steps[2][0]["sigma"].item() == pytest.approx(sigma, rel=1e-6)
    torch.testing.assert_close(steps[2][0]["x"], enlarged + noise * sigma, rtol=1e-5, atol=1e-5)
    assert result.images[0].size == (2 * BASE, 2 * BASE) and result.latents.shape == (1, 4, 16, 16)


def test_lanczos_upscaler_encodes_the_enlarged_first_image(pipe):
    result, steps = run(pipe, hires_upscaler="Lanczos", hires_strength=0.6)
    base = pipe.txt2img("a red circle", steps=4, seed=11, width=BASE, height=BASE, sampler="Euler")
    pixels = to_pixels(base.images[0].resize((2 * BASE, 2 * BASE), Image.Resampling.LANCZOS))
    posterior = encode_posterior(pipe, pixels)
    generator = torch.Generator().manual_seed(11)  # diffusers' img2img order: posterior sample, then the noise
    eps = torch.randn(posterior.mean.shape, generator=generator)
    noise = torch.randn((1, 4, 16, 16), generator=generator)
    init = (posterior.mean + posterior.std * eps) * pipe.config.vae.scaling_factor
    sigma = first_sigma(pipe, 3, 0.6)
    torch.testing.assert_close(steps[2][0]["x"], init + noise * sigma, rtol=1e-5, atol=1e-5)
    assert parse_infotext(result.infotexts[0])["Hires upscaler"] == "Lanczos"


@pytest.mark.parametrize("hires_steps, strength", [(20, 0.3), (7, 0.55), (10, 1.0), (3, 0.999), (9, 0.125)])
def test_exactly_the_hires_steps_run_whatever_the_rounding(pipe, hires_steps, strength):
    total, generate_strength = second_pass_steps(hires_steps, strength, 1000)
    assert total == int(hires_steps / min(strength, 0.999))
    assert min(int(total * generate_strength), total) == hires_steps
    if hires_steps <= 10:
        _, steps = run(pipe, steps=1, hires_steps=hires_steps, hires_strength=strength, hires_scale=1.5)
        assert len(steps[2]) == hires_steps
        assert steps[2][0]["sigma"].item() == pytest.approx(first_sigma(pipe, hires_steps, strength), rel=1e-6)


def test_a1111_noise_gives_each_image_its_seed_at_the_large_size(pipe):
    """The web UI's hires pass makes a new ImageRNG for the large shape with the same seeds: its first
    draw per image is the large noise."""
    result, steps = run(pipe, noise="a1111-cpu", batch_size=2, seed=40)
    base = pipe.txt2img("a red circle", steps=4, seed=40, width=BASE, height=BASE, sampler="Euler",
                        noise="a1111-cpu", batch_size=2)
    enlarged = F.interpolate(base.latents, scale_factor=2, mode="bilinear", antialias=False)
    noise = noise_source("a1111-cpu", 40, 2, (4, 16, 16)).initial()
    torch.testing.assert_close(steps[2][0]["x"], enlarged + noise * first_sigma(pipe, 3, 0.5), rtol=1e-5, atol=1e-5)
    assert result.seeds == [40, 41]
    assert [parse_infotext(text)["Seed"] for text in result.infotexts] == ["40", "41"]


def test_parameters_are_the_first_pass_with_the_web_ui_hires_fields(pipe):
    result, _ = run(pipe, hires_scale=1.5, hires_steps=5, hires_strength=0.45, negative_prompt="blurry")
    fields = parse_infotext(result.infotexts[0])
    assert fields["Prompt"] == "a red circle" and fields["Negative prompt"] == "blurry"
    assert fields["Size"] == "64x64" and fields["Steps"] == "4" and fields["Seed"] == "11"
    assert (fields["Denoising strength"], fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"]) \
        == ("0.45", "1.5", "5", "Latent")
    assert result.images[0].size == (96, 96)


def test_hires_steps_default_to_the_steps_and_strength_zero_only_enlarges(pipe):
    _, steps = run(pipe, hires_steps=None, steps=3)
    assert len(steps[2]) == 3
    result, steps = run(pipe, hires_strength=0.0)
    assert steps[2] == []
    base = pipe.txt2img("a red circle", steps=4, seed=11, width=BASE, height=BASE, sampler="Euler")
    torch.testing.assert_close(result.latents, F.interpolate(base.latents, scale_factor=2, mode="bilinear"))


def test_tiled_vae_gives_the_same_images(pipe):
    tiled, _ = run(pipe, tiled_vae=True, hires_upscaler="lanczos")
    whole, _ = run(pipe, tiled_vae=False, hires_upscaler="lanczos")
    difference = np.abs(np.asarray(tiled.images[0], dtype=int) - np.asarray(whole.images[0], dtype=int))
    assert difference.max() <= 1


@pytest.mark.parametrize("options, message", [
    ({"hires_upscaler": "ESRGAN"}, "unknown hires upscaler 'ESRGAN'; choose one of: latent"),
    ({"hires_scale": 0.5}, "hires scale must be a number from 1 to 8"),
    ({"hires_scale": 1.3}, "makes 64x64 into 83x83, not multiples of 8"),
    ({"hires_strength": 1.5}, "denoising strength must be a number from 0"),
    ({"hires_steps": 0}, "steps must be a positive integer"),
    ({"hires_steps": 30, "hires_strength": 0.01}, "need a 3000-step schedule"),
])
def test_bad_settings_are_refused_before_anything_runs(pipe, options, message):
    with pytest.raises(InputError, match=message):
        run(pipe, **options)


def test_a_size_that_cannot_be_decoded_whole_asks_for_the_tiled_vae_before_the_first_pass(pipe, monkeypatch):
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 1000)
    steps = {1: [], 2: []}
    with pytest.raises(InputError, match="use the tiled VAE"):
        hires_fix(pipe, "x", steps=2, width=BASE, height=BASE, tiled_vae=False,
                  callback=lambda info: steps[info["pass"]].append(info))
    assert steps == {1: [], 2: []}


def test_generate_options_run_the_hires_fix(tmp_path):
    import argparse

    from sdlab.cli.common import add_generation_options
    from sdlab.cli.upscale import add_hires_options, cmd_hires

    parser = argparse.ArgumentParser()
    add_generation_options(parser)
    add_hires_options(parser)
    out = tmp_path / "hires.png"
    args = parser.parse_args(["a red circle", "--model", "demo", "--size", "64x48", "--steps", "2", "--seed", "3",
                              "--hires-scale", "2", "--hires-steps", "2", "--hires-upscaler", "lanczos",
                              "--tiled-vae", "-o", str(out), "--quiet"])
    assert args.tiled_vae is True
    assert cmd_hires(args) == 0
    with Image.open(out) as written:
        assert written.size == (128, 96)
        fields = parse_infotext(written.info["parameters"])
    assert (fields["Size"], fields["Hires upscale"], fields["Hires upscaler"]) == ("64x48", "2", "Lanczos")
