"""The denoising trajectory: `sdlab generate --trajectory`, and `inside.trajectory.Trajectory` as a callback."""

import numpy as np
import pytest
from PIL import Image

import sdlab
from sdlab.errors import InputError
from sdlab.inside.trajectory import Trajectory, save_trajectory
from sdlab.inside.sheets import enlarge
from test_cli import assert_one_line_error, run_main

PROMPT = "a large red circle on the left"


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_frames_every_fifth_step_then_the_generated_image(pipe):
    steps = []
    trajectory = Trajectory(every=5, then=steps.append)
    result = pipe.txt2img(PROMPT, steps=20, seed=3, callback=trajectory)
    assert len(steps) == 20  # the callback it wraps still sees every step
    frames = trajectory.frames(pipe, result)
    assert [f.step for f in frames] == [0, 5, 10, 15, 20]
    assert frames[-1].noisy.tobytes() == result.images[0].tobytes()
    assert frames[-1].denoised.tobytes() == result.images[0].tobytes()
    assert [f.sigma for f in frames] == sorted((f.sigma for f in frames), reverse=True)
    # the prediction closes in on the finished image; the noisy latents start far from it
    final = pixels(result.images[0])
    distance = [np.abs(pixels(f.denoised) - final).mean() for f in frames]
    assert distance[3] < distance[0] and distance[3] < 10
    assert np.abs(pixels(frames[0].noisy) - final).mean() > 2 * distance[3]


def test_every_step_and_a_batch_item(pipe):
    trajectory = Trajectory(every=1)
    result = pipe.txt2img(PROMPT, steps=3, seed=4, batch_size=2, callback=trajectory)
    frames = trajectory.frames(pipe, result, image=1)
    assert [f.step for f in frames] == [0, 1, 2, 3]
    assert frames[-1].denoised.tobytes() == result.images[1].tobytes()


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_a_bad_interval_is_refused(every):
    with pytest.raises(InputError, match="--every"):
        Trajectory(every=every)


def test_generate_writes_the_animation_and_its_grid(tmp_path):
    out, animation = tmp_path / "image.png", tmp_path / "steps.webp"
    code, stdout, stderr = run_main("generate", PROMPT, "--seed", "1", "--steps", "20", "-o", str(out),
                                   "--trajectory", str(animation), "--every", "5", "--quiet")
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "steps.png", "steps.webp"]
    with Image.open(out) as image:
        generated = enlarge(image.convert("RGB"))
    with Image.open(animation) as frames:
        assert frames.n_frames == 5  # steps 0, 5, 10, 15 and the finished image
        frames.seek(frames.n_frames - 1)
        last = frames.convert("RGB")
    # the last frame's right-hand tile (the prediction, here the image) is the generated image, enlarged
    size = generated.width
    box = (last.width - 4 - size, last.height - 4 - size, last.width - 4, last.height - 4)
    assert np.array_equal(pixels(last.crop(box)), pixels(generated))
    with Image.open(tmp_path / "steps.png") as grid:
        assert grid.width > 5 * size


def test_a_png_trajectory_is_the_grid_alone(pipe, tmp_path):
    trajectory = Trajectory(every=2)
    result = pipe.txt2img(PROMPT, steps=4, seed=5, callback=trajectory)
    assert save_trajectory(trajectory.frames(pipe, result), str(tmp_path / "t.png")) == [str(tmp_path / "t.png")]
    assert [p.name for p in tmp_path.iterdir()] == ["t.png"]


@pytest.mark.parametrize("extra, fragment", [
    (["--trajectory", "{tmp}/t.mp4"], ".webp or .gif"),
    (["--trajectory", "{tmp}/t.webp", "--every", "0"], "--every"),
    (["--every", "5"], "give --trajectory"),
    (["--trajectory", "{tmp}/out.webp"], "also an output"),  # its grid out.png is the image
    (["--trajectory", "{tmp}/missing/t.webp"], "output folder does not exist"),
    (["--trajectory", "{tmp}/t.webp", "--hires-scale", "2"], "one sampling pass"),
])
def test_bad_trajectory_options_are_one_line_and_write_nothing(tmp_path, extra, fragment):
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, _, stderr = run_main("generate", "x", "--model", "demo", "--steps", "2", "-o", str(tmp_path / "out.png"),
                              *args, "--quiet")
    assert_one_line_error(code, stderr, fragment)
    assert list(tmp_path.iterdir()) == []
