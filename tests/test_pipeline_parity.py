"""End to end: same weights, prompt, seed, sampler and steps -> the same image as diffusers.

diffusers builds a tiny Stable Diffusion with random weights and saves it as a diffusers folder;
sdlab loads that folder and both generate. PSNR >= 40 dB between the two images.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import sdlab
from checkpoint_fixtures import write_tokenizer
from sdlab.config import TextConfig

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                   steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def tiny_diffusers_sd(folder, family: str, prediction: str):
    """A random tiny SD1-shaped (CLIP, conv projections, 8 heads) or SD2-shaped (OpenCLIP-like text encoder
    with GELU, linear projections, 64-channel heads ... scaled down) pipeline, saved to `folder`."""
    torch.manual_seed(0)
    sd2 = family == "sd2"
    context = 64 if sd2 else 32
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context, attention_head_dim=(2, 4) if sd2 else 8, use_linear_projection=sd2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    )
    text_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=context, intermediate_size=4 * context, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if sd2 else 49407, projection_dim=context,
    )
    text_encoder = CLIPTextModel(text_config)
    write_tokenizer(folder / "tokenizer_files", TextConfig(pad_token_id=0 if sd2 else 49407))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_files"))
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # SD's own scheduler_config.json: the other schedulers are made from it with from_config, as users do
    scheduler = DDIMScheduler(**SD_SCHEDULE, prediction_type="v_prediction" if prediction == "v" else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return pipe


SCHEDULERS = {
    "Euler": EulerDiscreteScheduler,
    "Euler a": EulerAncestralDiscreteScheduler,
    "DDIM": DDIMScheduler,
    "DPM++ 2M Karras": DPMSolverMultistepScheduler,
}


def run_diffusers(reference, prompt, **kwargs):
    """diffusers' final latents and its images decoded from them (one run gives both)."""
    latents = reference(prompt, output_type="latent", **kwargs).images
    with torch.no_grad():
        decoded = reference.vae.decode(latents / reference.vae.config.scaling_factor).sample
    return latents, reference.image_processor.postprocess(decoded, output_type="pil")


def assert_latents_close(ours, theirs):
    scale = theirs.abs().max().item()
    assert scale > 0.1
    assert (ours.cpu() - theirs).abs().max().item() <= 1e-3 * scale


def diffusers_scheduler(name: str, config):
    if name == "DPM++ 2M Karras":
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, algorithm_type="dpmsolver++")
    return SCHEDULERS[name].from_config(config)


@pytest.mark.parametrize(
    "family, prediction, sampler",
    [("sd1", "epsilon", "Euler"), ("sd1", "epsilon", "Euler a"), ("sd1", "epsilon", "DPM++ 2M Karras"),
     ("sd1", "epsilon", "DDIM"), ("sd2", "v", "Euler"), ("sd2", "v", "DDIM")],
)
def test_same_image_as_diffusers(tmp_path, family, prediction, sampler):
    reference = tiny_diffusers_sd(tmp_path, family, prediction)
    reference.scheduler = diffusers_scheduler(sampler, reference.scheduler.config)
    prompt, negative, seed, steps, size = "a red circle on a blue background", "blurry", 1234, 8, 32
    expected_latents, expected = run_diffusers(
        reference, prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5, height=size,
        width=size, generator=torch.Generator("cpu").manual_seed(seed),
    )

    pipe = sdlab.load(str(tmp_path), prediction=prediction)
    assert pipe.config.prediction == prediction
    result = pipe.txt2img(prompt, negative, steps=steps, guidance_scale=7.5, seed=seed, width=size, height=size,
                          sampler=sampler, noise="diffusers")
    assert_latents_close(result.latents, expected_latents)
    ours = np.asarray(result.images[0])
    theirs = np.asarray(expected[0])
    assert ours.shape == theirs.shape == (size, size, 3)
    assert ours.std() > 1, "degenerate image: the comparison would prove nothing"
    assert psnr(ours, theirs) >= 40, f"PSNR {psnr(ours, theirs):.1f} dB"


def test_batch_and_explicit_latents_match_diffusers(tmp_path):
    reference = tiny_diffusers_sd(tmp_path, "sd1", "epsilon")
    reference.scheduler = diffusers_scheduler("Euler", reference.scheduler.config)
    latents = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    expected_latents, expected = run_diffusers(
        reference, ["a cat", "a dog"], negative_prompt=["", "ugly"], num_inference_steps=5, guidance_scale=5.0,
        height=32, width=32, latents=latents.clone(),
    )
    pipe = sdlab.load(str(tmp_path))
    result = pipe.txt2img(["a cat", "a dog"], ["", "ugly"], steps=5, guidance_scale=5.0, width=32, height=32,
                          batch_size=2, sampler="Euler", latents=latents.clone(), noise="diffusers")
    assert_latents_close(result.latents, expected_latents)
    for ours, theirs in zip(result.images, expected):
        assert psnr(np.asarray(ours), np.asarray(theirs)) >= 40


@pytest.mark.slow
def test_full_size_sd15_single_file_gives_diffusers_image(tmp_path, monkeypatch):
    """The real SD 1.5 shapes end to end: sdlab saves a random-weight SD 1.5 as a single fp16 file, then
    sdlab.load and diffusers' from_single_file (offline, local configs) generate the same 64x64 image."""
    import huggingface_hub.constants

    from checkpoint_fixtures import ldm_yaml, write_diffusers_configs
    from sdlab.checkpoint.save import save_single_file
    from sdlab.config import SD1
    from sdlab.models import build_text_encoder, build_unet, build_vae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)
    path = save_single_file(tmp_path / "sd15.safetensors", SD1, build_unet(SD1.unet), build_vae(SD1.vae),
                            build_text_encoder(SD1.text), dtype=torch.float16)
    prompt, negative, seed = "a watercolour painting of a lighthouse", "blurry", 11

    pipe = sdlab.load(str(path))
    assert pipe.config == SD1
    ours = pipe.txt2img(prompt, negative, steps=2, guidance_scale=7.5, seed=seed, width=64, height=64, sampler="Euler")
    del pipe

    (tmp_path / "v1-inference.yaml").write_text(ldm_yaml(SD1))
    reference = StableDiffusionPipeline.from_single_file(
        str(path), config=str(write_diffusers_configs(tmp_path / "configs", SD1)),
        original_config=str(tmp_path / "v1-inference.yaml"), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, torch_dtype=torch.float32)
    reference.scheduler = diffusers_scheduler("Euler", reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected_latents, expected = run_diffusers(
        reference, prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(seed))
    assert_latents_close(ours.latents, expected_latents)
    assert psnr(np.asarray(ours.images[0]), np.asarray(expected[0])) >= 40
