"""`sdlab schedule`: the noise schedule drawn with Pillow."""

import numpy as np
import pytest
from PIL import Image

from sdlab.config import ScheduleConfig
from sdlab.inside.schedule_plot import PANEL, nice_ticks, schedule_plot
from test_cli import assert_one_line_error, run_main


def test_ticks_are_round_numbers_covering_the_range():
    assert nice_ticks(0, 999) == [0, 200, 400, 600, 800]
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(-6, 8) == [-5, 0, 5]


def test_the_plot_has_four_panels_with_coloured_lines():
    plot = np.asarray(schedule_plot(ScheduleConfig(), steps=10))
    assert plot.shape == (2 * PANEL[1] + 30, 2 * PANEL[0], 3)
    blue = (np.abs(plot.astype(int) - [31, 119, 180]).sum(-1) < 30)
    for row in (0, 1):
        for column in (0, 1):
            panel = blue[30 + row * PANEL[1]:30 + (row + 1) * PANEL[1], column * PANEL[0]:(column + 1) * PANEL[0]]
            assert panel.sum() > 200  # each panel draws a curve


def test_schedule_command(tmp_path):
    out = tmp_path / "schedule.png"
    code, _, stderr = run_main("schedule", "-o", str(out), "--steps", "12")
    assert code == 0, stderr
    with Image.open(out) as plot:
        assert plot.size == (2 * PANEL[0], 2 * PANEL[1] + 30)
    code, _, stderr = run_main("schedule", "-o", str(tmp_path / "s.jpg"))
    assert_one_line_error(code, stderr, ".png")
    code, _, stderr = run_main("schedule", "-o", str(tmp_path / "s.png"), "--steps", "1")
    assert_one_line_error(code, stderr, "--steps")
    assert [p.name for p in tmp_path.iterdir()] == ["schedule.png"]
