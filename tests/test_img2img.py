"""img2img: the same image as diffusers' StableDiffusionImg2ImgPipeline for the same weights, image,
strength and seed; the web UI's resize modes; strength at its ends; clear refusals."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

import sdlab
from sdlab.errors import InputError
from sdlab.pipelines.latents import decode_latents, encode_posterior
from sdlab.pipelines.images import resize_image, to_pixels
from sdlab.pipelines.img2img import working_size
from test_pipeline_parity import assert_latents_close, diffusers_scheduler, psnr, tiny_diffusers_sd


def sample_image(width=32, height=32, seed=0) -> Image.Image:
    """Smooth gradients, a disc and a little texture: structure the VAE keeps, not flat colour."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float64)
    texture = np.random.default_rng(seed).random((height, width))
    rgb = np.stack([x * 0.8 + 0.2 * disc, y * 0.6 + 0.3 * texture, 1 - x * y - 0.5 * disc], axis=-1)
    return Image.fromarray((rgb.clip(0, 1) * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random SD1 saved by diffusers, as diffusers' img2img pipeline and as an sdlab pipeline."""
    folder = tmp_path_factory.mktemp("tiny-sd1")
    reference = StableDiffusionImg2ImgPipeline(**tiny_diffusers_sd(folder, "sd1", "epsilon").components)
    reference.set_progress_bar_config(disable=True)
    return reference, sdlab.load(str(folder))


@pytest.mark.parametrize("sampler, strength", [("Euler a", 0.6), ("DDIM", 0.75), ("Euler", 1.0)])
def test_same_image_as_diffusers(models, sampler, strength):
    """Euler a checks the order of the generator's draws: the VAE posterior sample, then the noise
    added to the image, then each step's noise; DDIM the leading-spaced partial schedule."""
    reference, pipe = models
    reference.scheduler = diffusers_scheduler(sampler, reference.scheduler.config)
    image, prompt, negative, seed, steps = sample_image(), "a red disc", "blurry", 321, 8
    expected_latents = reference(
        prompt, image=image, strength=strength, negative_prompt=negative, num_inference_steps=steps,
        guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    with torch.no_grad():
        decoded = reference.vae.decode(expected_latents / reference.vae.config.scaling_factor).sample
    expected = reference.image_processor.postprocess(decoded, output_type="pil")[0]

    result = pipe.img2img(prompt, image, negative, strength=strength, steps=steps, guidance_scale=7.5, seed=seed,
                          sampler=sampler)
    assert_latents_close(result.latents, expected_latents)
    ours = np.asarray(result.images[0])
    assert ours.shape == (32, 32, 3) and ours.std() > 1
    assert psnr(ours, np.asarray(expected)) >= 40, f"PSNR {psnr(ours, np.asarray(expected)):.1f} dB"
    assert f"Denoising strength: {strength:g}" in result.infotexts[0]


def test_strength_zero_returns_the_reencoded_image(models):
    _, pipe = models
    image, seed = sample_image(), 5
    result = pipe.img2img("anything", image, strength=0.0, seed=seed, steps=10)
    # the posterior sample with the seed's first draw, decoded as it is: no denoising step runs
    posterior = encode_posterior(pipe, to_pixels(image))
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator("cpu").manual_seed(seed))
    latents = (posterior.mean + posterior.std * eps) * pipe.config.vae.scaling_factor
    torch.testing.assert_close(result.latents, latents)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(decode_latents(pipe, latents)[0]))
    # fewer than one step's worth of strength also keeps the image
    few = pipe.img2img("anything", image, strength=0.05, seed=seed, steps=10)
    torch.testing.assert_close(few.latents, latents)


def test_same_seed_same_image_and_batches_share_the_init(models):
    _, pipe = models
    image = sample_image()
    a = pipe.img2img("a cat", image, steps=3, seed=9, batch_size=2, sampler="Euler", noise="a1111-cpu")
    b = pipe.img2img("a cat", image, steps=3, seed=10, sampler="Euler", noise="a1111-cpu")
    # a1111 noise: image i of a batch is seed + i, reproducible alone
    assert a.seeds == [9, 10]
    torch.testing.assert_close(a.latents[1:], b.latents, rtol=1e-4, atol=1e-4)
    assert "Seed: 10" in a.infotexts[1]


def stripes(width=40, height=20) -> Image.Image:
    """Left half red, right half blue, a green top row and a white bottom row."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2:] = (0, 0, 255)
    array[0] = (0, 255, 0)
    array[-1] = (255, 255, 255)
    return Image.fromarray(array)


def test_just_resize_stretches():
    out = np.asarray(resize_image(stripes(), 20, 20, "just"))
    assert out.shape == (20, 20, 3)
    assert out[10, 2].tolist() == [255, 0, 0] and out[10, 17].tolist() == [0, 0, 255]


def test_crop_and_resize_fills_the_size_and_crops_the_overflow_evenly():
    out = np.asarray(resize_image(stripes(), 20, 20, "crop"))  # 40x20 -> 40x20 scaled, 10 px cut each side
    assert out.shape == (20, 20, 3)
    assert (out[5:15, :9] == (255, 0, 0)).all() and (out[5:15, 11:] == (0, 0, 255)).all()
    assert (out[0] == (0, 255, 0)).all() and (out[-1] == (255, 255, 255)).all()  # height kept whole


def test_resize_and_fill_fits_inside_and_stretches_the_edges_into_the_borders():
    out = np.asarray(resize_image(stripes(), 40, 40, "fill"))  # 40x20 centred at rows 10..29
    assert out.shape == (40, 40, 3)
    assert (out[:10] == out[10]).all(), "top border: copies of the image's first row"
    assert (out[30:] == out[29]).all(), "bottom border: copies of the last row"
    assert (out[10] == (0, 255, 0)).all() and (out[29] == (255, 255, 255)).all()
    assert (out[15:25, :19] == (255, 0, 0)).all() and (out[15:25, 21:] == (0, 0, 255)).all()


def test_resize_modes_in_the_pipeline_and_the_parameters(models):
    _, pipe = models
    result = pipe.img2img("x", stripes(64, 32), width=32, height=32, resize_mode="crop", steps=2, seed=1)
    assert result.images[0].size == (32, 32)
    assert "Resize mode: Crop and resize" in result.infotexts[0] and "Size: 32x32" in result.infotexts[0]
    same_size = pipe.img2img("x", stripes(32, 32), resize_mode="fill", steps=2, seed=1)
    assert "Resize mode" not in same_size.infotexts[0], "the mode changes nothing at the image's own size"


def test_working_size_defaults_to_the_image_rounded_down_to_what_the_vae_takes(models):
    _, pipe = models
    step = pipe.size_multiple  # tiny model: latent factor 2 (the UNet takes any latent size)
    assert step == 2
    assert working_size(pipe, (70, 51), None, None) == (70, 50)
    assert working_size(pipe, (100, 50), 64, None) == (64, 32)
    with pytest.raises(InputError, match="multiple of 2"):
        working_size(pipe, (100, 50), 63, 32)


@pytest.mark.parametrize("strength", [1.5, -0.1, "high", True])
def test_strength_outside_zero_to_one_is_refused(models, strength):
    _, pipe = models
    with pytest.raises(InputError, match="denoising strength must be a number from 0"):
        pipe.img2img("x", sample_image(), strength=strength, steps=2)


def test_missing_and_unreadable_init_images_are_refused(models, tmp_path):
    _, pipe = models
    with pytest.raises(InputError, match="init image not found: .*nope.png"):
        pipe.img2img("x", str(tmp_path / "nope.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="cannot read init image .*broken.png"):
        pipe.img2img("x", broken)
    with pytest.raises(InputError, match="unknown resize mode 'zoom'"):
        pipe.img2img("x", sample_image(), resize_mode="zoom")


def test_transparent_init_images_are_flattened_onto_white(models):
    from sdlab.pipelines.images import load_image

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    flat = np.asarray(load_image(rgba))
    assert flat[0, 0].tolist() == [0, 0, 255] and flat[4, 4].tolist() == [255, 255, 255]
