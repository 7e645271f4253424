"""Which seed each image gets and the noise it gives: per-image noise (image i is seed + i alone), the web
UI's variation seeds and seed resize, and batch count (n_iter), each written into and read back from the
image's parameters."""

import pytest
import torch

import sdlab
from sdlab.errors import InputError
from sdlab.infotext import parse_infotext
from sdlab.noise import Variation, noise_source, paste_centred, slerp
from sdlab.pipelines.seeds import NoiseDraws, image_seeds

SHAPE = (4, 6, 5)  # (C, h, w)


@pytest.fixture(scope="module")
def demo():
    return sdlab.load("demo")


def cpu_randn(seed, shape):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def run(demo, **settings):
    """Euler a on the demo model: its step noise makes the images depend on every draw."""
    return demo.txt2img("a red circle", **{"steps": 3, "width": 32, "height": 24, "seed": 7, **settings})


def same_pixels(a, b) -> bool:
    return a.tobytes() == b.tobytes()


# -- per-image noise -----------------------------------------------------------------------------------


def test_per_image_noise_draws_each_images_posterior_initial_and_steps_from_its_own_generator():
    draws = NoiseDraws("per-image", 40, 3, SHAPE)
    generators = [torch.Generator("cpu").manual_seed(40 + i) for i in range(3)]
    expected = lambda shape: torch.stack([torch.randn(shape, generator=g) for g in generators])  # noqa: E731
    # one init image shared by the batch: each image still samples its posterior with its own generator
    assert torch.equal(draws.posterior((1, 4, 6, 5)), expected(SHAPE))
    assert torch.equal(draws.initial(), expected(SHAPE))
    assert torch.equal(draws.posterior((1, 4, 6, 5)), expected(SHAPE))  # an inpainting model's masked image
    assert torch.equal(draws.step(), expected(SHAPE))


def test_a_batch_of_one_is_the_diffusers_draws():
    per_image, diffusers = NoiseDraws("per-image", 9, 1, SHAPE), NoiseDraws("diffusers", 9, 1, SHAPE)
    assert torch.equal(per_image.posterior((1, 3, 8, 8)), diffusers.posterior((1, 3, 8, 8)))
    assert torch.equal(per_image.initial(), diffusers.initial())
    assert torch.equal(per_image.step(), diffusers.step())


def test_per_image_initial_and_step_noise_are_the_web_uis_cpu_rng():
    ours, web_ui = noise_source("per-image", 5, 2, SHAPE), noise_source("a1111-cpu", 5, 2, SHAPE)
    assert torch.equal(ours.initial(), web_ui.initial())
    assert torch.equal(ours.step_noise(), web_ui.step_noise())


def test_every_image_of_a_default_batch_is_its_seed_alone(demo):
    batch = run(demo, batch_size=3)
    assert batch.seeds == [7, 8, 9]
    for i, image in enumerate(batch.images):
        alone = run(demo, seed=7 + i)
        assert same_pixels(image, alone.images[0])
        assert f"Seed: {7 + i}," in batch.infotexts[i]
    assert same_pixels(batch.images[0], run(demo, noise="diffusers").images[0])  # a single image is diffusers'


def test_the_default_noise_is_written_for_the_web_ui_and_for_sdlab(demo):
    fields = parse_infotext(run(demo).infotexts[0])
    assert fields["RNG"] == "CPU" and fields["Noise"] == "per-image"
    fields = parse_infotext(run(demo, noise="diffusers").infotexts[0])
    assert "RNG" not in fields and fields["Noise"] == "diffusers"


def test_img2img_batch_images_are_their_seeds_alone(demo):
    from PIL import Image

    image = Image.linear_gradient("L").convert("RGB").resize((32, 24))
    batch = demo.img2img("x", image, steps=3, seed=3, batch_size=2, strength=0.6)
    for i in range(2):
        assert same_pixels(batch.images[i], demo.img2img("x", image, steps=3, seed=3 + i, strength=0.6).images[0])


# -- variation seeds --------------------------------------------------------------------------------------


def test_image_seeds_follow_the_web_ui():
    assert image_seeds(10, 3, "per-image") == [10, 11, 12]
    assert image_seeds(10, 3, "diffusers") == [10, 10, 10]
    assert image_seeds(10, 3, "a1111-gpu", Variation((50, 51, 52), 0.5)) == [10, 10, 10]  # the seed stays


