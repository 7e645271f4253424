"""The SD x4 upscaler: the same images as diffusers' StableDiffusionUpscalePipeline for the same weights,
image, noise level and seed; loading from a diffusers folder and from the original single-file layout;
the real model's shapes; clear refusals of bad input."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import sdlab
from sdlab import devices
from sdlab.checkpoint import convert
from sdlab.checkpoint.detect import detect_config
from sdlab.config import ScheduleConfig, TextConfig
from sdlab.errors import InputError
from sdlab.pipelines.upscale import LOW_RES_SCHEDULE, X4_UPSCALER, noise_low_res, upscale
from sdlab.schedules import alphas_cumprod
from checkpoint_fixtures import schedule_buffers, write_tokenizer
from test_checkpoint import meta_state_dicts
from test_img2img import sample_image
from test_pipeline_parity import assert_latents_close, diffusers_scheduler, psnr

# x4-upscaling.yaml: both the model's schedule and the low-resolution image's noise augmentation are
# ldm's "linear" betas from 1e-4 to 0.02, i.e. linear in sqrt(beta): diffusers' "scaled_linear".
X4_BETAS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)
LOW_RES = (24, 16)  # width, height of the input: the size diffusers' image processor keeps (multiples of 4)


def tiny_diffusers_upscaler(folder) -> StableDiffusionUpscalePipeline:
    """The x4 upscaler's shape in miniature, random weights, saved as a diffusers folder: 7 input channels,
    noise-level classes, no attention on level 0, cross-attention only on level 1, self-attention on the
    deepest level; a 3-level VAE (factor 4) scaled by 0.08333; an OpenCLIP-like text encoder (GELU, pads
    with 0) with 64-channel heads as SD2's detection rules assume; v-prediction. The text is wider than
    the UNet levels, as in the real model, so a file's shapes tell cross-only attention from self-attention."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128,
        attention_head_dim=8, use_linear_projection=True, only_cross_attention=(True, True, False),
        num_class_embeds=1000, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
        scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
        projection_dim=128,
    ))
    write_tokenizer(folder / "tokenizer_files", TextConfig(pad_token_id=0))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_files"))
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(**X4_BETAS),
        scheduler=DDIMScheduler(**X4_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                                prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-x4")
    return tiny_diffusers_upscaler(folder), sdlab.load(str(folder)), folder


def run_diffusers(reference, prompt, image, **kwargs):
    latents = reference(prompt, image=image, output_type="latent", **kwargs).images
    with torch.no_grad():
        decoded = reference.vae.decode(latents / reference.vae.config.scaling_factor).sample
    return latents, reference.image_processor.postprocess(decoded, output_type="pil")


# -- the same images as diffusers -------------------------------------------------------------------


def test_loads_as_an_upscaler_from_a_diffusers_folder(models):
    _, pipe, _ = models
    config = pipe.config
    assert config.name == "sd2-x4-upscaler" and config.prediction == "v"
    assert config.unet.in_channels == 7 and config.unet.num_classes == 1000
    assert config.vae.downsample_factor == 4 and config.vae.scaling_factor == 0.08333
    assert config.schedule == ScheduleConfig(beta_start=0.0001, beta_end=0.02)


@pytest.mark.parametrize("sampler, noise_level", [("Euler a", 20), ("DDIM", 100), ("Euler", 0)])
def test_same_image_as_diffusers(models, sampler, noise_level):
    """Euler a checks the order of the generator's draws: the low-resolution image's noise, the
    initial latents, then each step's noise; DDIM the leading-spaced schedule diffusers' folder names."""
    reference, pipe, _ = models
    reference.scheduler = diffusers_scheduler(sampler, reference.scheduler.config)
    image, prompt, negative, seed, steps = sample_image(*LOW_RES), "a red disc", "blurry", 77, 6
    expected_latents, expected = run_diffusers(
        reference, prompt, image, negative_prompt=negative, noise_level=noise_level, num_inference_steps=steps,
        guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed))

    result = upscale(pipe, image, prompt, negative, noise_level=noise_level, steps=steps, guidance_scale=7.5,
                     seed=seed, sampler=sampler)
    assert_latents_close(result.latents, expected_latents)
    ours = np.asarray(result.images[0])
    assert ours.shape == (4 * LOW_RES[1], 4 * LOW_RES[0], 3) and ours.std() > 1
    assert psnr(ours, np.asarray(expected[0])) >= 40, f"PSNR {psnr(ours, np.asarray(expected[0])):.1f} dB"
    assert f"Noise level: {noise_level}" in result.infotexts[0]
    assert "Size: 96x64" in result.infotexts[0]


