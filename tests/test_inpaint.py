"""Inpainting: diffusers' StableDiffusionInpaintPipeline's image for inpainting UNets (9 input channels)
and for ordinary ones (latent blending); untouched pixels stay untouched; the web UI's mask options."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from PIL import Image

import sdlab
from sdlab.errors import InputError
from sdlab.pipelines.images import (
    blur_mask, crop_region, expand_to_aspect, fill_masked, gaussian_kernel, mask_to_tensor, to_pixels,
)
from test_img2img import sample_image
from test_pipeline_parity import assert_latents_close, diffusers_scheduler, psnr, tiny_diffusers_sd


def rectangle_mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """diffusers' inpainting pipeline around a tiny random SD1 with a plain (4-channel) UNet and with an
    inpainting (9-channel) UNet, each saved and loaded by sdlab."""
    plain_folder = tmp_path_factory.mktemp("plain")
    components = tiny_diffusers_sd(plain_folder, "sd1", "epsilon").components
    torch.manual_seed(1)
    unet9 = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    inpainting = StableDiffusionInpaintPipeline(**{**components, "unet": unet9})
    inpainting_folder = tmp_path_factory.mktemp("inpainting")
    inpainting.save_pretrained(str(inpainting_folder), safe_serialization=True)
    plain = StableDiffusionInpaintPipeline(**components)
    for reference in (plain, inpainting):
        reference.set_progress_bar_config(disable=True)
    return {"plain": (plain, sdlab.load(str(plain_folder))),
            "inpainting": (inpainting, sdlab.load(str(inpainting_folder)))}


# A box whose edges do not fall on the latent grid, so the mask's downsampling is compared too.
MASK_BOX = (9, 5, 27, 21)


@pytest.mark.parametrize("kind, sampler, strength", [
    ("inpainting", "Euler a", 1.0),  # draws: noise, masked-image posterior, steps
    ("inpainting", "DDIM", 0.75),  # draws: image posterior, noise, masked-image posterior
    ("plain", "Euler a", 1.0),  # latent blending from pure noise
    ("plain", "DPM++ 2M Karras", 0.7),  # blending inside a multistep solver, part-way
])
def test_same_image_as_diffusers(references, kind, sampler, strength):
    reference, pipe = references[kind]
    assert pipe.config.unet.in_channels == (9 if kind == "inpainting" else 4)
    reference.scheduler = diffusers_scheduler(sampler, reference.scheduler.config)
    image, mask = sample_image(), rectangle_mask((32, 32), MASK_BOX)
    prompt, negative, seed, steps = "a green square", "dark", 77, 8
    expected_latents = reference(
        prompt, image=image, mask_image=mask, height=32, width=32, strength=strength, negative_prompt=negative,
        num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent").images
    with torch.no_grad():
        decoded = reference.vae.decode(expected_latents / reference.vae.config.scaling_factor).sample
    expected = np.asarray(reference.image_processor.postprocess(decoded, output_type="pil")[0]).astype(np.float64)

    result = pipe.inpaint(prompt, image, mask, negative, strength=strength, mask_blur=0, steps=steps,
                          guidance_scale=7.5, seed=seed, sampler=sampler)
    assert_latents_close(result.latents, expected_latents)
    # diffusers does not paste the original back; the unblurred mask is binary, so paste it the same way
    inside = (np.asarray(mask) > 127)[..., None]
    expected_pasted = np.where(inside, expected, np.asarray(image))
    ours = np.asarray(result.images[0])
    assert ours[inside[..., 0]].std() > 1
    assert psnr(ours, expected_pasted) >= 40, f"PSNR {psnr(ours, expected_pasted):.1f} dB"


def test_inpainting_checkpoints_also_do_txt2img_and_img2img(references):
    """Without a mask the inpainting UNet gets a mask of ones and a grey masked image, as in the web UI."""
    _, pipe = references["inpainting"]
    assert pipe.txt2img("a cat", steps=2, seed=1, width=32, height=32).images[0].size == (32, 32)
    assert pipe.img2img("a cat", sample_image(), steps=2, seed=1).images[0].size == (32, 32)


@pytest.fixture(scope="module")
def demo():
    return sdlab.load("demo")


def picture(width=64, height=48):
    return sample_image(width, height, seed=3)


def test_pixels_outside_the_blurred_mask_are_unchanged(demo):
    image, mask = picture(), rectangle_mask((64, 48), (20, 12, 44, 36))
    result = demo.inpaint("a cat", image, mask, mask_blur=4, strength=1.0, steps=3, seed=2, sampler="Euler")
    ours, original = np.asarray(result.images[0]).astype(int), np.asarray(image).astype(int)
    reach = blur_mask(mask_to_tensor(mask), 4).numpy() > 0
    radius = gaussian_kernel(4).numel() // 2
    assert radius == 10 and not reach[:, : 20 - radius].any(), "the blur reaches int(2.5 * 4 + 0.5) px"
    assert np.abs(ours - original)[~reach].max() <= 2
    assert np.abs(ours - original)[12:36, 20:44].mean() > 10, "the masked area is repainted"


def test_only_masked_repaints_a_box_around_the_mask_and_leaves_the_rest_exactly(demo):
    image, mask = picture(128, 96), rectangle_mask((128, 96), (70, 40, 86, 60))
    result = demo.inpaint("a cat", image, mask, only_masked=True, padding=8, mask_blur=2, width=32, height=32,
                          steps=3, seed=4, sampler="Euler")
    ours, original = np.asarray(result.images[0]).astype(int), np.asarray(image).astype(int)
    assert result.images[0].size == (128, 96), "the image keeps its size"
    blurred = blur_mask(mask_to_tensor(mask), 2)
    x1, y1, x2, y2 = expand_to_aspect(crop_region(blurred, 8), 32, 32, 128, 96)
    assert (x2 - x1) == (y2 - y1), "the box takes the working size's aspect ratio"
    outside = np.ones((96, 128), bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(ours[outside], original[outside])
    assert np.array_equal(ours[blurred.numpy() == 0], original[blurred.numpy() == 0])
    assert np.abs(ours - original)[40:60, 70:86].mean() > 10
    assert "Inpaint area: Only masked, Masked area padding: 8" in result.infotexts[0]
    assert "Size: 32x32" in result.infotexts[0]


def test_crop_region_grows_by_the_padding_and_stays_inside_the_image():
    mask = torch.zeros(40, 60)
    mask[10:20, 50:55] = 1
    assert crop_region(mask, 4) == (46, 6, 59, 24)
    assert crop_region(mask, 20) == (30, 0, 60, 40)
    assert crop_region(torch.zeros(4, 4), 2) is None
    # a tall box near the right edge widens to square, shifted back inside the image
    assert expand_to_aspect((50, 5, 58, 25), 64, 64, 60, 40) == (40, 5, 60, 25)


def test_inverted_mask_repaints_the_black_area(demo):
    image, mask = picture(), rectangle_mask((64, 48), (16, 16, 48, 32))
    result = demo.inpaint("a cat", image, mask, invert_mask=True, mask_blur=0, strength=1.0, steps=2, seed=2)
    ours, original = np.asarray(result.images[0]).astype(int), np.asarray(image).astype(int)
    assert np.array_equal(ours[16:32, 16:48], original[16:32, 16:48])
    assert np.abs(ours - original)[:16].mean() > 10
    assert "Mask mode: Inpaint not masked" in result.infotexts[0]


def test_parameters_name_every_mask_option_as_the_web_ui(demo):
    image, mask = picture(), rectangle_mask((64, 48), (16, 16, 48, 32))
    text = demo.inpaint("a cat", image, mask, mask_blur=3, fill="latent noise", strength=0.5, steps=2, seed=8,
                        width=32, height=32, resize_mode="crop").infotexts[0]
    assert ("Denoising strength: 0.5, Resize mode: Crop and resize, Mask blur: 3, Masked content: latent noise"
            in text)


def test_masked_content_changes_the_start_inside_the_mask_only(demo):
    """At strength 0 the start latents are the result: latent nothing zeroes the masked latents, latent
    noise puts the initial noise there, original and fill encode the (filled) image."""
    image, mask = picture(), rectangle_mask((64, 48), (16, 16, 48, 32))
    runs = {fill: demo.inpaint("x", image, mask, fill=fill, strength=0.0, mask_blur=0, seed=6, noise="a1111-cpu")
            for fill in ("original", "fill", "latent noise", "latent nothing")}
    inside = torch.zeros(1, 4, 6, 8, dtype=torch.bool)
    inside[..., 2:4, 2:6] = True  # the mask on the demo model's 8x latent grid
    original = runs["original"].latents
    assert (runs["latent nothing"].latents[inside] == 0).all()
    noise = torch.randn((1, 4, 6, 8), generator=torch.Generator().manual_seed(6))  # a1111: the seed's first draw
    torch.testing.assert_close(runs["latent noise"].latents[inside], noise[inside])
    for fill in ("latent nothing", "latent noise"):
        torch.testing.assert_close(runs[fill].latents[~inside], original[~inside])
    assert not torch.allclose(runs["fill"].latents, original)


def test_fill_paints_the_hole_with_the_colours_around_it():
    array = np.zeros((32, 32, 3), np.uint8)
    array[:, :16] = (200, 40, 40)
    array[:, 16:] = (40, 40, 200)
    pixels = to_pixels(Image.fromarray(array))
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1
    filled = fill_masked(pixels, mask)
    assert torch.equal(filled[..., mask == 0], pixels[..., mask == 0]), "known pixels stay as they are"
    red, blue = filled[0, :, 16, 9], filled[0, :, 16, 22]
    assert red[0] > red[2] + 0.5 and blue[2] > blue[0] + 0.5, "each side of the hole takes its rim's colour"


def test_gaussian_blur_has_the_web_ui_kernel_size_and_spreads_by_sigma():
    assert gaussian_kernel(4).numel() == 2 * int(2.5 * 4 + 0.5) + 1
    dot = torch.zeros(61, 61)
    dot[30, 30] = 1
    blurred = blur_mask(dot, 3.0)
    assert blurred.sum().item() == pytest.approx(1, abs=1e-5)
    offsets = torch.arange(61, dtype=torch.float32) - 30
    variance = (blurred.sum(dim=0) * offsets**2).sum().item()
    assert variance == pytest.approx(9, rel=0.05)


def test_a_mask_of_another_size_is_stretched_with_a_warning(demo):
    image = picture()
    small = rectangle_mask((32, 24), (8, 8, 24, 16))
    with pytest.warns(UserWarning, match="the mask is 32x24 but the image is 64x48; stretching"):
        result = demo.inpaint("x", image, small, mask_blur=0, steps=2, seed=1, strength=1.0)
    ours, original = np.asarray(result.images[0]).astype(int), np.asarray(image).astype(int)
    assert np.array_equal(ours[:14], original[:14]) and np.abs(ours - original)[18:30, 18:46].mean() > 10


def test_nothing_to_inpaint_is_refused(demo):
    image = picture()
    with pytest.raises(InputError, match="the mask is all black: nothing to inpaint"):
        demo.inpaint("x", image, Image.new("L", (64, 48), 0))
    with pytest.raises(InputError, match="nothing to inpaint.*inverted"):
        demo.inpaint("x", image, Image.new("L", (64, 48), 255), invert_mask=True)
    with pytest.raises(InputError, match="half white after blurring"):
        demo.inpaint("x", image, Image.new("L", (64, 48), 60))


@pytest.mark.parametrize("options, fragment", [
    ({"fill": "mud"}, "unknown masked content 'mud'"),
    ({"mask_blur": -1}, "mask blur must be 0 or more"),
    ({"padding": -4, "only_masked": True}, "padding must be 0 or more"),
    ({"strength": 1.5}, "denoising strength"),
])
def test_bad_options_are_refused(demo, options, fragment):
    with pytest.raises(InputError, match=fragment):
        demo.inpaint("x", picture(), rectangle_mask((64, 48), (0, 0, 16, 16)), steps=2, **options)


def test_missing_mask_file_is_refused(demo, tmp_path):
    with pytest.raises(InputError, match="mask not found: .*absent.png"):
        demo.inpaint("x", picture(), tmp_path / "absent.png")