def test_slerp_ends_are_its_inputs_and_it_keeps_the_norm():
    low, high = cpu_randn(1, SHAPE), cpu_randn(2, SHAPE)
    assert torch.equal(slerp(0.0, low, high), low)
    torch.testing.assert_close(slerp(1.0, low, high), high)
    middle = slerp(0.5, low, high)
    # on the great circle between two vectors of about the same length, the length stays about that
    assert abs(middle.norm(dim=1).mean() - low.norm(dim=1).mean()) < 0.2


@pytest.mark.parametrize("mode", ["per-image", "a1111-cpu"])
def test_variation_strength_zero_is_the_seed_and_one_the_variation_seed(mode):
    plain = noise_source(mode, 11, 2, SHAPE).initial()
    at_zero = noise_source(mode, 11, 2, SHAPE, Variation((90, 91), 0.0)).initial()
    assert torch.equal(at_zero, plain)
    at_one = noise_source(mode, 11, 2, SHAPE, Variation((90, 91), 1.0)).initial()
    # with a strength every image keeps seed 11; image i's variation seed is 90 + i
    torch.testing.assert_close(at_one, torch.stack([cpu_randn(90, SHAPE), cpu_randn(91, SHAPE)]))
    between = noise_source(mode, 11, 2, SHAPE, Variation((90, 91), 0.3)).initial()
    seed_noise = cpu_randn(11, SHAPE)
    assert not torch.allclose(between[0], seed_noise) and not torch.allclose(between[0], at_one[0])
    torch.testing.assert_close(between[0], slerp(0.3, seed_noise, cpu_randn(90, SHAPE)))


def test_the_nv_source_takes_its_variation_noise_from_cuda_draws():
    from sdlab.noise import cuda_randn

    noise = noise_source("a1111-gpu", 3, 1, SHAPE, Variation((8,), 1.0)).initial()
    torch.testing.assert_close(noise[0], cuda_randn(8, SHAPE))


def test_seed_resize_pastes_the_seeds_noise_centred_as_the_web_ui():
    small = torch.arange(1, 7.0).reshape(1, 2, 3)
    pasted = paste_centred(small, torch.zeros(1, 6, 5))  # smaller: offsets floor((6-2)/2), floor((5-3)/2)
    assert torch.equal(pasted[:, 2:4, 1:4], small) and pasted.sum() == small.sum()
    large = torch.arange(1, 57.0).reshape(1, 7, 8)
    cropped = paste_centred(large, torch.zeros(1, 4, 5))
    # larger by an odd 3 rows and columns: the web UI floors (4 - 7) / 2 to -2, so the crop starts at row and
    # column 2 and covers 7 - 2 * 2 = 3 rows and 4 columns; the canvas shows in the last row and column
    assert torch.equal(cropped[:, :3, :4], large[:, 2:5, 2:6])
    assert cropped[:, 3].sum() == 0 and cropped[:, :, 4].sum() == 0


def test_seed_resize_draws_the_seed_at_the_other_size_and_the_canvas_from_the_image_generator():
    noise = noise_source("per-image", 21, 1, SHAPE, Variation(resize_from=(2, 3))).initial()[0]
    canvas = cpu_randn(21, SHAPE)
    expected = canvas.clone()
    expected[:, 2:4, 1:4] = cpu_randn(21, (4, 2, 3))
    assert torch.equal(noise, expected)
    same_size = noise_source("per-image", 21, 1, SHAPE, Variation(resize_from=(6, 5))).initial()
    assert torch.equal(same_size[0], canvas)


def test_variation_seeds_are_refused_by_the_whole_batch_modes(demo):
    with pytest.raises(InputError, match="generator per image"):
        run(demo, noise="diffusers", subseed=3, subseed_strength=0.5)
    with pytest.raises(InputError, match="generator per image"):
        noise_source("comfy", 1, 1, SHAPE, Variation(resize_from=(2, 2)))
    with pytest.raises(InputError, match="variation strength must be a number from 0"):
        run(demo, subseed=3, subseed_strength=1.5)
    with pytest.raises(InputError, match="seed resize from must be"):
        run(demo, seed_resize_from=(0, 32))