def test_a_batch_of_images_and_prompts_matches_diffusers(models):
    reference, pipe, _ = models
    reference.scheduler = diffusers_scheduler("Euler a", reference.scheduler.config)
    images = [sample_image(*LOW_RES, seed=1), sample_image(*LOW_RES, seed=2).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    prompts = ["a red disc", "a blue sky"]
    expected_latents, expected = run_diffusers(
        reference, prompts, images, num_inference_steps=4, guidance_scale=5.0, noise_level=30,
        generator=torch.Generator("cpu").manual_seed(3))
    result = upscale(pipe, images, prompts, steps=4, guidance_scale=5.0, noise_level=30, seed=3, sampler="Euler a",
                     noise="diffusers")
    assert_latents_close(result.latents, expected_latents)
    for ours, theirs in zip(result.images, expected):
        assert psnr(np.asarray(ours), np.asarray(theirs)) >= 40


def test_the_low_resolution_image_is_noised_with_ldm_q_sample():
    """sqrt(a_t) x + sqrt(1 - a_t) eps with a_t of the augmentation schedule, as diffusers' DDPMScheduler."""
    pixels, eps = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4)
    expected = DDPMScheduler(**X4_BETAS).add_noise(pixels, eps, torch.tensor([20]))
    torch.testing.assert_close(noise_low_res(pixels, eps, 20), expected, rtol=0, atol=1e-6)
    # ldm's own numbers: make_beta_schedule("linear") in float64 (ldm/modules/diffusionmodules/util.py)
    betas = torch.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(alphas_cumprod(LOW_RES_SCHEDULE).double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)


# -- loading -----------------------------------------------------------------------------------------


def x4_yaml_params() -> dict:
    """The numbers of Stability's configs/stable-diffusion/x4-upscaling.yaml, as diffusers reads them."""
    unet = {"num_classes": 1000, "image_size": 128, "in_channels": 7, "out_channels": 4, "model_channels": 256,
            "attention_resolutions": [2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4],
            "disable_self_attentions": [True, True, True, False], "num_heads": 8, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 1024, "legacy": False, "use_linear_in_transformer": True}
    vae = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                        "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                                        "attn_resolutions": [], "dropout": 0.0}}
    return {"model": {"params": {"scale_factor": 0.08333, "unet_config": {"params": unet},
                                 "first_stage_config": {"params": vae}}}}


def test_the_real_upscaler_layout_is_detected_from_shapes_and_matches_diffusers_reading_of_its_yaml():
    state = meta_state_dicts(X4_UPSCALER)
    assert detect_config(state) == X4_UPSCALER
    original = x4_yaml_params()
    unet_config = create_unet_diffusers_config_from_ldm(original, state)
    vae_config = create_vae_diffusers_config_from_ldm(original, state)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    for model, converted in ((unet, convert_ldm_unet_checkpoint(state, unet_config)),
                             (vae, convert_ldm_vae_checkpoint(state, vae_config))):
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}
    parameters = sum(v.numel() for k, v in state.items() if k.startswith(convert.UNET_PREFIX))
    assert parameters == sum(p.numel() for p in unet.parameters())


def single_file(pipe, path, with_betas: bool):
    """The pipeline's weights as an original-layout file with what Stability's x4 file holds besides:
    the model's DDPM buffers and the low-resolution schedule's under low_scale_model.; no sdlab metadata."""
    state = convert.join_original(pipe.config, pipe.unet.state_dict(), pipe.vae.state_dict(),
                                  pipe.text_encoder.state_dict())
    buffers = schedule_buffers(X4_UPSCALER)
    if with_betas:
        state.update(buffers)
    state.update({f"low_scale_model.{name}": value.clone() for name, value in buffers.items() if name.startswith(("betas", "alphas"))})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("with_betas", [True, False], ids=["betas-buffer", "no-buffers"])
def test_single_file_upscaler_is_detected_and_upscales_like_the_folder(models, tmp_path, with_betas):
    _, pipe, _ = models
    loaded = sdlab.load(str(single_file(pipe, tmp_path / "x4-upscaler-ema.safetensors", with_betas)))
    assert loaded.config.name == "sd2-x4-upscaler" and loaded.config.prediction == "v"
    # the scale is not in the file and the schedule only in `betas`: the upscaler's own are the defaults
    assert loaded.config.vae.scaling_factor == 0.08333
    assert loaded.config.schedule == ScheduleConfig(beta_start=0.0001, beta_end=0.02)
    assert loaded.config.text == pipe.config.text
    # the same UNet; a level without a transformer has no self-attention to disable, whatever a config says
    cross_only = lambda unet: [unet.disable_self_attention[level] for level in unet.attention_levels]  # noqa: E731
    assert cross_only(loaded.config.unet) == cross_only(pipe.config.unet) == [True, False]
    assert dataclasses.replace(loaded.config.unet, disable_self_attention=()) == \
        dataclasses.replace(pipe.config.unet, disable_self_attention=())
    image = sample_image(*LOW_RES)
    a = upscale(pipe, image, "a cat", steps=2, seed=1, sampler="Euler")
    b = upscale(loaded, image, "a cat", steps=2, seed=1, sampler="Euler")
    assert torch.equal(a.latents, b.latents)


