"""The shapes set as training data: deterministic samples, a validation stream of its own, its scene mix."""

import pytest
import torch

from sdlab.errors import ConfigError, InputError
from sdlab.shapes.dataset import ShapesData, parse_caption, shapes_data
from sdlab.training.config import build_config
from test_training_data import make_folder


def test_shapes_samples_are_deterministic_per_seed_and_validation_is_another_stream():
    data = ShapesData(32, seed=3)
    image, caption = data[5]
    again, caption_again = ShapesData(32, seed=3)[5]
    assert torch.equal(image, again) and caption == caption_again
    assert not torch.equal(ShapesData(32, seed=4)[5][0], image)
    validation = data.validation_examples(4)
    assert all(not torch.equal(v, data[i][0]) for i, (v, _) in enumerate(validation))
    with pytest.raises(InputError, match="flip is off for the shapes"):
        shapes_data(32, flip=True)


def test_single_object_fraction_sets_the_mix_of_one_and_two_object_scenes(tmp_path):
    def objects(data):
        return [len(parse_caption(data[n][1]).objects) for n in range(200)]

    assert set(objects(ShapesData(16, single_object_fraction=1.0))) == {1}
    assert set(objects(ShapesData(16, single_object_fraction=0.0))) == {2}
    default, fewer = objects(ShapesData(16)), objects(ShapesData(16, single_object_fraction=0.3))
    assert 0.5 < default.count(1) / 200 < 0.7 and 0.2 < fewer.count(1) / 200 < 0.4
    with pytest.raises(ConfigError, match="'shapes.single_object_fraction' is for the shapes data"):
        build_config("unet", {"data": str(make_folder(tmp_path / "f", 2)), "shapes": {"single_object_fraction": 0.5}})
