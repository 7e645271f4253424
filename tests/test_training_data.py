"""Training data: captioned image folders, the shapes stream, and batches that are a pure function of
(seed, step), the same whether one process or several share them."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.errors import InputError
from sdlab.shapes.dataset import ShapesData
from sdlab.training.data import ImageFolder, batches, open_data, resize_and_crop, sample_numbers


def halves(width: int, height: int, left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """An image whose left half is one colour and right half another."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = left
    array[:, width // 2:] = right
    return Image.fromarray(array)


def make_folder(root, count: int, captioned: int | None = None, size=(40, 40)):
    root.mkdir(exist_ok=True)
    captioned = count if captioned is None else captioned
    for i in range(count):
        colour = (i * 40 % 256, 100, 200)
        Image.new("RGB", size, colour).save(root / f"img{i:02d}.png")
        if i < captioned:
            (root / f"img{i:02d}.txt").write_text(f"  picture   number {i}\n")
    return root


def test_images_are_paired_with_same_named_captions_whitespace_normalised(tmp_path):
    folder = make_folder(tmp_path / "data", 3)
    data = ImageFolder(str(folder), size=16)
    assert len(data) == 3
    assert data.captions == ["picture number 0", "picture number 1", "picture number 2"]
    image, caption = data.load(1)
    assert image.shape == (3, 16, 16) and caption == "picture number 1"
    assert image.min() >= -1 and image.max() <= 1


def test_jpg_webp_and_nested_folders_are_found(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(root / "a.jpg")
    Image.new("RGB", (20, 20), "blue").save(root / "sub" / "b.webp")
    (root / "notes.md").write_text("not an image")
    assert [p.split("/")[-1] for p in ImageFolder(str(root), 8).paths] == ["a.jpg", "b.webp"]


def test_images_without_captions_train_with_the_empty_caption_and_are_counted_once(tmp_path, capsys):
    folder = make_folder(tmp_path / "data", 5, captioned=3)
    data = ImageFolder(str(folder), size=16)
    assert len(data.missing_captions) == 2
    assert data.captions[3:] == ["", ""]
    err = capsys.readouterr().err
    assert err.count("have no .txt caption") == 1 and "2 of 5 images" in err


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    folder = make_folder(tmp_path / "data", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (folder / "empty.jpg").write_bytes(b"")
    data = ImageFolder(str(folder), size=16)
    assert len(data) == 2
    assert sorted(p.split("/")[-1] for p in data.unreadable) == ["broken.png", "empty.jpg"]
    assert "skipped 2 unreadable image files" in capsys.readouterr().err


def test_an_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no training images in .*empty.*same-named .txt caption"):
        ImageFolder(str(tmp_path / "empty"), 16)
    with pytest.raises(InputError, match="data folder not found"):
        open_data(str(tmp_path / "nowhere"), 16)
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"junk")
    with pytest.raises(InputError, match="1 files could not be read"):
        ImageFolder(str(only_broken), 16)


def test_resize_keeps_the_aspect_ratio_and_the_centre_crop_is_centred():
    wide = halves(80, 40)  # red | blue; the centred square straddles the boundary
    out = np.asarray(resize_and_crop(wide, 20, "center", np.random.default_rng(0)))
    assert out.shape == (20, 20, 3)
    assert tuple(out[10, 2]) == (255, 0, 0) and tuple(out[10, 17]) == (0, 0, 255)
    tall = Image.new("RGB", (30, 90), "green")
    assert resize_and_crop(tall, 12, "center", np.random.default_rng(0)).size == (12, 12)


def test_random_crops_move_along_the_longer_side_only():
    wide = halves(200, 50)  # scaled to 40 x 10: the crop offset decides how much red is in view
    reds = {int((np.asarray(resize_and_crop(wide, 10, "random", np.random.default_rng(s)))[..., 0] > 127).sum())
            for s in range(20)}
    assert len(reds) > 3


def test_each_sample_is_a_pure_function_of_seed_and_sample_number(tmp_path):
    folder = make_folder(tmp_path / "data", 6, size=(60, 40))
    data = ImageFolder(str(folder), size=16, crop="random", flip=True, seed=7)
    assert torch.equal(data[11][0], ImageFolder(str(folder), 16, "random", True, seed=7)[11][0])
    first_epoch = sorted(data.index_of(n) for n in range(6))
    assert first_epoch == list(range(6))  # every image once per epoch
    orders = [[data.index_of(n) for n in range(e * 6, e * 6 + 6)] for e in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2]  # epochs are reshuffled
    other_seed = ImageFolder(str(folder), 16, "random", True, seed=8)
    assert [other_seed.index_of(n) for n in range(6)] != orders[0]


def test_flips_mirror_the_image_about_half_the_time(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    halves(32, 32).save(root / "a.png")
    data = ImageFolder(str(root), size=32, flip=True, seed=0)
    left_red = [data[n][0][0, 16, 2].item() > 0 for n in range(40)]
    assert 8 < sum(left_red) < 32


def test_ranks_and_accumulation_steps_split_the_global_batch_without_overlap():
    batch_size, accum, world = 8, 2, 2
    seen = []
    for micro in range(accum):
        for rank in range(world):
            seen += list(sample_numbers(3, micro, batch_size, accum, rank, world))
    assert seen == list(range(24, 32))  # step 3 is samples 3*8 .. 3*8+7, each once


def test_per_sample_noise_does_not_depend_on_how_many_processes_or_micro_batches_share_the_batch():
    data = ShapesData(16, seed=0)
    one = next(batches(data, 2, 3, batch_size=4, grad_accum=1, seed=5))
    halves_ = [next(batches(data, 2, 3, batch_size=4, grad_accum=1, rank=r, world_size=2, seed=5)) for r in range(2)]
    micro = list(batches(data, 2, 3, batch_size=4, grad_accum=2, seed=5))
    draws = lambda batch: (batch.randn(3), batch.randint(1000))  # noqa: E731 (a trainer's draws, in order)
    noise, timesteps = draws(one)
    for split in (halves_, micro):
        assert torch.equal(torch.cat([h.images for h in split]), one.images)
        assert sum((h.captions for h in split), []) == one.captions
        parts = [draws(h) for h in split]
        assert torch.equal(torch.cat([n for n, _ in parts]), noise)
        assert torch.equal(torch.cat([t for _, t in parts]), timesteps)
    assert [h.micro_size for h in halves_ + micro] == [4, 4, 2, 2]


def test_a_resumed_stream_continues_with_exactly_the_batches_of_an_uninterrupted_one():
    data = ShapesData(16, seed=0)
    straight = list(batches(data, 0, 4, batch_size=2, grad_accum=2, seed=1))
    resumed = list(batches(data, 2, 4, batch_size=2, grad_accum=2, seed=1))
    assert len(straight) == 8 and len(resumed) == 4
    for a, b in zip(straight[4:], resumed):
        assert (a.step, a.micro) == (b.step, b.micro)
        assert torch.equal(a.images, b.images) and torch.equal(a.randn(4), b.randn(4))


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(InputError, match="multiple of grad_accum x processes = 4"):
        next(batches(ShapesData(16), 0, 1, batch_size=6, grad_accum=2, rank=0, world_size=2))


def test_worker_processes_load_the_same_batches(tmp_path):
    folder = make_folder(tmp_path / "data", 4)
    data = ImageFolder(str(folder), size=16, crop="random", seed=2)
    inline = list(batches(data, 0, 3, batch_size=2, grad_accum=1, seed=0))
    workers = list(batches(data, 0, 3, batch_size=2, grad_accum=1, num_workers=2, seed=0))
    assert all(torch.equal(a.images, b.images) and a.captions == b.captions for a, b in zip(inline, workers))


def test_an_image_that_fails_to_decode_mid_run_is_replaced_by_the_next_one(tmp_path, capsys):
    folder = make_folder(tmp_path / "data", 3)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "img01.png")
    noisy = (folder / "img01.png").read_bytes()
    (folder / "img01.png").write_bytes(noisy[: len(noisy) // 2])  # a valid header, then the file ends
    data = ImageFolder(str(folder), size=16)
    assert len(data) == 3  # the header reads fine, so the scan keeps it
    n = next(n for n in range(3) if data.index_of(n) == 1)
    image, caption = data[n]
    assert caption == "picture number 2" and torch.equal(image, data.load(2)[0])
    assert "cannot decode" in capsys.readouterr().err


def test_an_image_is_scaled_to_cover_a_wide_or_tall_canvas_and_cropped_to_it():
    rng = np.random.default_rng(0)
    image = halves(60, 30)
    wide = resize_and_crop(image, (32, 16), "center", rng)
    assert wide.size == (32, 16)
    tall = resize_and_crop(image, (16, 32), "center", rng)  # 2:1 into 1:2: scaled to 64 x 32, the middle cut
    assert tall.size == (16, 32)
    pixels = np.asarray(tall)
    assert (pixels[:, :6, 0] > 200).all() and (pixels[:, -6:, 2] > 200).all()
    assert resize_and_crop(image, 16, "center", rng).size == (16, 16)


def test_the_folder_records_each_images_size_as_seen_after_exif_rotation(tmp_path):
    root = make_folder(tmp_path / "data", 2, size=(40, 20))
    rotated = Image.new("RGB", (40, 20), "red")
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    rotated.save(root / "img09.jpg", exif=exif)
    data = ImageFolder(str(root), size=16)
    assert data.sizes == [(40, 20), (40, 20), (20, 40)]
    image, _ = data.sample_at(0, 24, 8, index=0)
    assert image.shape == (3, 8, 24)