def test_a_folder_that_leaves_sd_scaling_in_its_vae_config_gets_the_upscaler_scale(models, tmp_path):
    import json
    import shutil

    _, _, folder = models
    copy = tmp_path / "x4"
    shutil.copytree(folder, copy)
    config_path = copy / "vae" / "config.json"
    vae_config = json.loads(config_path.read_text())
    vae_config.pop("scaling_factor")
    config_path.write_text(json.dumps(vae_config))
    assert sdlab.load(str(copy)).config.vae.scaling_factor == 0.08333


# -- bad input ---------------------------------------------------------------------------------------


def test_images_that_are_not_rgb_are_converted(models):
    _, pipe, _ = models
    image = sample_image(*LOW_RES)
    options = dict(steps=2, seed=4, sampler="Euler")
    grey = image.convert("L")
    assert torch.equal(upscale(pipe, grey, "x", **options).latents, upscale(pipe, grey.convert("RGB"), "x", **options).latents)
    rgba = image.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: flattened onto white, as the web UI does
    white = Image.new("RGB", LOW_RES, (255, 255, 255))
    assert torch.equal(upscale(pipe, rgba, "x", **options).latents, upscale(pipe, white, "x", **options).latents)


@pytest.mark.parametrize("level", [-1, 351, 2.5, True, "20"])
def test_noise_level_outside_the_trained_range_is_refused(models, level):
    _, pipe, _ = models
    with pytest.raises(InputError, match="noise level must be an integer from 0 to 350"):
        upscale(pipe, sample_image(*LOW_RES), "x", noise_level=level)


def test_a_text_to_image_model_is_not_an_upscaler(tmp_path):
    pipe = sdlab.load("demo")
    with pytest.raises(InputError, match="is not an x4 upscaler.*x4-upscaler-ema.safetensors"):
        upscale(pipe, sample_image(*LOW_RES), "x")


def test_the_upscaler_refuses_text_to_image(models):
    _, pipe, _ = models
    with pytest.raises(InputError, match="takes 7 input channels"):
        pipe.txt2img("a cat", steps=1, width=32, height=32)


def test_any_image_size_is_upscaled_four_times(models):
    _, pipe, _ = models
    result = upscale(pipe, sample_image(25, 18), "x", steps=1, sampler="Euler")
    assert result.images[0].size == (100, 72) and result.latents.shape == (1, 4, 18, 25)


def test_images_of_one_batch_must_share_a_size(models):
    _, pipe, _ = models
    with pytest.raises(InputError, match="same size"):
        upscale(pipe, [sample_image(24, 16), sample_image(16, 16)], "x")


def test_a_size_that_cannot_be_decoded_whole_asks_for_the_tiled_vae_before_sampling(models, monkeypatch):
    _, pipe, _ = models
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 1000)
    steps = []
    with pytest.raises(InputError, match="tiled VAE"):
        upscale(pipe, sample_image(*LOW_RES), "x", steps=2, tiled_vae=False, callback=steps.append)
    assert steps == []
    # the default decides for itself: it tiles, and tiles give the untiled image
    tiled = upscale(pipe, sample_image(*LOW_RES), "x", steps=2, seed=1, sampler="Euler")
    monkeypatch.undo()
    whole = upscale(pipe, sample_image(*LOW_RES), "x", steps=2, seed=1, sampler="Euler", tiled_vae=False)
    difference = np.abs(np.asarray(tiled.images[0], dtype=int) - np.asarray(whole.images[0], dtype=int))
    assert difference.max() <= 1


# -- command line ------------------------------------------------------------------------------------


def test_upscale_command_writes_a_png_four_times_larger_with_its_parameters(models, tmp_path, capsys):
    import argparse

    from sdlab.infotext import parse_infotext
    from sdlab.cli.upscale import add_upscale_command

    _, _, folder = models
    parser = argparse.ArgumentParser()
    add_upscale_command(parser.add_subparsers())
    sample_image(*LOW_RES).save(tmp_path / "low.png")
    out = tmp_path / "big.png"
    args = parser.parse_args(["upscale", str(tmp_path / "low.png"), "a red disc", "--model", str(folder),
                              "--steps", "2", "--seed", "5", "--noise-level", "40", "-o", str(out), "--quiet"])
    assert args.run(args) == 0
    with Image.open(out) as written:
        assert written.size == (96, 64)
        fields = parse_infotext(written.info["parameters"])
    assert (fields["CFG scale"], fields["Noise level"], fields["Seed"]) == ("9", "40", "5")
    with pytest.raises(InputError, match="leave out --size and --batch"):
        args = parser.parse_args(["upscale", str(tmp_path / "low.png"), "x", "--size", "64x64"])
        args.run(args)
