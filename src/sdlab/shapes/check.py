"""Does an image show what its `shapes` caption says? Decided from pixels alone, as the spec describes.

Background: the border's dominant colour. Objects: connected components of pixels far from the
background, tiny specks dropped. Per object: colour = nearest palette colour of its median
least-mixed pixel; shape = the spec shape whose template best overlaps the object's outline, each
template placed by the object's area and centroid and sized by the shape's fill ratio of its
bounding box (circle pi/4, square 1, triangle 1/2); size = nearest nominal side of that box;
position = nearest nominal centre; relation from the two centres. Measurements use each pixel's
soft coverage, and area and centroid do not move under blur, so anti-aliased or slightly blurred
edges and colour noise from a small generative model leave the verdicts alone.

A width x height image is judged as sdlab.shapes.dataset draws such canvases: centres as fractions of
each axis, sides as fractions of the shorter side; a square image exactly as the spec says.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image

from .dataset import BACKGROUNDS, COLOURS, POSITIONS, RELATIONS, SIZES, Meaning, SceneObject, coverage
from .dataset import parse_caption as _parse_caption
from ..errors import InputError

FILL_RATIOS = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
MIN_OVERLAP = 0.7  # below this IoU with every template the blob is no shape of the spec
MIN_OBJECT_AREA = 0.005  # of the image; a small triangle at the spec's minimum side covers 0.018
RELATION_MIN_DISTANCE = 0.2  # the spec draws >= 0.35; a generated image may place objects less exactly
ALPHA_FLOOR = 0.15  # coverage below this is background noise, above 1 - ALPHA_FLOOR a full pixel


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]  # bounding-box centre of the best template, fractions of width and height
    side: float  # bounding-box side of the best template, fraction of the shorter image side
    overlap: float  # soft IoU of the object with that template
    area: float  # fraction of the image


@dataclass(frozen=True)
class Analysis:
    background: str
    objects: tuple[DetectedObject, ...]  # largest first


def parse_caption(caption: str) -> Meaning:
    """The meaning of a canonical `shapes` caption (paraphrases from sdlab.shapes.dataset also parse)."""
    return _parse_caption(caption)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
            and image.dtype == np.uint8):
        raise InputError("the shapes checker takes a PIL image or (H, W, 3) uint8 array; "
                         "convert model outputs first")
    return image.astype(np.float32)


def _nearest(value: np.ndarray, table: dict) -> str:
    return min(table, key=lambda name: float(np.sum((np.asarray(table[name], dtype=np.float32) - value) ** 2)))


def _window_sum(array: np.ndarray, radius: int = 1) -> np.ndarray:
    """Sum over the (2r+1)^2 window around each pixel (zero outside the image)."""
    h, w = array.shape[:2]
    padded = np.pad(array, ((radius, radius), (radius, radius)) + ((0, 0),) * (array.ndim - 2))
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return _window_sum(mask.astype(np.int32), radius) > 0


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of `mask`, as boolean masks."""
    h, w = mask.shape
    todo = mask.tolist()
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if not todo[y0][x0]:
            continue
        todo[y0][x0] = False
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and todo[ny][nx]:
                    todo[ny][nx] = False
                    stack.append((ny, nx))
        component = np.zeros_like(mask)
        component[tuple(np.array(pixels).T)] = True
        found.append(component)
    return found


def _background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """The dominant background colour of the border ring, and its median actual RGB."""
    ring = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    names = list(BACKGROUNDS)
    reference = np.asarray([BACKGROUNDS[n] for n in names], dtype=np.float32)
    labels = np.argmin(((ring[:, None, :] - reference[None]) ** 2).sum(-1), axis=1)
    dominant = int(np.bincount(labels, minlength=len(names)).argmax())
    return names[dominant], np.median(ring[labels == dominant], axis=0)


