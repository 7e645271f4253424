"""The models that ship in src/sdlab/weights/: they load, stay within budget, give the stored image
for a seed, and a reduced evaluation stays above a floor a few points below the measured figures
(MODEL_CARD.md), so a regression in any part of the stack fails here."""

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab import bundled
from sdlab.checkpoint.io import read_state_dict
from sdlab.cli import main
from sdlab.shapes.check import check
from sdlab.training.components import resolve_model_config

REFERENCE = Path(__file__).parent / "data" / "bundled-red-circle-seed0.png"
PROMPT = "a large red circle on the left"
FILES = (bundled.BUNDLED_MODEL, bundled.BUNDLED_INPAINTING, bundled.BUNDLED_UPSCALER)
RECIPE = Path(__file__).parents[1] / "recipes" / "shapes-model.toml"

# The reduced evaluation below measured (20 steps Euler a, the commands' default sampler, CFG 5, seed 123,
# 30 captions; AMD EPYC): single objects (15 captions) 1.0 in every attribute; relations (9 captions) all
# and relation 0.89, count, colour and shape 1.0; held-out pairs (6) all and colour 0.83, relation 0.67,
# shape and count 1.0. Floors sit an image or two below, since another CPU's rounding may flip a borderline
# image (one held-out caption is 0.17). The relation floor is above the 0.56 of the model shipped before
# the relation runs, which ignored it; the count floor above the 0.67 of the one shipped before the
# mirrored-caption runs, which drew extra objects.
FLOORS = {"single": {"all": 0.85, "colour": 0.85, "shape": 0.9, "size": 0.9, "position": 0.9, "background": 0.9},
          "relation": {"all": 0.75, "colour": 0.85, "shape": 0.85, "count": 0.75, "relation": 0.75},
          "held_out": {"colour": 0.5, "shape": 0.65, "all": 0.5}}
# Inpainting, these 6 scenes (Euler a): erase 0.83, insert 0.67 (0.83 and 0.78 on 60); the inpainter shipped
# before its object-mask fine-tune inserted 0.33, and a model that leaves the mask alone scores 0 on both.
ERASE_FLOOR = 0.6
INSERT_FLOOR = 0.5


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


def test_the_bundled_files_are_fp16_within_40_mb_and_share_one_vae_and_text_encoder():
    assert sum(os.path.getsize(f) for f in FILES) <= 40 * 1024 * 1024
    tensors, _ = read_state_dict(bundled.BUNDLED_MODEL)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    for path in FILES[1:]:
        tensors, metadata = read_state_dict(path)
        assert metadata["sdlab_shared_parts"] == os.path.basename(bundled.BUNDLED_MODEL)
        assert all(key.startswith("model.diffusion_model.") for key in tensors)


def test_the_default_model_is_the_bundled_one_with_the_recipe_s_sizes(pipe):
    recipe = resolve_model_config(str(RECIPE))
    assert pipe.model_name == "sdlab-shapes"
    assert (pipe.config.unet, pipe.config.text.width, pipe.config.vae.ch_mult) == \
        (recipe.unet, recipe.text.width, recipe.vae.ch_mult)
    assert bundled.default_model_path("inpaint") == bundled.BUNDLED_INPAINTING
    assert sdlab.load(task="inpaint").config.unet.in_channels == 9
    assert sdlab.load(task="upscale").config.unet.num_classes is not None


def test_a_seed_gives_the_stored_image(pipe):
    image = pipe.txt2img(PROMPT, steps=20, sampler="DPM++ 2M", guidance_scale=5.0, seed=0).images[0]
    reference = np.asarray(Image.open(REFERENCE).convert("RGB"), dtype=np.int16)
    difference = np.abs(np.asarray(image, dtype=np.int16) - reference)
    # other CPUs round float32 sums differently; a different model or sampler changes far more
    assert difference.mean() < 1.0 and difference.max() <= 24, (difference.mean(), difference.max())
    assert check(image, PROMPT)["all"]


def test_a_reduced_evaluation_stays_above_the_floor(pipe):
    from sdlab.shapes.evaluation import evaluate, table

    rates = table(evaluate(pipe, n=30, seed=123, with_paraphrases=False))
    for group, floors in FLOORS.items():
        for attribute, floor in floors.items():
            assert rates[group][attribute] >= floor, (group, rates[group])


def test_the_vae_gives_back_every_colour_on_every_background(pipe):
    """Rendered scenes, encoded and decoded: the checker reads each object's colour back. Measured 108 of
    108; the VAE shipped before its decoder was fine-tuned turned 5 orange objects on white yellow."""
    from sdlab.shapes.dataset import BACKGROUNDS, COLOURS, render, scene_from_caption, to_tensor
    from sdlab.pipelines.latents import decode_latents, encode_posterior

    rng = np.random.default_rng(0)
    captions = [f"a {size} {colour} {shape} in the center on a {background} background"
                for size, colour, shape, background in itertools.product(
                    ("small", "large"), COLOURS, ("circle", "square", "triangle"), BACKGROUNDS)]
    images = torch.stack([to_tensor(render(scene_from_caption(caption, rng))) for caption in captions])
    with torch.no_grad():
        latents = encode_posterior(pipe, images).mean * pipe.config.vae.scaling_factor
        decoded = decode_latents(pipe, latents)
    wrong = [caption for image, caption in zip(decoded, captions) if not check(image, caption)["colour"]]
    assert len(wrong) <= 1, wrong  # one borderline image may flip on another CPU


def test_the_inpainting_model_erases_shapes_and_draws_asked_for_ones():
    from sdlab.shapes.edit_eval import evaluate_inpainting

    rates = evaluate_inpainting(sdlab.load(task="inpaint"), n=6, seed=7)
    assert rates["erase"] >= ERASE_FLOOR, rates
    assert rates["appears"] >= INSERT_FLOOR, rates


def test_the_upscaler_stays_close_to_bicubic_at_32_to_128_px():
    """4 scenes, 32 -> 128 px, 20 steps Euler a: the upscaler measured 33.5 dB, bicubic 36.1 dB, a grey
    canvas 19.5 dB (MODEL_CARD.md; 10 scenes: 31.6 against 30.3)."""
    from sdlab.shapes.dataset import render, sample_scene
    from sdlab.shapes.edit_eval import evaluate_upscaling, psnr

    result = evaluate_upscaling(sdlab.load(task="upscale"), n=4, seed=5)
    rng = np.random.default_rng(5)  # the scenes evaluate_upscaling draws
    blank = np.mean([psnr(Image.new("RGB", (128, 128), (128, 128, 128)), render(sample_scene(rng), 128))
                     for _ in range(4)])
    assert result["model"] >= result["bicubic"] - 3.5 and result["model"] >= blank + 10, (result, blank)


def test_the_readme_command_uses_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "-o", str(out), "--seed", "1", "--quiet"]) == 0
    assert "demo" not in capsys.readouterr().err
    image = Image.open(out)
    assert image.size == (64, 64) and "Model: sdlab-shapes" in image.text["parameters"]
