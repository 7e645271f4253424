"""training/plots.py: the loss curves' axes carry labels inside the frame, and labels keep their spaces."""

import math

import pytest
from PIL import Image, ImageDraw

from sdlab.inside.sheets import font
from sdlab.training.plots import FONT_SIZE, _ticks, loss_plot


def test_a_narrow_positive_range_still_gets_several_labels():
    lo, hi = math.log10(0.0801), math.log10(0.0899)  # a loss that moved inside one 1-2-5 step
    ticks = _ticks(lo, hi, log=True)
    assert len(ticks) >= 2 and all(0.0801 <= t <= 0.0899 for t in ticks)
    assert _ticks(math.log10(0.55), math.log10(0.9), log=True) == pytest.approx([0.6, 0.7, 0.8, 0.9])


def test_linear_ticks_stay_inside_the_range():
    ticks = _ticks(0.0, 1.31, log=False)
    assert ticks[0] == 0 and max(ticks) <= 1.31


def widest_blank_run(text: str) -> int:
    """The widest run of ink-free pixel columns between the first and last inked column of `text`."""
    image = Image.new("L", (200, 20), 255)
    ImageDraw.Draw(image).text((2, 2), text, fill=0, font=font(FONT_SIZE))
    inked = [x for x in range(image.width) if min(image.getpixel((x, y)) for y in range(image.height)) < 160]
    gaps = [b - a - 1 for a, b in zip(inked, inked[1:])]
    return max(gaps, default=0)


def test_a_space_between_words_is_drawn_as_a_gap():
    assert widest_blank_run("sdlab train") >= 3  # Pillow's default 10 px font drew "sdlabtrain"
    assert loss_plot({"loss": [(1, 1.0), (2, 0.5)]}, "sdlab train unet").width > 0
