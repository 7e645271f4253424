"""The digits demo: the shipped model draws the digit asked for (judged by a classifier trained on the real
digits), drawing needs no scikit-learn, a short training run lowers the loss, bad digits fail in one line."""

import os
import sys

import pytest
import torch
from PIL import Image

from sdlab.cli import main
from sdlab.digits.draw import draw_digits
from sdlab.digits.model import WEIGHTS_PATH, DigitsConfig, load_digits_model
from sdlab.errors import InputError


@pytest.fixture(scope="module")
def shipped():
    return load_digits_model()[0]


def test_the_shipped_model_is_small_enough_to_ship():
    assert WEIGHTS_PATH.stat().st_size < 2_000_000


def test_the_classifier_reads_the_requested_digit_in_at_least_90_percent_of_100_drawings(shipped):
    from sdlab.digits.judge import agreement

    scores = agreement(shipped, per_digit=10, seed=0)
    assert sum(scores.values()) / len(scores) >= 0.9, scores


def test_drawing_is_seeded_and_goes_through_any_sdlab_sampler(shipped):
    first = draw_digits(shipped, [3, 7], seed=5, steps=10)
    assert first.shape == (2, 1, 8, 8) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, draw_digits(shipped, [3, 7], seed=5, steps=10))
    assert draw_digits(shipped, [3], seed=5, steps=10, sampler="Euler a").shape == (1, 1, 8, 8)


def test_draw_writes_a_grid_and_a_trajectory_without_scikit_learn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now raises ImportError
    out, gif = tmp_path / "seven.png", tmp_path / "seven.gif"
    assert main(["digits", "draw", "7", "1", "--count", "3", "--steps", "12", "-o", str(out),
                 "--trajectory", str(gif)]) == 0
    assert Image.open(out).size == (3 * 66 + 2, 2 * 66 + 2)  # 3 columns, 2 rows of 64-px digits, 2-px gaps
    animation = Image.open(gif)
    assert animation.n_frames == 12 + 1  # each step, then the finished drawing


def test_training_and_eval_without_scikit_learn_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    for argv in (["digits", "eval"], ["digits", "train", "-o", str(tmp_path / "model")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "scikit-learn" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_a_short_training_run_lowers_the_loss(tmp_path):
    from sdlab.digits.model import save_digits_model
    from sdlab.digits.train import train_digits

    net, info = train_digits(steps=60, batch_size=64, config=DigitsConfig(width=64, blocks=1), log_every=20)
    assert len(info["losses"]) == 3 and info["losses"][-1] < info["losses"][0]
    save_digits_model(net, tmp_path / "sdlab-digits.safetensors", info)
    loaded, loaded_info = load_digits_model(tmp_path)
    assert loaded.config == net.config and loaded_info["steps"] == 60


@pytest.mark.parametrize("digit", ["10", "-1", "seven"])
def test_a_digit_outside_0_to_9_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, digit):
    with pytest.raises(SystemExit) as exit:  # argparse refuses it before any command runs
        main(["digits", "draw", digit, "-o", str(tmp_path / "x.png")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "0-9" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_the_api_refuses_a_digit_outside_0_to_9(shipped):
    with pytest.raises(InputError, match="0-9"):
        draw_digits(shipped, [10])
