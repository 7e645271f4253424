"""The options every pipeline shares: one GenerationOptions read from the keyword arguments, a side left
out is the model's size, and a size or a name the pipelines do not take is refused before anything runs."""

import os

import pytest

import sdlab
from sdlab.errors import InputError
from sdlab.pipelines.options import EditOptions, GenerationOptions, read_options
from sdlab.pipelines.pipeline import Pipeline
from sdlab.pipelines.run import generate


@pytest.fixture(scope="module")
def demo():
    return sdlab.load("demo")


@pytest.mark.parametrize("size", [{"width": 0, "height": 64}, {"width": 64, "height": -8}])
def test_a_side_of_zero_or_less_is_refused_not_replaced_by_the_default(demo, size):
    with pytest.raises(InputError, match="must be a positive integer .*leave it out for the default size"):
        demo.txt2img("x", steps=1, **size)


def test_a_side_left_out_is_the_models_size(demo):
    result = demo.txt2img("x", steps=1, seed=1, height=32)
    assert result.images[0].size == (demo.config.resolution, 32)


def test_img2img_refuses_a_side_of_zero_too(demo):
    from PIL import Image

    with pytest.raises(InputError, match="width must be a positive integer"):
        demo.img2img("x", Image.new("RGB", (32, 32)), width=0, steps=1)


def test_a_misspelt_option_is_a_type_error_that_lists_the_options(demo):
    with pytest.raises(TypeError, match="txt2img\\(\\) got unexpected keyword argument\\(s\\) 'stpes'; it takes prompt"):
        demo.txt2img("x", stpes=2)
    with pytest.raises(TypeError, match="'strength'"):
        demo.txt2img("x", strength=0.5)  # an img2img setting


def test_keywords_are_read_into_the_options_and_each_pipelines_own_settings():
    options, edit = read_options("img2img", "a cat", "", {"steps": 3, "strength": 0.4}, EditOptions)
    assert options == GenerationOptions(prompt="a cat", steps=3)
    assert edit == EditOptions(strength=0.4)


def test_generate_takes_the_options_object_and_load_gives_a_pipeline(demo):
    assert isinstance(demo, Pipeline)
    by_keywords = demo.txt2img("a red circle", steps=2, seed=3, width=32, height=32)
    by_object = generate(demo, GenerationOptions(prompt="a red circle", steps=2, seed=3, width=32, height=32))
    assert by_keywords.infotexts == by_object.infotexts
    assert (by_keywords.latents == by_object.latents).all()


def test_upscale_refuses_the_sizes_its_images_give(demo):
    from PIL import Image

    with pytest.raises(InputError, match="upscale sets width itself"):
        demo.upscale(Image.new("RGB", (8, 8)), "x", width=64)


def test_the_seed_options_are_the_last_fields_with_the_web_uis_defaults():
    options = GenerationOptions()
    assert options.noise == "per-image"
    assert (options.subseed, options.subseed_strength, options.seed_resize_from, options.n_iter) == (None, 0.0, None, 1)


def test_returned_images_carry_their_parameters_and_save_keeps_them(demo, tmp_path):
    from PIL import Image

    from sdlab.outputs import read_parameters

    result = demo.txt2img("a red circle", steps=1, seed=3, width=32, height=32, batch_size=2)
    assert [image.info["parameters"] for image in result.images] == result.infotexts
    paths = result.save(tmp_path / "circle.png")
    assert paths == [str(tmp_path / "circle.png"), str(tmp_path / "circle-1.png")]
    assert [read_parameters(p) for p in paths] == result.infotexts
    assert Image.open(paths[1]).tobytes() == result.images[1].tobytes()
    numbered = result.save(tmp_path / "outputs")  # a folder: the web UI's numbered names, NNNNN-SEED.png
    assert [os.path.basename(p) for p in numbered] == ["00000-3.png", "00001-4.png"]
    assert read_parameters(numbered[1]) == result.infotexts[1]
    assert read_parameters(result.save(tmp_path / "circle.webp")[0]) == result.infotexts[0]
