"""Aspect-ratio bucketing: train on images of several shapes and sizes, each batch from one bucket.

Square crops cut the heads off portraits and teach a model that every picture is square (NovelAI 2022,
"aspect ratio bucketing"; kohya's sd-scripts `--enable_bucket`). Here, as there:
- a bucket is a (width, height) canvas, both multiples of `step`, the model's size multiple (VAE factor
  x UNet downsampling: 64 for SD, 8 for the bundled shapes model), each side in [min_reso, max_reso]
  and width x height <= max_reso^2;
- an image goes to the bucket of the nearest aspect ratio (among equal ratios, the largest bucket that
  does not enlarge it), is scaled to cover it and cropped to it (centred, or at a random offset);
- every global batch comes from one bucket, so its images stack into one tensor.

Which bucket a step uses is, like everything else in data.py, a pure function of (seed, step): every
rank and every micro-batch of a step loads from the same bucket, and a resumed run sees what the
uninterrupted one would have. A folder's images are planned per epoch (seeded shuffle, grouped by
bucket, cut into batches, batches shuffled); a data set that can draw any size (the shapes scenes)
draws each step's samples at a bucket picked by a seeded generator.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError

Bucket = tuple[int, int]  # (width, height) in pixels
BUCKET_STREAM = 7_919  # seeds the per-step bucket choice apart from the samples' own generators


def bucket_sizes(min_reso: int, max_reso: int, step: int) -> list[Bucket]:
    """Every (width, height) with both sides multiples of `step` in [min_reso, max_reso] and at most
    max_reso^2 pixels, smallest area first."""
    if step < 1 or min_reso < step or min_reso % step or max_reso % step or max_reso < min_reso:
        raise ConfigError(f"buckets need min_bucket_reso <= max_bucket_reso, both multiples of "
                          f"bucket_reso_steps = {step}; got {min_reso} and {max_reso}")
    sides = range(min_reso, max_reso + 1, step)
    found = [(w, h) for w in sides for h in sides if w * h <= max_reso * max_reso]
    return sorted(found, key=lambda b: (b[0] * b[1], b[0], b[1]))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket for a width x height image: the nearest aspect ratio (on a log scale, so 2:1 and 1:2
    are equally far from 1:1); among those, the largest no bigger than the image, else the smallest."""
    def distance(bucket: Bucket) -> float:
        return abs(math.log(width / height) - math.log(bucket[0] / bucket[1]))

    best = min(distance(b) for b in buckets)
    nearest = [b for b in buckets if distance(b) - best < 1e-9]
    fitting = [b for b in nearest if b[0] * b[1] <= width * height]
    return max(fitting, key=lambda b: b[0] * b[1]) if fitting else min(nearest, key=lambda b: b[0] * b[1])


def bucket_weights(table: Mapping[str, float], buckets: Sequence[Bucket]) -> list[float]:
    """A recipe's `bucket_weights` table ({"64x64": 0.5, "128x128": 0.3, ...}) as one weight per bucket,
    in the buckets' order; a bucket the table leaves out is never drawn."""
    names = {f"{w}x{h}": (w, h) for w, h in buckets}
    for key, weight in table.items():
        if key not in names:
            raise ConfigError(f"bucket_weights: '{key}' is not one of the buckets ({', '.join(names)}); "
                              "name them WIDTHxHEIGHT, or widen min/max_bucket_reso")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or not math.isfinite(weight):
            raise ConfigError(f"bucket_weights: the weight of {key} must be a number >= 0, got {weight!r}")
    weights = [float(table.get(name, 0.0)) for name in names]
    if sum(weights) <= 0:
        raise ConfigError("bucket_weights: at least one bucket needs a weight above 0")
    return weights


def step_bucket(seed: int, step: int, buckets: Sequence[Bucket], home: Optional[Bucket] = None,
                home_fraction: float = 0.0, weights: Optional[Sequence[float]] = None) -> Bucket:
    """The bucket step `step` draws at, for a data set that can draw any size: uniform over the buckets;
    with `weights` (one per bucket), in proportion to them; or, with a `home` bucket and `home_fraction`
    > 0, `home` at that fraction of the steps and the others uniformly at the rest. A model fine-tuned
    from one size keeps what it drew there when that size stays a large share of the steps (one step in
    nine, uniform over 64..128 px at step 32, cost the bundled model 18 points of its 64 px two-object
    rate: MODEL_CARD.md, "Aspect-ratio buckets")."""
    rng = np.random.default_rng([seed, step, BUCKET_STREAM])
    if weights is not None:
        p = np.asarray(weights, dtype=np.float64)
        return buckets[int(rng.choice(len(buckets), p=p / p.sum()))]
    if home is None or home_fraction <= 0:
        return buckets[int(rng.integers(len(buckets)))]
    others = [b for b in buckets if b != home]
    if not others or rng.random() < home_fraction:
        return home
    return others[int(rng.integers(len(others)))]


