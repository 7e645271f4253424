"""Scene contrast: a two-object caption must predict its own picture better than a near miss of it.

After the relation runs, the bundled model's two-object failures are pictures that are almost right: one
of the two objects drawn a second time, or the two objects' colours exchanged (MODEL_CARD.md). Plain MSE
on correct pictures never shows the model such a picture, so nothing says that the caption speaks against
it. This term does, in the form of the relation contrast (`relation_contrast`), with the roles turned
round: there the latents stay and the caption is changed; here the caption stays and the picture is.

For each captioned two-object sample at a timestep >= the minimum, a near miss of its picture is made
from the pixels (each shapes object is one flat palette colour, `regions.colour_lines`): half the time
one object copied to a free place on the canvas (`duplicate_object`), half the time the two objects'
colours exchanged (`recolour.swap_object_colours`). The near miss is encoded, noised with the sample's
own noise at its timestep and denoised under the true caption. With e and e' the mean squared errors of
the true picture and of the near miss against their targets, and s their mean held constant, the loss is

    softplus((e - e') / (tau s)) = -log sigmoid((e' - e) / (tau s))

the cross-entropy of a two-way softmax over -e / (tau s): the caption must explain its own picture better,
as a diffusion classifier (Li et al. 2023) would rank them. It fades once the true picture's error is a
few tau below the near miss's. Diffusion-DPO (Wallace et al. 2023) trains on the same kind of pairs of a
preferred and a rejected picture for one caption; here the pairs are rendered, not judged.

On the bundled model it did not do what it was made for: 600 steps drew more duplicates, not fewer,
and some shapeless blobs (MODEL_CARD.md, "Near-miss pictures"). Nothing bounds how a near miss's error
rises, so the model can satisfy the term by spoiling those predictions rather than by telling the
pictures apart; the option is kept for that record and was not shipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import COLOURS
from .regions import COLOUR_TOLERANCE, colour_lines
from .recolour import MIN_SHARE, swap_object_colours
from .relation_contrast import ranking_loss

# empty pixels kept between a copied object and every other object, and between it and the border
GAP = 2


def object_regions(image: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(palette colour name, (H, W) share of each pixel that is that object) for every object colour of
    one shapes render (3, H, W) in [-1, 1]. A pixel belongs to the object whose colour's line from the
    background passes nearer, as in `recolour`: anti-aliased edges of an orange object lie near the line
    to yellow too."""
    height, width = image.shape[-2:]
    lines = colour_lines(image[None])
    present = {name: (share[0], distance[0]) for name, (share, distance) in lines.items()
               if (share * (distance <= COLOUR_TOLERANCE)).sum() >= MIN_SHARE * height * width}
    if not present:
        return []
    nearest = torch.stack([distance for _, distance in present.values()]).argmin(dim=0)
    return [(name, share * (distance <= COLOUR_TOLERANCE) * (nearest == k))
            for k, (name, (share, distance)) in enumerate(present.items())]


def free_offsets(region: torch.Tensor, occupied: torch.Tensor) -> list[tuple[int, int]]:
    """(dy, dx) pixel shifts that move `region` (H, W) wholly onto the canvas, GAP pixels from its border,
    with no pixel within GAP of `occupied` (H, W, every object of the picture)."""
    height, width = region.shape
    rows = torch.nonzero(region.amax(dim=1) > 0).flatten()
    cols = torch.nonzero(region.amax(dim=0) > 0).flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    grown = F.max_pool2d((occupied > 0).float()[None, None], 2 * GAP + 1, stride=1, padding=GAP)
    footprint = (region[top:bottom + 1, left:right + 1] > 0).float()[None, None]
    # hits[i, j]: pixels of the object, its box's top-left corner put at (i, j), that land on `grown`
    hits = F.conv2d(grown, footprint)[0, 0]
    free = torch.zeros_like(hits, dtype=torch.bool)
    free[GAP:height - GAP - (bottom - top), GAP:width - GAP - (right - left)] = True
    free &= hits == 0
    return [(int(i) - top, int(j) - left) for i, j in torch.nonzero(free).tolist()]


def duplicate_object(image: torch.Tensor, choice: float, place: float) -> torch.Tensor | None:
    """The render (3, H, W) with one of its objects drawn once more at a free place, or None when it does
    not show two objects or the chosen one has no free place. `choice` and `place` in [0, 1) pick the object
    (the first or the second found) and the place among the free ones."""
    regions = object_regions(image)
    if len(regions) != 2:
        return None
    name, region = regions[int(choice * 2)]
    occupied = regions[0][1] + regions[1][1]
    offsets = free_offsets(region, occupied)
    if not offsets:
        return None
    dy, dx = offsets[min(int(place * len(offsets)), len(offsets) - 1)]
    copy = torch.roll(region, shifts=(dy, dx), dims=(0, 1))[None]  # (1, H, W)
    colour = torch.tensor(COLOURS[name], dtype=torch.float32, device=image.device).view(3, 1, 1) / 127.5 - 1
    pixels = image.float()
    return (pixels * (1 - copy) + colour * copy).to(image.dtype)


def near_misses(images: torch.Tensor, kinds: torch.Tensor, choices: torch.Tensor,
                places: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For renders (B, 3, H, W): their near misses (B, 3, H, W) and a (B,) bool, which have one. Where
    `kinds` (B,) < 0.5 an object is duplicated (`duplicate_object`, with `choices` and `places`), otherwise
    the two colours are exchanged; a picture without two objects (or without room for a copy) has none."""
    out, made = images.clone(), torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
    swap = (kinds >= 0.5).to(images.device)
    if swap.any():
        out[swap], made[swap] = swap_object_colours(images[swap])
    for b in torch.nonzero(~swap).flatten().tolist():
        copy = duplicate_object(images[b], float(choices[b]), float(places[b]))
        if copy is not None:
            out[b], made[b] = copy, True
    return out, made


def scene_contrast(true_errors: torch.Tensor, miss_errors: torch.Tensor, temperature: float,
                   batch_size: int) -> tuple[torch.Tensor, dict]:
    """The term over the contrasted samples, summed and divided by `batch_size`, and its logs.

    `true_errors` (n,): the samples' mean squared errors under their captions (with gradients);
    `miss_errors` (n,): their near misses' errors under the same captions."""
    if true_errors.numel() == 0:  # the same log names every step: ranks and micro-batches average them
        zero = true_errors.sum() * 0
        return zero, {"scene_contrast": zero.detach(), "scene_margin": zero.detach()}
    loss, margin = ranking_loss(true_errors, miss_errors, temperature)
    return loss.sum() / batch_size, {"scene_contrast": loss.mean().detach(), "scene_margin": margin.mean().detach()}
