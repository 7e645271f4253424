"""The procedural `shapes` dataset: captioned scenes of one or two flat shapes, LAION in miniature.

Every number here is the contract of /work/shared/specs/shapes-dataset.md (colours, sizes, jitters,
positions, relations, held-out pairs, caption forms); outside checkers rely on it, so it changes only
with a new version of that spec. Coordinates are fractions of the canvas side, x right, y down; an
object's `center` and `side` are those of its bounding box.

The spec's canvases are square. A width x height canvas (aspect-ratio buckets, hires fix, outpainting)
extends it the one consistent way: a position is a fraction of each axis (x of the width, y of the
height), a side a fraction of the SHORTER side (circles stay round, a large shape stays large), and the
relation distances and clearances are fractions of the axis they are measured along. On a square canvas
every formula reduces to the spec's, bit for bit.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import InputError
from ..training.config import TrainConfig
from ..training.data import to_tensor
from .options import shapes_options

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.40}
SIZE_JITTER = 0.03
POSITIONS = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the center": (0.5, 0.5),
}
POSITION_JITTER = 0.04
# relation -> (axis, sign of first-minus-second along it); y grows downwards, so "above" is -1.
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}
INVERSE_RELATION = {"to the left of": "to the right of", "to the right of": "to the left of",
                    "above": "below", "below": "above"}
RELATION_MIN_DISTANCE = 0.35  # along the relation's axis
RELATION_MAX_OFFSET = 0.12  # across it
RELATION_SIZE = "small"
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "square")})
TRAINING_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)

# Our choices where the spec leaves room.
CLEARANCE = 0.02  # "never touching": >= 1 px of pure background at 64 px, to the border and between objects
SINGLE_OBJECT_FRACTION = 0.6
CANONICAL_FRACTION = 0.5  # "the canonical form must also appear, about half the time"
BACKGROUND_STATED_FRACTION = 0.5
SUPERSAMPLE = 4  # anti-aliasing: 4x4 samples per pixel, averaged (a box filter)

# Paraphrase vocabulary; the first entry of every tuple is the canonical word.
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
SHAPE_WORDS = {"circle": ("circle", "ball", "disc"), "square": ("square", "box"), "triangle": ("triangle",)}
POSITION_WORDS = {
    "on the left": ("on the left", "at the left side", "on the left side", "at the left"),
    "on the right": ("on the right", "at the right side", "on the right side", "at the right"),
    "at the top": ("at the top", "near the top", "at the top side", "up top"),
    "at the bottom": ("at the bottom", "near the bottom", "at the bottom side", "down at the bottom"),
    "in the center": ("in the center", "in the centre", "in the middle"),
}
RELATION_WORDS = {
    "to the left of": ("to the left of", "left of"),
    "to the right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
BACKGROUND_WORDS = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str  # "small" | "large"
    side: float  # bounding-box side, fraction of the canvas
    center: tuple[float, float]  # bounding-box centre (x, y), fractions


@dataclass(frozen=True)
class Meaning:
    """What a caption says: objects as (colour, shape, size), size only for a single object."""

    objects: tuple[tuple[str, str, Optional[str]], ...]
    position: Optional[str] = None  # one object
    relation: Optional[str] = None  # two objects: the first object `relation` the second
    background: Optional[str] = None  # None: the caption leaves the background open


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    position: Optional[str] = None  # one object
    relation: Optional[str] = None  # two objects

    def meaning(self, with_background: bool = True) -> Meaning:
        """What the scene's canonical caption says (two objects are always small, so no size)."""
        single = len(self.objects) == 1
        return Meaning(tuple((o.colour, o.shape, o.size if single else None) for o in self.objects),
                       self.position, self.relation, self.background if with_background else None)


# ---------------------------------------------------------------- captions


def format_caption(meaning: Meaning) -> str:
    """The canonical caption of the spec for `meaning`."""
    if len(meaning.objects) == 1:
        colour, shape, size = meaning.objects[0]
        text = f"a {size} {colour} {shape} {meaning.position}"
    else:
        (c1, s1, _), (c2, s2, _) = meaning.objects
        text = f"a {c1} {s1} {meaning.relation} a {c2} {s2}"
    if meaning.background is not None:
        text += f" on a {meaning.background} background"
    return text


# every wording of a relation, longest first so "to the left of" wins over "left of"
_RELATION_PHRASES = sorted(((word, relation, i) for relation, words in RELATION_WORDS.items()
                            for i, word in enumerate(words)), key=lambda item: -len(item[0]))
