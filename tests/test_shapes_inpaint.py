"""Object masks (`shapes.object_masks`): the inpainting trainer on the shapes data masks whole objects."""

import numpy as np
import pytest
import torch

from sdlab.shapes import inpaint as shapes_inpaint
from sdlab.training import inpaint as inpaint_trainer
from sdlab.training.data import Batch
from test_training_inpaint import base  # noqa: F401
from test_training_loop import one_thread, tiny_config  # noqa: F401


def two_object_renders(count: int, seed: int = 1):
    from sdlab.shapes import dataset as shapes

    rng = np.random.default_rng(seed)
    scenes = [shapes.sample_scene(rng, single_object_fraction=0.0) for _ in range(count)]
    return scenes, torch.stack([shapes.to_tensor(shapes.render(scene)) for scene in scenes])


def covered_shares(scene, mask: torch.Tensor) -> list[float]:
    """How much of each object of the scene the mask covers."""
    from sdlab.shapes.dataset import coverage

    shares = [torch.from_numpy(coverage(obj, 64)) for obj in scene.objects]
    return [float((share * mask[0]).sum() / share.sum()) for share in shares]


def test_an_object_mask_covers_one_whole_object_and_nothing_of_the_other():
    from sdlab.shapes.dataset import coverage

    scenes, images = two_object_renders(12)
    chosen = []
    for k, (scene, image) in enumerate(zip(scenes, images)):
        mask = shapes_inpaint.object_mask(image, np.random.default_rng(k))
        covered = covered_shares(scene, mask)
        assert sorted(covered) == [0.0, 1.0], covered
        chosen.append(covered.index(1.0))
        # a filled rectangle: the object's pixel box grown by 1-4 px (or cut by the border); the pixel box is
        # read from colours, so an anti-aliased edge pixel may count on either side of it
        pixels = torch.from_numpy(coverage(scene.objects[chosen[-1]], 64) > 0.5)
        rows, columns = pixels.any(1).nonzero()[:, 0], pixels.any(0).nonzero()[:, 0]
        box_rows, box_columns = mask[0].any(1).nonzero()[:, 0], mask[0].any(0).nonzero()[:, 0]
        grown = [int(g) for g in (rows.min() - box_rows.min(), box_rows.max() - rows.max(),
                                  columns.min() - box_columns.min(), box_columns.max() - columns.max())]
        assert all(0 <= g <= 5 for g in grown) and max(grown) >= 1, grown
        assert int(mask.sum()) == len(box_rows) * len(box_columns)
    assert set(chosen) == {0, 1}  # either object may be the one
    assert shapes_inpaint.object_mask(torch.zeros(3, 64, 64), np.random.default_rng(0)) is None  # no object


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_object_masks_replace_that_fraction_of_the_random_ones(tmp_path, base, fraction):
    config = tiny_config("inpaint", tmp_path, base=base, **{"shapes.object_masks": fraction})
    trainer = shapes_inpaint.build(config, torch.device("cpu"))
    scenes, images = two_object_renders(40)
    masks = trainer.masks(Batch(images, [""] * 40, 0, 0, 40, 0, 40, 0, 1, torch.Generator().manual_seed(0)))
    if fraction == 0:  # off: the masks of before, draw for draw
        plain = [inpaint_trainer.random_mask(64, np.random.default_rng([config.seed, n, 2]), config.options)
                 for n in range(40)]
        assert all(torch.equal(m, p) for m, p in zip(masks, plain))
    whole_object = [sorted(covered_shares(scene, mask)) == [0.0, 1.0] for scene, mask in zip(scenes, masks)]
    share = sum(whole_object) / 40
    assert fraction - 0.2 <= share <= fraction + 0.2, share  # a random mask rarely covers just one object
    assert all(whole_object) or fraction < 1


@pytest.mark.parametrize("settings, message", [({"shapes.object_masks": 1.5}, "must be in \\[0, 1\\]"),
                                               ({"shapes.object_masks": 0.5, "data": "photos/"},
                                                "'shapes.object_masks' is for the shapes data")])
def test_object_masks_are_a_fraction_of_shapes_samples(tmp_path, settings, message):
    from sdlab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_config("inpaint", tmp_path, **settings)
