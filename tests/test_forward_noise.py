"""Forward diffusion: `sdlab noise`, and inside.forward_noise on the bundled model."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import sdlab
from sdlab.errors import InputError
from sdlab.inside.forward_noise import forward_noise, parse_timesteps
from sdlab.pipelines.images import to_pixels
from sdlab.pipelines.latents import decode_latents, encode_posterior
from sdlab.schedules import alphas_cumprod
from test_cli import assert_one_line_error, run_main

TIMESTEPS = [0, 100, 250, 500, 750, 999]


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


@pytest.fixture(scope="module")
def disc(tmp_path_factory):
    path = tmp_path_factory.mktemp("noise") / "disc.png"
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).ellipse([8, 12, 40, 44], fill=(220, 30, 30))
    image.save(path)
    return path


def test_at_t0_the_strip_is_the_vae_round_trip(pipe, disc):
    strip = forward_noise(pipe, str(disc), TIMESTEPS, seed=1)
    z0 = encode_posterior(pipe, to_pixels(strip.original)).mean * pipe.config.vae.scaling_factor
    round_trip = np.asarray(decode_latents(pipe, z0)[0], dtype=np.float32)
    first = np.asarray(strip.images[0], dtype=np.float32)
    last = np.asarray(strip.images[-1], dtype=np.float32)
    assert np.abs(first - round_trip).mean() < 3  # t=0 keeps 99.9% of the signal
    assert np.abs(last - round_trip).mean() > 10 * np.abs(first - round_trip).mean()


def test_the_noise_variance_grows_as_the_schedule_says(pipe, disc):
    strip = forward_noise(pipe, str(disc), TIMESTEPS, seed=2)
    a = alphas_cumprod(pipe.config.schedule)[TIMESTEPS].double()
    noise = strip.latents.double() - a.sqrt()[:, None, None, None] * strip.clean_latents.double()
    measured = noise.var(dim=(1, 2, 3))
    torch.testing.assert_close(measured / (1 - a), torch.ones_like(a, dtype=torch.float64), atol=0.15, rtol=0)
    assert (measured.diff() > 0).all()
    # and what is left of the image fades with sqrt(a_t): the correlation with z0
    correlation = [np.corrcoef(z.flatten(), strip.clean_latents.flatten())[0, 1] for z in strip.latents]
    assert correlation == sorted(correlation, reverse=True) and correlation[0] > 0.99 and correlation[-1] < 0.3


def test_timesteps_outside_the_schedule_are_refused():
    assert parse_timesteps("0, 5,999", 1000) == [0, 5, 999]
    for text in ("1000", "-1", "a,b", ""):
        with pytest.raises(InputError):
            parse_timesteps(text, 1000)


def test_noise_command_writes_the_strip(disc, tmp_path):
    out = tmp_path / "strip.png"
    code, _, stderr = run_main("noise", str(disc), "--at", "0,500,999", "-o", str(out))
    assert code == 0, stderr
    with Image.open(out) as strip:
        assert strip.width > 4 * 128 and strip.height > 2 * 128


@pytest.mark.parametrize("args, fragment", [
    (["{tmp}/missing.png"], "not found"),
    (["{bad}"], "cannot read"),
    (["{disc}", "--at", "0,1000"], "from 0 to 999"),
    (["{disc}", "--at", "x"], "whole timesteps"),
])
def test_bad_input_is_one_line_and_writes_nothing(disc, tmp_path, args, fragment):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    args = [a.format(tmp=tmp_path, bad=bad, disc=disc) for a in args]
    code, _, stderr = run_main("noise", *args, "-o", str(tmp_path / "strip.png"))
    assert_one_line_error(code, stderr, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]