_RELATION_PATTERN = re.compile(r"\b(" + "|".join(re.escape(word) for word, _, _ in _RELATION_PHRASES) + r")\b")
_INVERSE_WORDING = {word: RELATION_WORDS[INVERSE_RELATION[relation]][min(i, len(RELATION_WORDS[INVERSE_RELATION[relation]]) - 1)]
                    for word, relation, i in _RELATION_PHRASES}


def mirrored_caption(caption: str) -> Optional[str]:
    """`caption` with its relation turned round in the same wording ("a blue square over a red circle"
    -> "a blue square under a red circle"): the caption of the mirrored scene, a hard negative for
    contrastive training. None when the caption states no relation."""
    if _RELATION_PATTERN.search(caption) is None:
        return None
    return _RELATION_PATTERN.sub(lambda match: _INVERSE_WORDING[match.group(1)], caption, count=1)


def canonical_caption(scene: Scene, with_background: bool) -> str:
    return format_caption(scene.meaning(with_background))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def paraphrase(scene: Scene, rng: np.random.Generator, with_background: bool = False) -> str:
    """The same meaning in other words: synonyms, word order, and relations stated the other way round."""
    def pick(options):
        return options[rng.integers(len(options))]

    if len(scene.objects) == 1:
        obj = scene.objects[0]
        thing = f"{pick(SIZE_WORDS[obj.size])} {obj.colour} {pick(SHAPE_WORDS[obj.shape])}"
        thing = f"{_article(thing)} {thing}"
        where = pick(POSITION_WORDS[scene.position])
        text = pick((f"{thing} {where}", f"{where}, {thing}", f"there is {thing} {where}",
                     f"{where} there is {thing}"))
    else:
        first, second, relation = scene.objects[0], scene.objects[1], scene.relation
        if rng.random() < 0.5:  # "A above B" says exactly what "B below A" says
            first, second, relation = second, first, INVERSE_RELATION[relation]
        a, b = (f"{o.colour} {pick(SHAPE_WORDS[o.shape])}" for o in (first, second))
        text = f"{_article(a)} {a} {pick(RELATION_WORDS[relation])} {_article(b)} {b}"
        text = pick((text, f"there is {text}"))
    if with_background:
        colour = pick(BACKGROUND_WORDS[scene.background])
        text += pick((f" on a {colour} background", f" against a {colour} background",
                      f" with a {colour} background", f", {colour} background"))
    return text


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Canonical about half the time, else a paraphrase; the background is stated only sometimes."""
    with_background = bool(rng.random() < BACKGROUND_STATED_FRACTION)
    if rng.random() < CANONICAL_FRACTION:
        return canonical_caption(scene, with_background)
    return paraphrase(scene, rng, with_background)


def _alternation(words) -> str:
    # longest first, so "at the left side" wins over its prefix "at the left"
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _reverse(table: dict) -> dict:
    return {word: name for name, words in table.items() for word in words}


_SIZE_OF, _SHAPE_OF = _reverse(SIZE_WORDS), _reverse(SHAPE_WORDS)
_POSITION_OF, _RELATION_OF = _reverse(POSITION_WORDS), _reverse(RELATION_WORDS)
_BACKGROUND_OF = _reverse(BACKGROUND_WORDS)
_TOKEN = re.compile(
    rf"(?:(?:(?:on|against|with) an? )?(?P<background>{_alternation(_BACKGROUND_OF)}) background"
    rf"|(?P<relation>{_alternation(_RELATION_OF)})"
    rf"|(?P<position>{_alternation(_POSITION_OF)})"
    rf"|(?:(?P<size>{_alternation(_SIZE_OF)}) )?(?P<colour>{_alternation(COLOURS)}) "
    rf"(?P<shape>{_alternation(_SHAPE_OF)})"
    rf"|(?P<filler>a|an|there|is)"
    rf"|(?P<unknown>\S+))(?=\s|$)"
)


def parse_caption(caption: str) -> Meaning:
    """The meaning of a canonical caption or of one of our paraphrases; InputError for anything else."""
    text = " ".join(re.sub(r"[,.;]", " ", caption.lower()).split())
    objects, relation_at, position, background, relation = [], None, None, None, None
    for match in _TOKEN.finditer(text):
        if match["unknown"]:
            raise InputError(f"cannot read caption {caption!r}: unknown word {match['unknown']!r}; "
                             "write e.g. 'a large red circle on the left' or "
                             "'a blue square above a yellow triangle on a white background'")
        if match["shape"]:
            size = _SIZE_OF[match["size"]] if match["size"] else None
            objects.append((match["colour"], _SHAPE_OF[match["shape"]], size))
        elif match["relation"]:
            relation, relation_at = _RELATION_OF[match["relation"]], len(objects)
        elif match["position"]:
            position = _POSITION_OF[match["position"]]
        elif match["background"]:
            background = _BACKGROUND_OF[match["background"]]
    if len(objects) not in (1, 2):
        raise InputError(f"caption {caption!r} names {len(objects)} objects; shapes scenes hold one or two")
    meaning = Meaning(tuple(objects), position, relation, background)
    if len(objects) == 1 and (objects[0][2] is None or position is None or relation is not None):
        raise InputError(f"caption {caption!r}: one object needs a size and a position and no relation, "
                         "e.g. 'a large red circle on the left'")
    if len(objects) == 2 and (relation_at != 1 or position is not None or objects[0][2] or objects[1][2]
                              or objects[0][0] == objects[1][0]):
        raise InputError(f"caption {caption!r}: two objects need different colours and a relation between "
                         "them, no size or position, e.g. 'a blue square above a yellow triangle'")
    return meaning


# ---------------------------------------------------------------- scenes


def canvas_size(size) -> tuple[int, int]:
    """(width, height) of a render size: an int N (N x N, the spec's) or a (width, height) pair."""
    sides = list(size) if isinstance(size, (tuple, list)) else [size, size]
    if len(sides) != 2 or any(not isinstance(side, (int, np.integer)) or isinstance(side, bool) or side < 1
                              for side in sides):
        raise InputError(f"render size must be a positive integer number of pixels or a (width, height) "
                         f"pair of them, got {size!r}")
    return int(sides[0]), int(sides[1])


def box_extents(side: float, aspect: float) -> tuple[float, float]:
    """An object's bounding-box side as fractions of the canvas width and height; `side` is a fraction of
    the shorter side, aspect = width / height (1: both are `side`)."""
    return side * min(1.0, 1 / aspect), side * min(1.0, aspect)


def _clear(objects, aspect: float = 1.0) -> bool:
    """No object touches the border or another object (bounding boxes, CLEARANCE apart)."""
    boxes = []
    for o in objects:
        half_x, half_y = (e / 2 for e in box_extents(o.side, aspect))
        boxes.append((o.center[0] - half_x, o.center[1] - half_y, o.center[0] + half_x, o.center[1] + half_y))
    if any(min(b[0], b[1]) < CLEARANCE or max(b[2], b[3]) > 1 - CLEARANCE for b in boxes):
        return False
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) < CLEARANCE:
                return False
    return True


