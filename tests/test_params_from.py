"""`sdlab generate --params-from IMAGE`: an image's parameters, read back, re-make it; the command line wins."""

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from sdlab.cli import main
from sdlab.infotext import parse_infotext
from sdlab.outputs import save_image as save_png
from sdlab.outputs import read_parameters
from sdlab.pipelines.from_params import options_from_infotext

SIZE = ["--size", "64x64", "--quiet"]


@pytest.fixture(scope="module")
def bundled():
    from sdlab.bundled import BUNDLED_MODEL

    assert os.path.exists(BUNDLED_MODEL), "the bundled model ships in src/sdlab/weights/"
    return str(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def lora_dir(bundled, tmp_path_factory):
    """A kohya LoRA on the bundled model's text encoder, found by a <lora:tiny:w> tag."""
    import sdlab

    folder = tmp_path_factory.mktemp("loras")
    text_encoder = sdlab.load(bundled).text_encoder
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, module in text_encoder.named_modules():
        if isinstance(module, nn.Linear) and ".self_attn." in name:
            key = "lora_te_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=generator) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=generator) * 0.3
            state[f"{key}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    save_file(state, str(folder / "tiny.safetensors"), metadata={"ss_network_module": "networks.lora"})
    return str(folder)


def run(*args) -> None:
    assert main(["generate", *args]) == 0


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def without_batch_fields(text: str) -> str:
    """The parameters' fields but "Batch size" and "Batch pos": a batch's image re-runs alone."""
    fields = parse_infotext(text)
    return {key: value for key, value in fields.items() if key not in ("Batch size", "Batch pos")}


NON_DEFAULTS = ["--sampler", "DPM++ 2M", "--schedule", "karras", "--cfg", "5.5", "--steps", "4", "--seed", "11",
                "--clip-skip", "2", "--subseed", "3", "--subseed-strength", "0.4", "--seed-resize-from", "48x48",
                "--tiling", "--negative", "blurry, (dark:1.2)"]


@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_each_image_of_a_run_with_many_options_is_made_again_from_its_file(bundled, lora_dir, tmp_path, extension):
    made = tmp_path / f"made.{extension}"
    run("(red:1.3) circle <lora:tiny:0.8>", *NON_DEFAULTS, "--n-iter", "2", "--lora-dir", lora_dir, *SIZE,
        "-o", str(made))
    for image in (made, tmp_path / f"made-1.{extension}"):
        again = tmp_path / f"again.{extension}"
        run("--params-from", str(image), "--lora-dir", lora_dir, "--quiet", "-o", str(again))
        assert read_parameters(str(again)) == read_parameters(str(image))
        assert np.array_equal(pixels(again), pixels(image))
    fields = parse_infotext(read_parameters(str(made)))
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras" and "<lora:tiny:0.8>" in fields["Prompt"]


def test_an_image_of_a_batch_is_made_again_alone(bundled, tmp_path):
    """Image 1 of a batch of 2 re-runs as a batch of one under its own seed. The bundled UNet's batched
    convolutions round differently from a single image's on the CPU, so pixels may differ by 1."""
    run("a blue square", "--steps", "3", "--seed", "40", "--batch", "2", *SIZE, "-o", str(tmp_path / "b.png"))
    run("--params-from", str(tmp_path / "b-1.png"), "--quiet", "-o", str(tmp_path / "again.png"))
    made, again = read_parameters(str(tmp_path / "b-1.png")), read_parameters(str(tmp_path / "again.png"))
    assert parse_infotext(made)["Seed"] == "41" and without_batch_fields(again) == without_batch_fields(made)
    assert "Batch size" not in again
    assert np.abs(pixels(tmp_path / "again.png") - pixels(tmp_path / "b-1.png")).max() <= 1


def test_a_hires_fix_image_is_made_again_with_its_second_pass(bundled, tmp_path):
    made = tmp_path / "h.png"
    run("a green triangle", "--steps", "3", "--seed", "2", "--hires-scale", "1.5", "--hires-steps", "2",
        "--hires-strength", "0.6", "--hires-upscaler", "latent-nearest-exact", *SIZE, "-o", str(made))
    run("--params-from", str(made), "--quiet", "-o", str(tmp_path / "again.png"))
    assert read_parameters(str(tmp_path / "again.png")) == read_parameters(str(made))
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(made))
    assert Image.open(made).size == (96, 96)


def test_options_on_the_command_line_win_over_the_files(bundled, tmp_path, capsys):
    made = tmp_path / "m.png"
    run("a red circle", "--steps", "4", "--cfg", "3", "--seed", "9", *SIZE, "-o", str(made))
    run("--params-from", str(made), "--steps", "3", "--quiet", "-o", str(tmp_path / "three.png"))
    fields = parse_infotext(read_parameters(str(tmp_path / "three.png")))
    assert (fields["Steps"], fields["CFG scale"], fields["Seed"], fields["Prompt"]) == ("3", "3", "9", "a red circle")
    # a flag given with its default value is still given
    run("a yellow star", "--params-from", str(made), "--cfg", "7", "--quiet", "-o", str(tmp_path / "seven.png"))
    fields = parse_infotext(read_parameters(str(tmp_path / "seven.png")))
    assert (fields["Steps"], fields["CFG scale"], fields["Prompt"]) == ("4", "7", "a yellow star")
    assert "warning" not in capsys.readouterr().err  # the same model: nothing to say


def test_another_model_named_in_the_file_is_one_warning_line(bundled, tmp_path, capsys):
    made = tmp_path / "m.png"
    run("a red circle", "--steps", "2", "--seed", "1", *SIZE, "-o", str(made))
    text = read_parameters(str(made)).replace("Model hash: ", "Model hash: 0").replace("Model: ", "Model: other-")
    save_png(Image.open(made).convert("RGB"), str(tmp_path / "other.png"), text)
    capsys.readouterr()
    run("--params-from", str(tmp_path / "other.png"), "--quiet", "-o", str(tmp_path / "again.png"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "other-sdlab-shapes" in warnings[0]
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(made))


def test_a_file_without_parameters_is_one_line_and_exit_2(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--params-from", str(tmp_path / "plain.png"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "carries no generation parameters" in err[0]


def test_without_params_from_the_prompt_is_still_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--steps", "3"])
    assert exit_.value.code == 2
    assert "the following arguments are required: prompt" in capsys.readouterr().err


# -- reading infotexts ---------------------------------------------------------------------------------------------


WEB_UI_TEXT = """masterpiece, <lora:detail:0.6> (cat:1.2)
Negative prompt: lowres, bad anatomy
Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, \
Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse.safetensors, Variation seed: 77, \
Variation seed strength: 0.25, Seed resize from: 448x640, Denoising strength: 0.45, Clip skip: 2, ENSD: 31337, \
Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent (nearest-exact), Lora hashes: "detail: 0123456789ab", \
Tiling: True, Version: v1.6.0"""


def test_a_web_ui_infotext_with_an_old_sampler_name_maps_to_sdlabs_options():
    settings, hires, model, notes = options_from_infotext(WEB_UI_TEXT)
    assert settings == {
        "prompt": "masterpiece, <lora:detail:0.6> (cat:1.2)", "negative_prompt": "lowres, bad anatomy",
        "steps": 28, "guidance_scale": 6.5, "seed": 1234, "clip_skip": 2, "subseed": 77, "subseed_strength": 0.25,
        "seed_resize_from": (448, 640), "tiling": True, "width": 512, "height": 768, "sampler": "DPM++ 2M",
        "schedule_type": "karras", "noise": "a1111-gpu",  # no RNG field: the web UI's default, GPU
    }
    assert hires == {"hires_scale": 1.5, "hires_strength": 0.45, "hires_steps": 10,
                     "hires_upscaler": "latent-nearest-exact"}
    assert model == {"name": "v1-5-pruned-emaonly", "hash": "6ce0161689", "vae": "vae-ft-mse.safetensors",
                     "vae_hash": "735e4c3a44"}
    assert notes == ["fields sdlab does not use: ENSD"]


@pytest.mark.parametrize("fields, noise", [
    ("RNG: CPU, Noise: per-image", "per-image"),  # sdlab's own mode comes first
    ("RNG: CPU", "a1111-cpu"),
    ("RNG: NV", "a1111-gpu"),
    ("RNG: GPU", "a1111-gpu"),
    ("Noise: diffusers", "diffusers"),
])
def test_the_noise_mode_comes_from_noise_else_rng(fields, noise):
    settings = options_from_infotext(f"x\nSteps: 3, Sampler: Euler, CFG scale: 7, {fields}").settings
    assert settings["noise"] == noise


@pytest.mark.parametrize("sampler, schedule", [
    ("Sampler: Euler a", None),  # no Schedule type: Automatic
    ("Sampler: DPM++ 2M, Schedule type: Automatic", None),
    ("Sampler: DPM++ SDE, Schedule type: Exponential", "exponential"),
    ("Sampler: DPM++ 2M SDE Karras", "karras"),
])
def test_sampler_and_schedule_type(sampler, schedule):
    settings = options_from_infotext(f"x\nSteps: 3, {sampler}, CFG scale: 7, Seed: 1").settings
    assert settings["schedule_type"] == schedule


def test_values_sdlab_cannot_use_are_notes_not_errors():
    settings, hires, _, notes = options_from_infotext(
        "x\nSteps: 3, Sampler: Restart, CFG scale: 7, Seed: 1, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+")
    assert "sampler" not in settings and hires["hires_upscaler"] == "lanczos"
    assert len(notes) == 2 and "Restart" in notes[0] and "R-ESRGAN 4x+" in notes[1]


def test_img2img_and_inpaint_fields():
    settings, hires, _, _ = options_from_infotext(
        "x\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Denoising strength: 0.6, Resize mode: Crop and resize, "
        "Mask blur: 6, Inpaint area: Only masked, Masked area padding: 16, Mask mode: Inpaint not masked, "
        "Masked content: latent noise")
    assert hires is None
    assert {k: settings[k] for k in ("strength", "resize_mode", "mask_blur", "only_masked", "padding", "invert_mask",
                                     "fill")} == {"strength": 0.6, "resize_mode": "crop", "mask_blur": 6.0,
                                                  "only_masked": True, "padding": 16, "invert_mask": True,
                                                  "fill": "latent noise"}
