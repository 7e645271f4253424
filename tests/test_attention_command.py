"""`sdlab attention`: per-word heat maps over chosen steps and layers, and the per-step animation."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdlab
from sdlab.inside.attention_maps import word_positions
from sdlab.models.attention import attention_hooks, map_shape
from sdlab.shapes.check import analyse
from sdlab.tokenizer import get_tokenizer
from test_cli import assert_one_line_error, run_main

PROMPT = "a large red circle on the left"
WORDS = ["a", "large", "red", "circle", "on", "the", "left"]
TILE = 128


def test_the_colour_words_map_peaks_inside_the_drawn_shape():
    """For 20 seeds (one batch), the argmax of "red"'s map, summed over steps and layers, lies in the
    bounding box of the circle the checker finds in the picture. (The bundled model reads its shape word
    "circle" as a sink, peaking on the image's border, so the colour word is the one that localises.)"""
    pipe = sdlab.load()
    seeds = 20
    position = word_positions("red", get_tokenizer().encode(PROMPT), "test")[0]
    total = torch.zeros(seeds, 64, 64)

    def record(site, probabilities):
        looks = probabilities[-seeds:, :, :, position].mean(1)  # the conditional rows, (20, h*w)
        h, w = map_shape(looks.shape[1], 64, 64)
        total.add_(F.interpolate(looks.reshape(seeds, 1, h, w).float(), size=(64, 64), mode="bilinear")[:, 0])

    with attention_hooks(pipe.unet, record):
        result = pipe.txt2img(PROMPT, steps=12, guidance_scale=5, sampler="DPM++ 2M", seed=0, batch_size=seeds)
    inside = 0
    for maps, image in zip(total, result.images):
        objects = analyse(image).objects
        y, x = divmod(int(maps.argmax()), 64)
        if objects:
            (cx, cy), half = objects[0].center, objects[0].side / 2
            inside += abs((x + 0.5) / 64 - cx) <= half and abs((y + 0.5) / 64 - cy) <= half
    assert inside >= 18, inside


def test_attention_writes_the_sheet_and_one_animation_frame_per_step(tmp_path):
    out, animation = tmp_path / "maps.png", tmp_path / "maps.webp"
    code, _, stderr = run_main("attention", PROMPT, "--seed", "1", "--sampling-steps", "6", "--steps", "1:5",
                              "--words", "red,circle", "--layers", "up", "--overlay", "-o", str(out),
                              "--animation", str(animation), "--quiet")
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path)) == ["maps.png", "maps.webp"]
    with Image.open(out) as sheet:
        assert sheet.size == (3 * (TILE + 4) + 4, TILE + 22)
        assert "Seed: 1" in sheet.info["parameters"]
    with Image.open(animation) as frames:
        assert frames.n_frames == 4  # steps 1, 2, 3, 4


def test_without_overlay_a_map_is_heat_alone(tmp_path):
    out = tmp_path / "maps.png"
    code, _, stderr = run_main("attention", PROMPT, "--seed", "1", "--sampling-steps", "4", "--words", "circle",
                              "-o", str(out), "--quiet")
    assert code == 0, stderr
    with Image.open(out) as sheet:
        tile = np.asarray(sheet.convert("RGB"))[4:4 + TILE, TILE + 8:2 * TILE + 8].reshape(-1, 3)
    # every colour of the heat scale has R, G >= 20 and B >= 40; a faded picture under it would go lower
    assert (tile.min(axis=0) >= [20, 20, 40]).all()


@pytest.mark.parametrize("args, fragment", [
    (["--words", "red,square"], "'square' is not a word of the prompt"),
    (["--steps", "5:30"], "--steps takes A:B"),
    (["--steps", "3"], "--steps takes A:B"),
    (["--animation", "maps.mp4"], "must be a .webp or .gif"),
])
def test_attention_mistakes_are_one_line_and_write_nothing(tmp_path, args, fragment):
    args = [str(tmp_path / a) if a.startswith("maps.") else a for a in args]
    code, _, stderr = run_main("attention", PROMPT, "--sampling-steps", "20", "-o", str(tmp_path / "maps.png"), *args)
    assert_one_line_error(code, stderr, fragment)
    assert os.listdir(tmp_path) == []


def test_the_command_runs_through_the_memory_check(tmp_path):
    """`sdlab attention` goes through the CLI's size and memory check like every command that draws
    (it once crashed there: its --steps is a window of steps, not their number)."""
    out = tmp_path / "maps.png"
    code, _, stderr = run_main("attention", "a red circle", "-o", str(out), "--steps", "0:2", "--sampling-steps", "3",
                               "--seed", "1", "--quiet")
    assert code == 0, stderr
    assert out.exists()
    code, _, stderr = run_main("attention", "a red circle", "-o", str(tmp_path / "big.png"), "--size", "100000x100000")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "big.png").exists()