def _side(rng: np.random.Generator, size: str) -> float:
    return SIZES[size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)


def layout(meaning: Meaning, rng: np.random.Generator, aspect: float = 1.0) -> Scene:
    """A scene that `meaning` describes on a canvas of `aspect` = width / height, with the spec's jitter;
    rejection keeps objects clear."""
    background = meaning.background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    while True:
        if len(meaning.objects) == 1:
            colour, shape, size = meaning.objects[0]
            px, py = POSITIONS[meaning.position]
            center = (px + rng.uniform(-POSITION_JITTER, POSITION_JITTER),
                      py + rng.uniform(-POSITION_JITTER, POSITION_JITTER))
            objects = (SceneObject(colour, shape, size, _side(rng, size), center),)
        else:
            axis, sign = RELATIONS[meaning.relation]
            along = rng.uniform(0, 1, size=2)
            across = rng.uniform(0, 1)
            across = (across + rng.uniform(-RELATION_MAX_OFFSET, RELATION_MAX_OFFSET), across)
            if sign * (along[0] - along[1]) < RELATION_MIN_DISTANCE:
                continue
            centers = [(a, c) if axis == 0 else (c, a) for a, c in zip(along, across)]
            objects = tuple(SceneObject(colour, shape, RELATION_SIZE, _side(rng, RELATION_SIZE), tuple(xy))
                            for (colour, shape, _), xy in zip(meaning.objects, centers))
        if _clear(objects, aspect):
            return Scene(background, objects, meaning.position, meaning.relation)