def test_variation_fields_are_written_as_the_web_ui_writes_them_and_reproduce_each_image(demo):
    batch = run(demo, batch_size=2, subseed=100, subseed_strength=0.25, seed_resize_from=(40, 16))
    assert batch.seeds == [7, 7]
    plain = run(demo, batch_size=2)
    assert not same_pixels(batch.images[0], plain.images[0])
    for i, text in enumerate(batch.infotexts):
        fields = parse_infotext(text)
        assert (fields["Seed"], fields["Variation seed"], fields["Variation seed strength"]) == ("7", f"{100 + i}", "0.25")
        assert fields["Seed resize from"] == "40x16"
        assert "Variation seed: " in text and text.index("Model:") < text.index("Variation seed:") < text.index("RNG:")
        width, height = (int(n) for n in fields["Seed resize from"].split("x"))
        alone = run(demo, seed=int(fields["Seed"]), subseed=int(fields["Variation seed"]),
                    subseed_strength=float(fields["Variation seed strength"]), seed_resize_from=(width, height))
        assert same_pixels(batch.images[i], alone.images[0])


def test_a_random_variation_seed_is_drawn_once_and_recorded(demo):
    result = run(demo, batch_size=2, subseed_strength=0.5)
    subseeds = [int(parse_infotext(text)["Variation seed"]) for text in result.infotexts]
    assert subseeds[1] == subseeds[0] + 1 and 0 <= subseeds[0] < 2**32
    assert "Variation seed" not in parse_infotext(run(demo, subseed=5).infotexts[0])  # no strength: not used


# -- batch count ------------------------------------------------------------------------------------------


def test_n_iter_runs_batches_with_the_seeds_going_on_each_image_its_seed_alone(demo):
    steps = []
    result = run(demo, batch_size=2, n_iter=2, seed=30, callback=steps.append)
    assert result.seeds == [30, 31, 32, 33] and len(result.images) == 4 and result.latents.shape[0] == 4
    assert [info["batch"] for info in steps] == [0] * 3 + [1] * 3
    for i, image in enumerate(result.images):
        assert parse_infotext(result.infotexts[i])["Seed"] == str(30 + i)
        assert same_pixels(image, run(demo, seed=30 + i).images[0])


def test_n_iter_with_a_whole_batch_generator_seeds_each_batch_on(demo):
    result = run(demo, batch_size=2, n_iter=2, seed=30, noise="diffusers")
    assert result.seeds == [30, 30, 32, 32]
    second = run(demo, batch_size=2, seed=32, noise="diffusers")
    assert same_pixels(result.images[3], second.images[1])


def test_n_iter_with_variation_keeps_the_seed_and_counts_the_variation_seed_on(demo):
    result = run(demo, batch_size=2, n_iter=2, subseed=60, subseed_strength=0.4)
    assert result.seeds == [7, 7, 7, 7]
    assert [parse_infotext(t)["Variation seed"] for t in result.infotexts] == ["60", "61", "62", "63"]
    assert same_pixels(result.images[3], run(demo, subseed=63, subseed_strength=0.4).images[0])


def test_n_iter_runs_the_hires_fix_and_outpainting_per_batch(demo):
    from PIL import Image

    hires = demo.hires_fix("x", steps=2, hires_steps=1, width=16, height=16, seed=4, n_iter=2, hires_scale=1.5)
    assert hires.seeds == [4, 5] and {im.size for im in hires.images} == {(24, 24)}
    alone = demo.hires_fix("x", steps=2, hires_steps=1, width=16, height=16, seed=5, hires_scale=1.5)
    assert same_pixels(hires.images[1], alone.images[0])
    out = demo.outpaint("x", Image.new("RGB", (16, 16), "red"), extend="left=8", steps=2, seed=4, n_iter=2)
    assert out.seeds == [4, 5] and len(out.images) == 2


@pytest.mark.parametrize("settings, message", [
    ({"n_iter": 0}, "batch count"),
    ({"n_iter": 2, "latents": torch.zeros(1, 4, 3, 4)}, "latents replace the noise of one batch"),
])
def test_bad_batch_counts_are_refused(demo, settings, message):
    with pytest.raises(InputError, match=message):
        run(demo, **settings)