def _measure(pixels, background_rgb, component, region) -> DetectedObject:
    height, width = component.shape
    shorter = min(width, height)
    # the object's own colour: its pixels least mixed with the background (soft or blurred edges)
    distance = np.linalg.norm(pixels[component] - background_rgb, axis=-1)
    rgb = np.median(pixels[component][distance >= np.median(distance)], axis=0)
    direction = rgb - background_rgb
    alpha = ((pixels - background_rgb) @ direction) / max(float(direction @ direction), 1e-6)
    alpha = np.clip((alpha - ALPHA_FLOOR) / (1 - 2 * ALPHA_FLOOR), 0, 1) * region
    # Area and centroid survive blur (a symmetric kernel moves no mass), so they place the templates.
    area = max(float(alpha.sum()), 1e-6)
    cx = float(alpha.sum(axis=0) @ (np.arange(width) + 0.5)) / area
    cy = float(alpha.sum(axis=1) @ (np.arange(height) + 0.5)) / area
    colour, fits = _nearest(rgb, COLOURS), []
    for shape, fill in FILL_RATIOS.items():
        side = math.sqrt(area / fill) / shorter
        # a triangle's centroid lies 2/3 of the way down from its apex, 1/6 of the side below the box centre
        center = (cx / width, cy / height - (side * (shorter / height) / 6 if shape == "triangle" else 0.0))
        template = SceneObject(colour, shape, min(SIZES, key=lambda s: abs(SIZES[s] - side)), side, center)
        expected = coverage(template, (width, height))
        iou = float(np.minimum(alpha, expected).sum() / np.maximum(alpha, expected).sum())
        fits.append((iou, template))
    overlap, best = max(fits, key=lambda fit: fit[0])
    return DetectedObject(
        colour=colour, shape=best.shape if overlap >= MIN_OVERLAP else "unknown", size=best.size,
        position=min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], best.center)),
        center=best.center, side=best.side, overlap=overlap, area=area / (width * height))


def analyse(image) -> Analysis:
    """The background and the objects of an image, as the checker sees them."""
    pixels = _as_array(image)
    h, w, _ = pixels.shape
    background, background_rgb = _background(pixels)
    # 3x3 box-averaged for the mask only, so per-pixel colour noise does not make specks
    smooth = _window_sum(pixels) / _window_sum(np.ones((h, w, 1), np.float32))
    distance = np.linalg.norm(smooth - background_rgb, axis=-1)
    nearest_colour = min(float(np.linalg.norm(np.asarray(c, dtype=np.float32) - background_rgb))
                         for c in COLOURS.values())
    mask = distance > nearest_colour / 2
    mask = _window_sum(mask.astype(np.int32)) >= 5  # 3x3 majority: drops salt noise and 1-px bridges, fills pinholes
    components = [c for c in _components(mask) if c.sum() >= MIN_OBJECT_AREA * h * w]
    objects = []
    for i, component in enumerate(components):
        others = np.zeros_like(component)
        for other in components[:i] + components[i + 1:]:
            others |= other
        region = _dilate(component, 2) & ~_dilate(others, 1)  # room for soft edges, not a neighbour's
        objects.append(_measure(pixels, background_rgb, component, region))
    return Analysis(background, tuple(sorted(objects, key=lambda o: -o.area)))


def _relation_holds(first: DetectedObject, second: DetectedObject, relation: str) -> bool:
    axis, sign = RELATIONS[relation]
    along = sign * (first.center[axis] - second.center[axis])
    across = abs(first.center[1 - axis] - second.center[1 - axis])
    return along >= RELATION_MIN_DISTANCE and across <= along


def check(image: Union[Image.Image, np.ndarray], caption: str) -> dict[str, bool]:
    """Which of the caption's attributes the image shows.

    Keys: count, colour, shape, then size and position (one object) or relation (two objects),
    background when the caption states one, and all. Caption objects are matched to detected
    objects (largest first) so as to agree on as many colours and shapes as possible.
    """
    meaning = parse_caption(caption)
    analysis = analyse(image)
    wanted, found = meaning.objects, analysis.objects
    result = {"count": len(found) == len(wanted)}
    best = None
    for chosen in itertools.permutations(found, min(len(found), len(wanted))):
        score = sum((o.colour == c) + (o.shape == s) for o, (c, s, _) in zip(chosen, wanted))
        if best is None or score > best[0]:
            best = (score, chosen)
    chosen = best[1] if best else ()
    complete = len(chosen) == len(wanted)
    result["colour"] = complete and all(o.colour == c for o, (c, _, _) in zip(chosen, wanted))
    result["shape"] = complete and all(o.shape == s for o, (_, s, _) in zip(chosen, wanted))
    if len(wanted) == 1:
        result["size"] = complete and chosen[0].size == wanted[0][2]
        result["position"] = complete and chosen[0].position == meaning.position
    else:
        result["relation"] = complete and _relation_holds(chosen[0], chosen[1], meaning.relation)
    if meaning.background is not None:
        result["background"] = analysis.background == meaning.background
    result["all"] = all(result.values())
    return result


def summarize(results: list[dict[str, bool]]) -> dict[str, float]:
    """The fraction of images that pass each attribute, over those whose captions ask for it."""
    keys = sorted({k for r in results for k in r})
    return {k: float(np.mean([r[k] for r in results if k in r])) for k in keys}