class BucketedStream:
    """A data set with `sample_at(n, width, height)` (e.g. sdlab.shapes' ShapesData), each step's samples
    drawn at one seeded bucket (step_bucket: `home` at `home_fraction` of the steps, or each bucket at its
    share of `weights`)."""

    def __init__(self, data, buckets: Sequence[Bucket], batch_size: int, seed: int = 0,
                 home: Optional[Bucket] = None, home_fraction: float = 0.0,
                 weights: Optional[Sequence[float]] = None):
        self.data, self.buckets, self.batch_size, self.seed = data, list(buckets), batch_size, seed
        if home is not None and home not in self.buckets:
            raise ConfigError(f"the bucket {home[0]}x{home[1]} is not one of the buckets "
                              f"({', '.join(f'{w}x{h}' for w, h in self.buckets)}); widen min/max_bucket_reso")
        if weights is not None and len(weights) != len(self.buckets):
            raise ValueError(f"{len(weights)} bucket weights for {len(self.buckets)} buckets")
        self.home, self.home_fraction, self.weights = home, home_fraction, weights

    def bucket_of_step(self, step: int) -> Bucket:
        return step_bucket(self.seed, step, self.buckets, self.home, self.home_fraction, self.weights)

    def __getitem__(self, n: int) -> tuple[torch.Tensor, str]:
        return self.data.sample_at(n, *self.bucket_of_step(n // self.batch_size))

    def validation_examples(self, count: int) -> list[tuple[torch.Tensor, str]]:
        return self.data.validation_examples(count)


class BucketedFolder:
    """An ImageFolder (data.py) cut into one-bucket batches, epoch by epoch.

    Epoch e: the images in the order of a generator seeded by (seed, e), grouped by bucket, each
    group cut into batches of `batch_size` (the last one filled up from the group's start, so every
    batch is full and holds one bucket), the batches shuffled. The number of batches per epoch is fixed
    by the bucket counts, so step s is batch s mod that of epoch s // that.
    """

    def __init__(self, folder, buckets: Sequence[Bucket], batch_size: int, seed: int = 0):
        self.folder, self.batch_size, self.seed = folder, batch_size, seed
        self.assigned = [nearest_bucket(w, h, buckets) for w, h in folder.sizes]  # image -> its bucket
        self.buckets = sorted(set(self.assigned), key=lambda b: (b[0] * b[1], b))  # the buckets in use
        counts = [self.assigned.count(b) for b in self.buckets]
        self.steps_per_epoch = sum(math.ceil(c / batch_size) for c in counts)

    @functools.lru_cache(maxsize=4)
    def _plan(self, epoch: int) -> list[tuple[Bucket, list[int]]]:
        rng = np.random.default_rng([self.seed, epoch, BUCKET_STREAM])
        order = rng.permutation(len(self.assigned))
        plan = []
        for bucket in self.buckets:
            members = [int(i) for i in order if self.assigned[i] == bucket]
            for start in range(0, len(members), self.batch_size):
                batch = [members[(start + k) % len(members)] for k in range(self.batch_size)]
                plan.append((bucket, batch))
        return [plan[i] for i in rng.permutation(len(plan))]

    def batch_of_step(self, step: int) -> tuple[Bucket, list[int]]:
        """The bucket of step `step` and the image indices of its global batch."""
        return self._plan(step // self.steps_per_epoch)[step % self.steps_per_epoch]

    def bucket_of_step(self, step: int) -> Bucket:
        return self.batch_of_step(step)[0]

    def __getitem__(self, n: int) -> tuple[torch.Tensor, str]:
        (width, height), indices = self.batch_of_step(n // self.batch_size)
        return self.folder.sample_at(n, width, height, indices[n % self.batch_size])

    def validation_examples(self, count: int) -> list[tuple[torch.Tensor, str]]:
        return self.folder.validation_examples(count)


def size_multiple(model) -> Optional[int]:
    """The side every bucket must be a multiple of for `model` (a ModelConfig): the VAE's downsampling
    factor times the UNet's, so the latents halve evenly at every UNet level. None without a model."""
    if model is None:
        return None
    return 2 ** (len(model.vae.ch_mult) - 1) * 2 ** (len(model.unet.channel_mult) - 1)
