"""Outpainting: the canvas grows by the asked pixels (rounded up to what the UNet takes), the image sits
unscaled at its offset and stays untouched away from the seam; only the margins are painted."""

import numpy as np
import pytest
import torch

import sdlab
from sdlab.errors import InputError
from sdlab.pipelines.images import blur_mask
from sdlab.pipelines.outpaint import outpaint_mask, parse_extend, round_canvas
from test_img2img import sample_image


@pytest.fixture(scope="module")
def demo():
    return sdlab.load("demo")


def test_canvas_grows_and_the_image_keeps_its_place(demo):
    image = sample_image(64, 48, seed=2)
    result = demo.outpaint("a beach", image, extend={"left": 20, "bottom": 16}, steps=3, seed=5, sampler="Euler")
    out, original = np.asarray(result.images[0]).astype(int), np.asarray(image).astype(int)
    # 64 + 20 = 84 wide rounds up to 88 (the demo's VAE takes multiples of 8): the extra goes left
    assert result.images[0].size == (88, 64)
    sides = {"left": 24, "right": 0, "top": 0, "bottom": 16}
    assert 'Outpaint extend: "left=24,right=0,top=0,bottom=16", Outpaint overlap: 8' in result.infotexts[0]
    assert "Size: 88x64" in result.infotexts[0]
    untouched = blur_mask(outpaint_mask((64, 48), sides, 8), 4).numpy()[:48, 24:] == 0
    assert untouched.sum() > 0.4 * untouched.size
    assert np.array_equal(out[:48, 24:][untouched], original[untouched])
    stretched = np.repeat(original[:, :1], 24, axis=1)  # what the left margin started from
    assert np.abs(out[:48, :24] - stretched).mean() > 10, "the margin is painted"


def test_round_canvas_puts_the_extra_pixels_on_the_growing_side():
    assert round_canvas((64, 48), {"left": 20, "right": 0, "top": 0, "bottom": 16}, 16) == \
        {"left": 32, "right": 0, "top": 0, "bottom": 16}
    # both sides growing: the extra goes right; a side that does not grow gets none unless it must
    assert round_canvas((64, 64), {"left": 8, "right": 8, "top": 0, "bottom": 0}, 64) == \
        {"left": 8, "right": 56, "top": 0, "bottom": 0}
    assert round_canvas((60, 64), {"left": 0, "right": 0, "top": 64, "bottom": 0}, 64) == \
        {"left": 0, "right": 4, "top": 64, "bottom": 0}


def test_mask_covers_the_margins_and_the_overlap():
    mask = outpaint_mask((8, 6), {"left": 2, "right": 0, "top": 0, "bottom": 1}, 1)
    expected = np.ones((7, 10))
    expected[0:5, 3:10] = 0  # image at x 2..9, y 0..5; one pixel of overlap on its left and bottom edges
    assert np.array_equal(mask.numpy(), expected)
    assert outpaint_mask((8, 6), {"left": 4, "right": 4, "top": 0, "bottom": 0}, 4).min() == 1


def test_extend_reads_dicts_and_command_line_text():
    assert parse_extend("left=64, bottom=64") == {"left": 64, "right": 0, "top": 0, "bottom": 64}
    assert parse_extend({"top": 8}) == {"left": 0, "right": 0, "top": 8, "bottom": 0}


@pytest.mark.parametrize("extend, fragment", [
    ("left=64,up=8", "unknown side"),
    ("left:64", "must look like left=64"),
    ({"left": -8}, "0 or more pixels"),
    ({"left": 0}, "at least one side"),
    (64, "dict of sides"),
])
def test_bad_extensions_are_refused(extend, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_extend(extend)


def test_outpaint_sets_the_size_itself(demo):
    with pytest.raises(InputError, match="outpaint sets width itself"):
        demo.outpaint("x", sample_image(32, 32), extend={"left": 16}, width=64)
    with pytest.raises(InputError, match="overlap must be 0 or more"):
        demo.outpaint("x", sample_image(32, 32), extend={"left": 16}, overlap=-1)


def test_same_seed_same_canvas(demo):
    image = sample_image(32, 32)
    a = demo.outpaint("x", image, extend="top=16", steps=2, seed=3)
    b = demo.outpaint("x", image, extend="top=16", steps=2, seed=3)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert torch.equal(a.latents, b.latents)
