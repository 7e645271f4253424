"""The latent explorer: `sdlab latents`, `sdlab interpolate`, and inside.latents on the bundled model."""

import pytest
import torch
from PIL import Image, ImageDraw

import sdlab
from sdlab.errors import InputError
from sdlab.inside.latents import fractions, interpolate_prompts, interpolate_seeds, latent_channels_picture, slerp
from test_cli import assert_one_line_error, run_main

FAST = dict(steps=6, sampler="Euler")


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


def test_slerp_keeps_the_noise_norm_where_lerp_shrinks_it():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, 16, generator=generator), torch.randn(4, 16, 16, generator=generator)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-5, rtol=1e-5)
    middle = slerp(a, b, 0.5)
    assert abs(middle.norm() / a.norm() - 1) < 0.05
    assert ((a + b) / 2).norm() / a.norm() < 0.8


def test_seed_walk_ends_at_each_seeds_own_image(pipe):
    images = interpolate_seeds(pipe, "a red circle", (1, 2), 3, **FAST)
    for seed, image in ((1, images[0]), (2, images[-1])):
        assert image.tobytes() == pipe.txt2img("a red circle", seed=seed, **FAST).images[0].tobytes()


def test_prompt_walk_ends_at_each_prompts_own_image(pipe):
    images = interpolate_prompts(pipe, ("a large red circle", "a large blue square"), 2, seed=3, **FAST)
    assert images[0].tobytes() == pipe.txt2img("a large red circle", seed=3, **FAST).images[0].tobytes()
    assert images[1].tobytes() == pipe.txt2img("a large blue square", seed=3, **FAST).images[0].tobytes()


def test_latent_channels_picture_shows_image_round_trip_and_channels(pipe):
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).ellipse([8, 8, 40, 40], fill="red")
    sheet = latent_channels_picture(pipe, image)
    assert sheet.width > (2 + pipe.config.latent_channels) * 128


def test_fewer_than_two_frames_are_refused():
    for frames in (1, 0, 2.5):
        with pytest.raises(InputError, match="2 frames"):
            fractions(frames)


@pytest.mark.parametrize("args, fragment", [
    (["latents", "{bad}"], "cannot read"),
    (["interpolate", "--seeds", "1,2", "--frames", "1"], "2 frames"),
    (["interpolate", "--seeds", "1"], "two whole numbers"),
    (["interpolate", "--seeds", "1,2"], "--seeds needs --prompt"),
    (["interpolate", "--seeds", "1,2", "--prompt", "a red circle", "--seed", "3"], "--seed goes with --prompts"),
    (["interpolate", "--prompts", "a", "b", "--prompt", "a red circle"], "--prompt goes with --seeds"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, _, stderr = run_main(*[a.format(bad=bad) for a in args], "-o", str(tmp_path / "out.png"))
    assert_one_line_error(code, stderr, fragment)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.png"]


def test_commands_write_their_pictures(tmp_path):
    image = tmp_path / "disc.png"
    Image.new("RGB", (64, 64), "blue").save(image)
    code, _, stderr = run_main("latents", str(image), "-o", str(tmp_path / "channels.png"))
    assert code == 0, stderr
    code, _, stderr = run_main("interpolate", "--prompts", "a red circle", "a blue square", "--frames", "3",
                              "--steps", "4", "-o", str(tmp_path / "strip.png"))
    assert code == 0, stderr
    with Image.open(tmp_path / "strip.png") as strip:
        assert strip.width > 3 * 128
    code, _, stderr = run_main("interpolate", "--seeds", "1,2", "--prompt", "a red circle", "--frames", "2",
                              "--steps", "2", "-o", str(tmp_path / "seeds.png"))
    assert code == 0, stderr
    with Image.open(tmp_path / "seeds.png") as strip:
        assert strip.width > 2 * 128