def sample_scene(rng: np.random.Generator, single_object_fraction: float = SINGLE_OBJECT_FRACTION,
                 aspect: float = 1.0) -> Scene:
    """A random training scene: never a held-out colour-shape pair; one object with probability
    `single_object_fraction`, else two."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if rng.random() < single_object_fraction:
        colour, shape = TRAINING_PAIRS[rng.integers(len(TRAINING_PAIRS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        return layout(Meaning(((colour, shape, size),), position=position, background=background), rng, aspect)
    first = TRAINING_PAIRS[rng.integers(len(TRAINING_PAIRS))]
    others = [pair for pair in TRAINING_PAIRS if pair[0] != first[0]]
    second = others[rng.integers(len(others))]
    relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
    return layout(Meaning((first + (None,), second + (None,)), relation=relation, background=background), rng,
                  aspect)


def scene_from_caption(caption: str, rng: np.random.Generator, aspect: float = 1.0) -> Scene:
    """A scene matching `caption` (held-out pairs allowed: this is for evaluation); a random background
    when the caption names none."""
    return layout(parse_caption(caption), rng, aspect)


# ---------------------------------------------------------------- rendering


def coverage(obj: SceneObject, size) -> np.ndarray:
    """(height, width) fraction of each pixel covered by `obj`, from SUPERSAMPLE^2 samples per pixel;
    `size` is N (N x N) or (width, height)."""
    width, height = canvas_size(size)
    half = obj.side * min(width, height) / 2
    cx, cy = obj.center[0] * width, obj.center[1] * height
    x0, x1 = max(0, math.floor(cx - half)), min(width, math.ceil(cx + half))
    y0, y1 = max(0, math.floor(cy - half)), min(height, math.ceil(cy + half))
    result = np.zeros((height, width), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return result
    dx = x0 + (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - cx
    dy = y0 + (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - cy
    dx, dy = dx[None, :], dy[:, None]
    if obj.shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif obj.shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # isosceles, apex up at the top edge, base on the bottom edge, height = base
        inside = (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    samples = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE)
    result[y0:y1, x0:x1] = samples.mean(axis=(1, 3))
    return result


def render(scene: Scene, size=64) -> Image.Image:
    """The scene as an RGB image, size x size or (width, height): flat background, flat anti-aliased shapes."""
    width, height = canvas_size(size)
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        alpha = coverage(obj, (width, height))[..., None]
        image = image * (1 - alpha) + np.asarray(COLOURS[obj.colour], dtype=np.float32) * alpha
    return Image.fromarray(np.rint(image).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- datasets


def training_example(seed: int, index: int, size=64,
                     single_object_fraction: float = SINGLE_OBJECT_FRACTION) -> tuple[Scene, str, Image.Image]:
    """Example `index` of the stream `seed` on a size x size or (width, height) canvas: a pure function of
    (seed, index, size)."""
    width, height = canvas_size(size)
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, single_object_fraction, width / height)
    return scene, training_caption(scene, rng), render(scene, size)


class ShapesDataset(torch.utils.data.IterableDataset):
    """(image (3, size, size) in [-1, 1], caption) pairs generated on the fly.

    Item i is a pure function of (seed, i), so a run is reproducible whatever the batch size or number
    of DataLoader workers (each worker takes every num_workers-th index). length=None streams forever.
    """

    def __init__(self, size: int = 64, seed: int = 0, length: Optional[int] = None):
        self.size, self.seed, self.length = size, seed, length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        _, caption, image = training_example(self.seed, index, self.size)
        return to_tensor(image), caption

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("ShapesDataset(length=None) streams forever; pass length= for a finite epoch")
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        index, step = (0, 1) if info is None else (info.id, info.num_workers)
        while self.length is None or index < self.length:
            yield self[index]
            index += step


class ShapesData:
    """The training loop's shapes samples: sample n is example n of the stream `seed`.

    Validation examples come from another stream, so they are never training samples."""

    VALIDATION_STREAM = 1_000_003

    def __init__(self, size: int, seed: int = 0, single_object_fraction: Optional[float] = None):
        self.size, self.seed = size, seed
        self.single_object_fraction = (SINGLE_OBJECT_FRACTION if single_object_fraction is None
                                       else single_object_fraction)

    def __getitem__(self, n: int) -> tuple[torch.Tensor, str]:
        return self.sample_at(n, self.size, self.size)

    def sample_at(self, n: int, width: int, height: int) -> tuple[torch.Tensor, str]:
        """Sample n drawn on a width x height canvas (an aspect-ratio bucket's, training/buckets.py)."""
        _, caption, image = training_example(self.seed, n, (width, height), self.single_object_fraction)
        return to_tensor(image), caption

    def validation_examples(self, count: int) -> list[tuple[torch.Tensor, str]]:
        examples = []
        for i in range(count):
            _, caption, image = training_example(self.seed + self.VALIDATION_STREAM, i, self.size)
            examples.append((to_tensor(image), caption))
        return examples


def shapes_data(size: int, seed: int = 0, flip: bool = False,
                single_object_fraction: Optional[float] = None) -> ShapesData:
    """The samples of `data = "shapes"`; flips are refused, the captions name sides."""
    if flip:
        raise InputError("flip is off for the shapes data: its captions say 'on the left' and 'to the right of'")
    return ShapesData(size, seed, single_object_fraction)


def training_data(config: TrainConfig, size: int) -> ShapesData:
    """`data = "shapes"` in a recipe (sdlab.training.data.training_data), with its [shapes] section's mix."""
    return shapes_data(size, config.seed, config.flip, shapes_options(config).single_object_fraction)


def _covering_order(items: list[tuple], rng: np.random.Generator) -> list[tuple]:
    """`items` shuffled, greedily reordered so the first ones cover every attribute value soonest."""
    pending = [items[i] for i in rng.permutation(len(items))]
    seen, ordered = set(), []
    while pending:
        best = max(range(len(pending)), key=lambda k: len(set(enumerate(pending[k])) - seen))
        ordered.append(pending.pop(best))
        seen |= set(enumerate(ordered[-1]))
    return ordered


def evaluation_captions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n canonical captions tagged "single", "relation" or "held_out", deterministic per seed.

    About half single objects (every size, colour, shape and position appears once n >= ~20), 30%
    two-object relations, 20% held-out pairs (alone and in relations). Half state a background.
    """
    rng = np.random.default_rng(seed)
    n_relation, n_held_out = round(0.3 * n), round(0.2 * n)
    n_single = n - n_relation - n_held_out
    single = _covering_order([(z, c, s, p) for z in SIZES for c, s in TRAINING_PAIRS for p in POSITIONS], rng)
    held_single = _covering_order([(z, c, s, p) for z in SIZES for c, s in sorted(HELD_OUT)
                                   for p in POSITIONS], rng)

    def relation_meaning(i: int, first: tuple) -> Meaning:
        others = [pair for pair in TRAINING_PAIRS if pair[0] != first[0]]
        second = others[rng.integers(len(others))]
        pair = (second, first) if first in HELD_OUT and i % 2 else (first, second)
        return Meaning((pair[0] + (None,), pair[1] + (None,)), relation=list(RELATIONS)[i % 4])

    out = []
    for i in range(n_single):
        z, c, s, p = single[i % len(single)]
        out.append(("single", Meaning(((c, s, z),), position=p)))
    for i in range(n_relation):
        out.append(("relation", relation_meaning(i, TRAINING_PAIRS[rng.integers(len(TRAINING_PAIRS))])))
    for i in range(n_held_out):
        if i % 2 == 0:
            z, c, s, p = held_single[(i // 2) % len(held_single)]
            out.append(("held_out", Meaning(((c, s, z),), position=p)))
        else:
            out.append(("held_out", relation_meaning(i // 2, sorted(HELD_OUT)[(i // 2) % len(HELD_OUT)])))
    backgrounds = [None, None, None] + list(BACKGROUNDS)
    return [(category, format_caption(Meaning(m.objects, m.position, m.relation,
                                              backgrounds[rng.integers(len(backgrounds))])))
            for category, m in out]


def contact_sheet(seed: int = 0, n: int = 32, size: int = 64, columns: int = 8, zoom: int = 2) -> Image.Image:
    """Training examples 0..n-1 of stream `seed` with their captions, in a grid, to look at the data."""
    tile, lines = size * zoom, 5
    rows = math.ceil(n / columns)
    sheet = Image.new("RGB", (columns * (tile + 8), rows * (tile + 12 * lines + 8)), (215, 225, 240))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        _, caption, image = training_example(seed, i, size)
        x, y = (i % columns) * (tile + 8) + 4, (i // columns) * (tile + 12 * lines + 8) + 4
        sheet.paste(image.resize((tile, tile), Image.NEAREST), (x, y))
        text = "\n".join(textwrap.wrap(caption, width=max(8, tile // 6))[:lines])
        draw.multiline_text((x, y + tile + 2), text, fill=(0, 0, 0), spacing=1)
    return sheet
