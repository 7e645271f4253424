"""Training data: a folder of captioned images or a data set a package registered by name (sdlab.shapes:
`data = "shapes"`), and the batches the loop feeds to a trainer.

Every sample a run sees has a number n = step * batch_size + position in the global batch. What sample
n is (which image, which crop, which flip) is a pure function of (seed, n), so a resumed run continues
with exactly the samples it would have seen, and under torchrun each rank loads only its slice of the
same global batch. The per-step random numbers of a trainer (noise, timesteps, caption dropout) are
drawn the same way: for the whole global batch from a generator seeded by (seed, step), then sliced,
so 1 process and N processes, with or without gradient accumulation, compute the same thing.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, InputError
from .buckets import BucketedFolder, BucketedStream, bucket_sizes, bucket_weights
from .config import DATA_SOURCES, TrainConfig
from .distributed import note

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1], the range the VAE sees."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1


def resize_and_crop(image: Image.Image, size, crop: str, rng: np.random.Generator) -> Image.Image:
    """Scale the image to cover a size x size square, or a (width, height) canvas (aspect kept), then
    cut that canvas out of it: centred, or at a random offset along the side that sticks out."""
    width, height = (size, size) if isinstance(size, int) else size
    scale = max(width / image.width, height / image.height)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        # reducing_gap: shrink by whole factors first (fast, box filter), then Lanczos for the rest
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if crop == "random":
        left, top = int(rng.integers(new_w - width + 1)), int(rng.integers(new_h - height + 1))
    else:
        left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


class ImageFolder:
    """Images (.jpg/.jpeg/.png/.webp, searched recursively) with same-named .txt captions.

    An image without a caption trains with the empty caption, and a file PIL cannot open is skipped;
    both are counted (`missing_captions`, `unreadable`) and reported once. `sizes` holds each image's
    (width, height) as it is seen (EXIF rotation applied), for aspect-ratio buckets.
    """

    def __init__(self, folder: str, size: int, crop: str = "center", flip: bool = False, seed: int = 0,
                 verbose: bool = True):
        if not os.path.isdir(folder):
            named = (f", or one of: {', '.join(DATA_SOURCES)}" if DATA_SOURCES
                     else " (the bundled 'shapes' set is there once sdlab.shapes is imported)")
            raise InputError(f"data folder not found: {folder}; pass a folder of images with .txt captions{named}")
        self.folder, self.size, self.crop, self.flip, self.seed = folder, size, crop, flip, seed
        self.paths: list[str] = []
        self.captions: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.missing_captions: list[str] = []
        self.unreadable: list[str] = []
        for path in _image_files(folder):
            try:
                with Image.open(path) as image:  # the header only: a folder of a million images scans in seconds
                    size = _oriented_size(image)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                self.unreadable.append(path)
                continue
            self.paths.append(path)
            self.sizes.append(size)
            self.captions.append(self._caption(path))
        if not self.paths:
            found = f" ({len(self.unreadable)} files could not be read as images)" if self.unreadable else ""
            raise InputError(f"no training images in {folder}{found}; it needs {', '.join(IMAGE_SUFFIXES)} files, "
                             "each with a same-named .txt caption")
        if verbose and self.missing_captions:
            note(f"{len(self.missing_captions)} of {len(self.paths)} images in {folder} have no .txt caption; "
                  f"they train with the empty caption (e.g. {self.missing_captions[0]})")
        if verbose and self.unreadable:
            note(f"skipped {len(self.unreadable)} unreadable image files in {folder} (e.g. {self.unreadable[0]})")

    def _caption(self, path: str) -> str:
        caption_path = os.path.splitext(path)[0] + ".txt"
        if not os.path.isfile(caption_path):
            self.missing_captions.append(path)
            return ""
        with open(caption_path, encoding="utf-8", errors="replace") as f:
            return " ".join(f.read().split())

    def __len__(self) -> int:
        return len(self.paths)

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))

    def index_of(self, n: int) -> int:
        """The image sample n shows: epochs are seeded permutations, so each image appears once per epoch."""
        return int(self._order(n // len(self.paths))[n % len(self.paths)])

    def load(self, index: int, rng: Optional[np.random.Generator] = None,
             canvas: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, str]:
        """Image `index`, resized and cropped to size x size or to `canvas` (width, height) (random crop
        and flip drawn from `rng`), with its caption."""
        rng = rng if rng is not None else np.random.default_rng(0)
        path = self.paths[index]
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
        image = resize_and_crop(image, canvas or self.size, self.crop, rng)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image), self.captions[index]

    def __getitem__(self, n: int) -> tuple[torch.Tensor, str]:
        return self.sample_at(n, self.size, self.size, self.index_of(n))

    def sample_at(self, n: int, width: int, height: int, index: int) -> tuple[torch.Tensor, str]:
        """Sample n: image `index` on a width x height canvas (an aspect-ratio bucket's, buckets.py)."""
        rng = np.random.default_rng([self.seed, n, 1])
        for attempt in range(len(self.paths)):
            try:
                return self.load((index + attempt) % len(self.paths), rng, (width, height))
            except (OSError, ValueError, SyntaxError) as exc:
                # a file that passed the scan but fails to decode (truncated): the next image stands in,
                # the same one on every rank and in every rerun
                note(f"cannot decode {self.paths[(index + attempt) % len(self.paths)]} ({exc}); using the next image")
        raise InputError(f"none of the images in {self.folder} could be decoded")

    def validation_examples(self, count: int) -> list[tuple[torch.Tensor, str]]:
        """The first `count` images in file order, centre-cropped and unflipped."""
        rng = np.random.default_rng(0)
        keep = self.crop, self.flip
        self.crop, self.flip = "center", False
        try:
            return [self.load(i % len(self.paths), rng) for i in range(count)]
        finally:
            self.crop, self.flip = keep


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF rotation exif_transpose applies (orientations 5-8 turn by 90°).
    Only JPEG and WebP are asked: their EXIF sits in the header, while a PNG's may follow the pixels
    and reading it would decode the whole file."""
    orientation = image.getexif().get(0x0112, 1) if image.format in ("JPEG", "MPO", "WEBP") else 1
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def _image_files(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(files)
                  if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")]
    return found


def open_data(folder: str, size: int, crop: str = "center", flip: bool = False, seed: int = 0,
              verbose: bool = True) -> ImageFolder:
    """A folder of captioned images, yielding (image (3, size, size) in [-1, 1], caption)."""
    return ImageFolder(folder, size, crop, flip, seed, verbose)


def training_data(config: TrainConfig, size: int, verbose: bool = True, size_multiple: Optional[int] = None):
    """The recipe's `data`: a registered data set by its name (module.training_data(config, size)), else a
    folder; with `buckets`, in one-bucket batches (buckets.py) whose sides are multiples of
    `bucket_reso_steps`, unset: `size_multiple` (the model's, buckets.size_multiple)."""
    if config.data in DATA_SOURCES:
        data = importlib.import_module(DATA_SOURCES[config.data]).training_data(config, size)
    else:
        data = open_data(config.data, size, config.crop, config.flip, config.seed, verbose)
    return bucketed(data, config, size, size_multiple) if config.buckets else data


def bucketed(data, config: TrainConfig, size: int, size_multiple: Optional[int] = None):
    """`data` in one-bucket batches, the buckets from the recipe's min/max_bucket_reso (unset: half the
    training size and the training size) and bucket_reso_steps."""
    step = config.bucket_reso_steps or size_multiple or 8
    if size_multiple and step % size_multiple:
        raise ConfigError(f"bucket_reso_steps = {step} must be a multiple of {size_multiple}, the model's "
                          "VAE x UNet downsampling (its latents halve at every UNet level)")
    low = config.min_bucket_reso or max(step, size // 2 // step * step)
    high = config.max_bucket_reso or size // step * step
    sizes = bucket_sizes(low, high, step)
    if isinstance(data, ImageFolder):
        for key in ("resolution_bucket_fraction", "bucket_weights"):
            if getattr(config, key):
                raise ConfigError(f"{key} weights the buckets of data drawn at any size; a "
                                  "folder's batches follow its images' sizes: drop it")
        return BucketedFolder(data, sizes, config.batch_size, config.seed)
    if hasattr(data, "sample_at"):
        home = (size, size) if config.resolution_bucket_fraction else None
        weights = bucket_weights(config.bucket_weights, sizes) if config.bucket_weights is not None else None
        return BucketedStream(data, sizes, config.batch_size, config.seed, home, config.resolution_bucket_fraction,
                              weights)
    raise ConfigError(f"data '{config.data}' cannot be drawn at other sizes; drop 'buckets'")


# -- batches -----------------------------------------------------------------------------------------


def step_seed(seed: int, step: int) -> int:
    """One 63-bit seed per (run seed, step), from numpy's SeedSequence hashing."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


@dataclass
class Batch:
    """What a trainer's loss sees: this rank's slice of one micro-batch, and the random numbers for it.

    `randn`, `rand` and `randint` draw for the step's whole global batch, from a generator seeded by
    (seed, step) that is identical on every rank and in every micro-batch, and return this slice's
    rows: noise and timesteps do not depend on how many processes or accumulation steps share the batch.
    """

    images: torch.Tensor  # (b, 3, H, W) in [-1, 1], on the training device
    captions: list[str]  # b captions
    step: int
    micro: int
    global_size: int  # samples in the step's global batch, over all ranks and micro-batches
    start: int  # this slice's first row in it
    micro_size: int  # samples in this micro-batch over all ranks (what a contrastive loss compares)
    rank: int
    world_size: int
    generator: torch.Generator

    @property
    def size(self) -> int:
        return self.images.shape[0]

    def _slice(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.start:self.start + self.size].to(self.images.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return self._slice(torch.randn((self.global_size, *shape), generator=self.generator))

    def rand(self, *shape: int) -> torch.Tensor:
        return self._slice(torch.rand((self.global_size, *shape), generator=self.generator))

    def randint(self, high: int) -> torch.Tensor:
        return self._slice(torch.randint(0, high, (self.global_size,), generator=self.generator))


def sample_numbers(step: int, micro: int, batch_size: int, grad_accum: int, rank: int, world_size: int) -> range:
    """The sample numbers rank `rank` loads for micro-batch `micro` of optimizer step `step`."""
    micro_size = batch_size // grad_accum
    local = micro_size // world_size
    first = step * batch_size + micro * micro_size + rank * local
    return range(first, first + local)


def _collate(examples: Sequence[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([image for image, _ in examples]), [caption for _, caption in examples]


def batches(data, start_step: int, steps: int, batch_size: int, grad_accum: int, rank: int = 0,
            world_size: int = 1, num_workers: int = 0, seed: int = 0,
            device: torch.device = torch.device("cpu")) -> Iterator[Batch]:
    """The micro-batches of steps start_step .. steps-1 for this rank, in order, decoded by `num_workers`
    DataLoader processes (0: in this process)."""
    micro_size = batch_size // grad_accum
    if micro_size % world_size:
        raise InputError(f"the global batch {batch_size} over {grad_accum} accumulation steps gives micro-batches "
                         f"of {micro_size}, which do not split over {world_size} processes; pick a batch size "
                         f"that is a multiple of grad_accum x processes = {grad_accum * world_size}")
    numbers = (list(sample_numbers(step, micro, batch_size, grad_accum, rank, world_size))
               for step in range(start_step, steps) for micro in range(grad_accum))
    loader = torch.utils.data.DataLoader(data, batch_sampler=numbers, num_workers=num_workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    local = micro_size // world_size
    for k, (images, captions) in enumerate(loader):
        step, micro = start_step + k // grad_accum, k % grad_accum
        generator = torch.Generator().manual_seed(step_seed(seed, step))
        yield Batch(images.to(device, non_blocking=True), captions, step, micro, batch_size,
                    micro * micro_size + rank * local, micro_size, rank, world_size, generator)
