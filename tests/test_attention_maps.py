"""Cross-attention maps as a picture: `sdlab generate --attention-maps`, and the pieces behind it."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.inside.attention_maps import WordMaps, attention_sheet, prompt_words
from test_cli import assert_one_line_error, run_main


def test_prompt_words_are_the_tokens_without_emphasis_syntax():
    assert prompt_words("a (red:1.3) circle, [blue] BREAK square") == ["a", "red", "circle", ",", "blue"]
    assert len(prompt_words("red " * 100)) == 75  # the first window, past its start token
    assert prompt_words("a red circle <lora:shiny:0.8>") == ["a", "red", "circle"]
    assert prompt_words("a [red:blue:5] circle", steps=3) == ["a", "red", "circle"]  # step 5 never comes


def test_word_maps_average_the_conditional_rows_of_one_image_over_calls():
    maps = WordMaps(batch_size=2, count=2, height=4, width=4, image=1)
    for value in (1.0, 3.0):
        probabilities = torch.zeros(4, 4, 77)  # uncond image 0, uncond image 1, cond image 0, cond image 1
        probabilities[3, :, 1] = value  # image 1's first word, everywhere
        probabilities[3, 0, 2] = value  # its second word, top-left position only (2x2 map)
        maps.append(probabilities)
    mean = maps.mean()
    assert mean.shape == (2, 4, 4)
    torch.testing.assert_close(mean[0], torch.full((4, 4), 2.0))
    assert mean[1, 0, 0] == pytest.approx(2.0) and mean[1, 3, 3] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no cross-attention"):
        WordMaps(1, 1).mean()


def test_the_sheet_shows_the_image_and_one_tile_per_word():
    image = Image.new("RGB", (64, 64), (200, 0, 0))
    sheet = attention_sheet(image, torch.rand(3, 64, 64), ["a", "red", "circle"], tile=32)
    assert sheet.size == (4 * 36 + 4, 32 + 14 + 8)
    assert np.asarray(sheet)[20, 20].tolist() == [200, 0, 0]  # the image itself, first


def test_generate_writes_where_each_word_was_read(tmp_path):
    out, maps = tmp_path / "image.png", tmp_path / "maps.png"
    code, stdout, stderr = run_main("generate", "a large red circle on the left", "--seed", "1", "--cfg", "5",
                                   "--sampler", "DPM++ 2M", "-o", str(out), "--attention-maps", str(maps), "--quiet")
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path)) == ["image.png", "maps.png"]
    words = ["a", "large", "red", "circle", "on", "the", "left"]
    tile = 128
    with Image.open(maps) as sheet:
        assert sheet.size == ((1 + len(words)) * (tile + 4) + 4, tile + 22)
        pixels = np.asarray(sheet.convert("RGB"), dtype=np.float32)
    # the bundled model reads "red" where it draws the circle, on the left: the heat (red + green
    # channels over the faded image) of the word's tile is stronger in its left half
    x = 4 + (1 + words.index("red")) * (tile + 4)
    heat = pixels[4:4 + tile, x:x + tile, :2].sum(-1)
    assert heat[:, :tile // 2].mean() > 1.2 * heat[:, tile // 2:].mean()


@pytest.mark.parametrize("args, fragment", [
    (["--attention-maps", "maps.jpg"], "must be a .png"),
    (["--attention-maps", "maps.png", "--hires-scale", "2"], "leave out --hires-scale"),
    (["--attention-maps", "maps.png", "--prompt-edit"], "one prompt for every step"),
    (["--attention-maps", "x.png"], "is also an image output"),
])
def test_attention_map_mistakes_are_one_line(tmp_path, args, fragment):
    prompt = "a [red:blue:0.5] circle" if "--prompt-edit" in args else "a red circle"
    args = [a if not a.endswith(".png") and not a.endswith(".jpg") else str(tmp_path / a)
            for a in args if a != "--prompt-edit"]
    code, _, stderr = run_main("generate", prompt, "--steps", "2", "-o", str(tmp_path / "x.png"), *args)
    assert_one_line_error(code, stderr, fragment)
    assert os.listdir(tmp_path) == []
