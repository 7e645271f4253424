"""Token grounding: a loss that makes the words naming an object look at that object.

The UNet's cross-attention decides, at every latent position, which caption tokens it reads. For a
two-object caption ("a red circle to the left of a blue square") the denoising loss only says, in the
end, that the picture was wrong; this loss says where each object's words should have been read.
For every object the caption names, the head-averaged attention probabilities of its colour word and
of its shape word (the token after it) over the positions of a cross-attention map are compared
with the object's region: the loss is (1 - the share of the token's attention that falls inside the
region)^2, averaged over tokens, objects and cross-attention layers. That is the token loss of Wang et
al. 2024, "TokenCompose: Text-to-Image Diffusion with Token-level Supervision", which uses
segmentation masks; on the shapes data the regions come from the pixels themselves: every object has
its own flat palette colour and the two colours of a scene differ, so the pixels along the line from the
background colour to the object's colour are that object (anti-aliased edges included).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..models.attention import map_shape
from ..tokenizer import get_tokenizer
from .dataset import COLOURS
from .regions import colour_regions

# the words of the shapes captions' positions and relations that say which way (one token each)
PLACE_WORDS = ("left", "right", "top", "bottom", "center", "centre", "middle",
               "above", "over", "below", "under", "beneath")


def object_tokens(ids: torch.Tensor, place_words: bool = False) -> list[list[tuple[str, list[int]]]]:
    """For each caption (token ids (B, L)): (colour, [colour word's index, shape word's index]) for
    every object colour it names. Colour words name objects in every shapes caption ("a red circle",
    "a large red ball"): the shape word follows its colour.

    place_words: the words that say where the caption's first object goes join its list: "left" in "on the
    left" or in "a red circle to the left of a blue square", "above", "top", ... A single object's position
    and a relation both describe the object named first."""
    tokenizer = get_tokenizer()
    colour_of = {tokenizer.encode(name)[0]: name for name in COLOURS}
    place_ids = {tokenizer.encode(word)[0] for word in PLACE_WORDS}
    out = []
    for row in ids.tolist():
        found = [(colour_of[token], [i, i + 1]) for i, token in enumerate(row[:-1]) if token in colour_of]
        if place_words and found:
            found[0][1].extend(i for i, token in enumerate(row) if token in place_ids)
        out.append(found)
    return out


def grounding_loss(maps: list[torch.Tensor], images: torch.Tensor, ids: torch.Tensor,
                   weights: Optional[torch.Tensor] = None, place_words: bool = False,
                   words: str = "colour and shape", captions: str = "all") -> torch.Tensor:
    """TokenCompose's token loss over the recorded cross-attention `maps` (see the module docstring).

    maps: [(B, h*w, L)] from `sdlab.models.attention.recorded_cross_attention`; images: the (B, 3, H, W)
    renders the latents came from; ids: the (B, L) token ids the UNet was conditioned on. Captions that name no object
    colour (dropped captions) add nothing; with none in the batch the loss is 0 (with a gradient path).
    """
    height, width = images.shape[-2:]
    regions = colour_regions(images)
    tokens = object_tokens(ids, place_words)
    if words == "shape":  # each object's list is [colour word, shape word, place words...]: drop the colour word
        tokens = [[(colour, indices[1:]) for colour, indices in found] for found in tokens]
    if captions == "single":
        tokens = [found if len(found) == 1 else [] for found in tokens]
    terms = []
    for attention in maps:
        h, w = map_shape(attention.shape[1], height, width)
        # a position belongs to an object when any pixel of its cell is mostly that object
        cells = {name: F.adaptive_max_pool2d((region > 0.5).float()[:, None], (h, w)).flatten(1)
                 for name, region in regions.items()}
        for b, found in enumerate(tokens):
            for colour, indices in found:
                inside = cells[colour][b]
                if inside.sum() == 0:  # the caption names a colour the picture does not show
                    continue
                looks = attention[b, :, indices]  # (h*w, words)
                share = (looks * inside[:, None]).sum(0) / looks.sum(0).clamp_min(1e-8)
                term = (1 - share).pow(2)
                terms.append(term if weights is None else term * weights[b])
    if not terms:
        return sum(attention.sum() for attention in maps) * 0.0
    return torch.cat(terms).mean()


def timestep_weights(timesteps: torch.Tensor, num_train_timesteps: int, weighting: str) -> Optional[torch.Tensor]:
    """Per-sample factors on the grounding terms. "uniform": none (TokenCompose). "noise": 2 t / T, a mean
    of 1 over uniform timesteps, 0 on clean latents and 2 on pure noise. Where the latents still show the
    objects, attention can follow the picture; where they are noise, only the caption can say where each
    object goes ("a red circle to the left of a blue square"), so that is where the loss teaches layout.
    "clean": 2 (1 - t / T), the other way round: the words learn to look at objects the latents already
    show, and the noisy steps, where the layout and the pairing of colours with shapes are decided, are
    left to the other objectives."""
    if weighting == "uniform":
        return None
    noise_level = timesteps.float() / num_train_timesteps
    return 2 * noise_level if weighting == "noise" else 2 * (1 - noise_level)
