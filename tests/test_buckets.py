"""Aspect-ratio buckets: the bucket list, which bucket an image goes to, one bucket per batch, and the
same batches in every rerun and on every rank."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.config import SD1
from sdlab.errors import ConfigError
from sdlab.shapes.dataset import ShapesData
from sdlab.training.buckets import (
    BucketedFolder, BucketedStream, bucket_sizes, nearest_bucket, size_multiple, step_bucket,
)
from sdlab.training.data import ImageFolder, batches, training_data

from test_training_loop import TINY, one_thread, run, tiny_base, tiny_config  # noqa: F401


def mixed_folder(root, sizes=((64, 32), (32, 64), (40, 40), (60, 30), (30, 60), (48, 48), (80, 40))):
    """One captioned image per size, each a flat colour."""
    root.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i * 30 % 256, 90, 200)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture {i}")
    return root


def test_buckets_are_multiples_of_the_step_within_the_sides_and_the_area():
    buckets = bucket_sizes(64, 128, 32)
    assert set(buckets) == {(64, 64), (64, 96), (96, 64), (96, 96), (64, 128), (128, 64), (96, 128), (128, 96),
                            (128, 128)}
    assert [w * h for w, h in buckets] == sorted(w * h for w, h in buckets)
    # kohya's max area: a 2:1 bucket of a 64..128 range at step 8 may be at most 128 x 128 pixels
    assert all(w * h <= 128 * 128 and w % 8 == 0 and h % 8 == 0 for w, h in bucket_sizes(64, 128, 8))
    with pytest.raises(ConfigError, match="multiples"):
        bucket_sizes(60, 128, 32)
    with pytest.raises(ConfigError, match="min_bucket_reso <= max_bucket_reso"):
        bucket_sizes(128, 64, 32)


def test_the_size_multiple_is_the_vae_factor_times_the_unet_downsampling():
    assert size_multiple(SD1) == 64  # 8 x 8, kohya's default bucket_reso_steps for SD
    assert size_multiple(TINY) == 4
    assert size_multiple(None) is None


def test_an_image_goes_to_the_bucket_of_the_nearest_aspect_the_largest_that_does_not_enlarge_it():
    buckets = bucket_sizes(64, 128, 32)
    assert nearest_bucket(1000, 500, buckets) == (128, 64)
    assert nearest_bucket(500, 1000, buckets) == (64, 128)
    assert nearest_bucket(1600, 1200, buckets) == (128, 96)  # 4:3
    assert nearest_bucket(800, 800, buckets) == (128, 128)
    assert nearest_bucket(100, 100, buckets) == (96, 96)  # 128 x 128 would enlarge it
    assert nearest_bucket(20, 20, buckets) == (64, 64)  # every square bucket enlarges it: the smallest
    assert nearest_bucket(300, 290, buckets) == (128, 128)


def test_every_batch_of_a_folder_is_one_bucket_and_every_image_comes_once_per_epoch(tmp_path):
    folder = ImageFolder(str(mixed_folder(tmp_path / "data")), size=32)
    data = BucketedFolder(folder, bucket_sizes(16, 32, 8), batch_size=2, seed=3)
    assert data.buckets == [(16, 32), (32, 16), (24, 24), (32, 32)] or set(data.buckets) >= {(32, 16), (16, 32)}
    assert data.steps_per_epoch == sum(-(-data.assigned.count(b) // 2) for b in data.buckets)
    seen = set()
    for step in range(data.steps_per_epoch):
        bucket, indices = data.batch_of_step(step)
        assert all(data.assigned[i] == bucket for i in indices)
        seen |= set(indices)
        images = [data[step * 2 + k][0] for k in range(2)]
        assert all(image.shape == (3, bucket[1], bucket[0]) for image in images)
    assert seen == set(range(len(folder)))
    again = BucketedFolder(folder, bucket_sizes(16, 32, 8), batch_size=2, seed=3)
    assert [again.batch_of_step(s) for s in range(12)] == [data.batch_of_step(s) for s in range(12)]
    other = BucketedFolder(folder, bucket_sizes(16, 32, 8), batch_size=2, seed=4)
    assert [other.batch_of_step(s) for s in range(12)] != [data.batch_of_step(s) for s in range(12)]


def test_a_stream_draws_each_step_at_one_seeded_bucket():
    buckets = bucket_sizes(64, 128, 32)
    data = BucketedStream(ShapesData(64, seed=0), buckets, batch_size=4, seed=1)
    chosen = [data.bucket_of_step(step) for step in range(60)]
    assert len(set(chosen)) > 5 and chosen == [BucketedStream(ShapesData(64), buckets, 4, 1).bucket_of_step(s)
                                               for s in range(60)]
    for step in (0, 1, 2):
        width, height = chosen[step]
        for n in range(4 * step, 4 * step + 4):
            image, caption = data[n]
            assert image.shape == (3, height, width) and caption


def test_every_rank_and_micro_batch_of_a_step_loads_from_the_same_bucket(tmp_path):
    folder = ImageFolder(str(mixed_folder(tmp_path / "data")), size=32)
    data = BucketedFolder(folder, bucket_sizes(16, 32, 8), batch_size=4, seed=0)
    whole = list(batches(data, 0, 5, 4, 1))
    parts = [list(batches(data, 0, 5, 4, 2, rank=r, world_size=2)) for r in range(2)]
    for step in range(5):
        shapes_seen = {whole[step].images.shape[1:]} | {parts[r][2 * step + m].images.shape[1:]
                                                         for r in range(2) for m in range(2)}
        assert len(shapes_seen) == 1
        rows = torch.cat([parts[r][2 * step + m].images for m in range(2) for r in range(2)])
        assert torch.equal(rows, whole[step].images)


def test_bucket_settings_come_from_the_recipe_and_the_model(tmp_path):
    folder = str(mixed_folder(tmp_path / "data"))
    config = tiny_config("unet", tmp_path / "run", data=folder, buckets=True, batch_size=2)
    data = training_data(config, 32, verbose=False, size_multiple=4)
    assert isinstance(data, BucketedFolder)
    assert all(w % 4 == 0 and h % 4 == 0 and 16 <= min(w, h) and max(w, h) <= 32 for w, h in data.buckets)
    config = tiny_config("unet", tmp_path / "run", data=folder, buckets=True, bucket_reso_steps=6)
    with pytest.raises(ConfigError, match="multiple of 4"):
        training_data(config, 32, verbose=False, size_multiple=4)
    assert not isinstance(training_data(tiny_config("unet", tmp_path / "run", data=folder), 32, False, 4),
                          BucketedFolder)


def test_a_folder_of_mixed_aspect_images_trains_with_buckets(tmp_path):
    base = str(tiny_base(tmp_path / "base.safetensors"))
    config = tiny_config("unet", tmp_path / "run", data=str(mixed_folder(tmp_path / "data")), base=base,
                         buckets=True, min_bucket_reso=16, max_bucket_reso=32, steps=4, batch_size=2,
                         ema_decay=0.0)
    logs = run(config)
    assert len(logs) == 4 and all(np.isfinite(entry["loss"]) for entry in logs)
    assert (tmp_path / "run" / "last.safetensors").exists()


@pytest.mark.parametrize("trainer", ["inpaint", "shapes-inpaint"])
def test_the_inpainting_trainer_masks_each_bucket_at_its_own_shape(tmp_path, trainer):
    """Non-square buckets: every sample's mask has the batch's (height, width) (it took the width for both)."""
    base = str(tiny_base(tmp_path / "base.safetensors"))
    data = str(mixed_folder(tmp_path / "data")) if trainer == "inpaint" else "shapes"
    overrides = {} if trainer == "inpaint" else {"shapes.object_masks": 0.5}
    config = tiny_config("inpaint", tmp_path / "run", data=data, base=base, buckets=True, min_bucket_reso=16,
                         max_bucket_reso=32, steps=4, batch_size=2, ema_decay=0.0, **overrides)
    logs = run(config)
    assert len(logs) == 4 and all(np.isfinite(entry["loss"]) for entry in logs)


def test_a_stream_draws_the_resolution_bucket_at_its_share_of_the_steps_and_the_others_alike():
    buckets = bucket_sizes(64, 128, 32)
    data = BucketedStream(ShapesData(64), buckets, 4, seed=1, home=(64, 64), home_fraction=0.5)
    chosen = [data.bucket_of_step(step) for step in range(900)]
    assert 0.45 < chosen.count((64, 64)) / 900 < 0.55
    others = [chosen.count(b) for b in buckets if b != (64, 64)]
    assert min(others) > 0.5 * 450 / 8 and max(others) < 1.5 * 450 / 8
    assert all(step_bucket(1, s, buckets, (64, 64), 1.0) == (64, 64) for s in range(20))
    # without a share the choice is the uniform one the first bucket run drew
    assert [step_bucket(1, s, buckets, (64, 64), 0.0) for s in range(30)] == [step_bucket(1, s, buckets)
                                                                              for s in range(30)]
    with pytest.raises(ConfigError, match="not one of the buckets"):
        BucketedStream(ShapesData(64), buckets, 4, home=(32, 32), home_fraction=0.5)


def test_the_resolution_bucket_fraction_comes_from_the_recipe_for_data_drawn_at_any_size(tmp_path):
    config = tiny_config("unet", tmp_path / "run", data="shapes", buckets=True, min_bucket_reso=16,
                         max_bucket_reso=32, resolution_bucket_fraction=0.5)
    data = training_data(config, 32, verbose=False, size_multiple=4)
    assert isinstance(data, BucketedStream) and (data.home, data.home_fraction) == ((32, 32), 0.5)
    folder = str(mixed_folder(tmp_path / "data"))
    with pytest.raises(ConfigError, match="folder"):
        training_data(config.replace(data=folder), 32, verbose=False, size_multiple=4)
    with pytest.raises(ConfigError, match=r"resolution_bucket_fraction' must be in \[0, 1\]"):
        tiny_config("unet", tmp_path / "run", resolution_bucket_fraction=1.5)


def test_bucket_weights_give_each_named_bucket_its_share_and_the_others_none(tmp_path):
    config = tiny_config("unet", tmp_path / "run", data="shapes", buckets=True, min_bucket_reso=16,
                         max_bucket_reso=32, bucket_weights={"32x32": 3, "24x16": 1})
    data = training_data(config, 32, verbose=False, size_multiple=4)
    chosen = [data.bucket_of_step(step) for step in range(800)]
    assert set(chosen) == {(32, 32), (24, 16)} and 0.70 < chosen.count((32, 32)) / 800 < 0.80
    assert chosen == [training_data(config, 32, verbose=False, size_multiple=4).bucket_of_step(s) for s in range(800)]
    images, _ = zip(*(data[n] for n in range(2 * 4)))  # step 0 and 1's samples have their bucket's size
    assert {tuple(image.shape[-2:][::-1]) for image in images} <= {(32, 32), (24, 16)}


def test_bad_bucket_weights_are_refused_in_one_line(tmp_path):
    def build(**changes):
        config = tiny_config("unet", tmp_path / "run", data="shapes", buckets=True, min_bucket_reso=16,
                             max_bucket_reso=32, **changes)
        return training_data(config, 32, verbose=False, size_multiple=4)

    with pytest.raises(ConfigError, match="'40x40' is not one of the buckets"):
        build(bucket_weights={"40x40": 1})
    with pytest.raises(ConfigError, match="must be a number >= 0"):
        build(bucket_weights={"32x32": -1})
    with pytest.raises(ConfigError, match="at least one bucket needs a weight above 0"):
        build(bucket_weights={"32x32": 0})
    with pytest.raises(ConfigError, match="keep one"):
        build(bucket_weights={"32x32": 1}, resolution_bucket_fraction=0.5)
    with pytest.raises(ConfigError, match="'bucket_weights' must be a table"):
        build(bucket_weights=[1, 2])
    with pytest.raises(ConfigError, match="folder"):
        config = tiny_config("unet", tmp_path / "run", buckets=True, min_bucket_reso=16, max_bucket_reso=32,
                             bucket_weights={"32x32": 1})
        training_data(config.replace(data=str(mixed_folder(tmp_path / "data"))), 32, verbose=False, size_multiple=4)
