"""How well a model inpaints and upscales `shapes` scenes, judged from pixels (`sdlab eval inpaint|upscale`).

- erase: a two-object scene, one object under the mask, the prompt names only the other. Pass when
  exactly that other object is found afterwards and the masked area is background.
- insert: the same scene drawn without that object, the mask where it belongs, the prompt the full
  two-object caption. Two verdicts: "appears" when an object of the asked colour and shape has its
  centre inside the mask and the kept object is still found; "insert" (strict) when the checker
  finds both objects with the caption's relation and background.
- outpaint: a two-object scene side by side on a 96 x 64 canvas, the 64 px part holding one object
  given, the 32 px margin where the other belongs extended (left or right, alternating), the prompt the
  full caption. Verdicts as for insert: "appears" (an object of the asked colour and shape centred in
  the margin, the kept object still found) and "outpaint" (the checker finds the whole caption).
- upscale: a scene rendered at 128 px, shrunk to 32 px by area averaging, enlarged 4x by the model and
  by bicubic interpolation; PSNR of both against the 128 px render.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from ..config import DEFAULT_SAMPLER
from .dataset import BACKGROUNDS, POSITIONS, Meaning, Scene, canonical_caption, format_caption, render, sample_scene
from .check import analyse, check
from .evaluation import Judged

MASK_MARGIN = 0.06  # of the side, around the object's bounding box
BACKGROUND_TOLERANCE = 40  # mean |RGB difference| to the background colour inside the mask, 0-255


@dataclass
class EditCase:
    task: str  # "erase" | "insert"
    prompt: str
    image: Image.Image  # the input
    mask: Image.Image  # white = repaint
    kept: tuple[str, str]  # (colour, shape) of the object that stays
    edited: tuple[str, str]  # (colour, shape) of the object erased or to be inserted
    scene: Scene  # the two-object scene


def two_object_scene(rng: np.random.Generator) -> Scene:
    while True:
        scene = sample_scene(rng)
        if len(scene.objects) == 2:
            return scene


def object_mask(obj, size: int) -> Image.Image:
    """White over the object's bounding box grown by MASK_MARGIN."""
    half = obj.side / 2 + MASK_MARGIN
    x0, y0 = (obj.center[0] - half) * size, (obj.center[1] - half) * size
    x1, y1 = (obj.center[0] + half) * size, (obj.center[1] + half) * size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    inside = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    return Image.fromarray((inside * 255).astype(np.uint8), "L")


def single_object_caption(obj, background: str) -> str:
    """The canonical caption of `obj` alone: the nearest named position; objects of pairs are small."""
    position = min(POSITIONS, key=lambda p: math.dist(POSITIONS[p], obj.center))
    return format_caption(Meaning(((obj.colour, obj.shape, "small"),), position=position, background=background))


def edit_cases(n: int, seed: int = 0, size: int = 64) -> list[EditCase]:
    """n erase and n insert cases, deterministic per seed; which object is edited alternates."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        scene = two_object_scene(rng)
        edited, kept = (1, 0) if i % 2 == 0 else (0, 1)
        other = scene.objects[kept]
        mask = object_mask(scene.objects[edited], size)
        alone = dataclasses.replace(scene, objects=(other,), relation=None)
        target = scene.objects[edited]
        pairs = ((other.colour, other.shape), (target.colour, target.shape))
        cases.append(EditCase("erase", single_object_caption(other, scene.background), render(scene, size), mask,
                              *pairs, scene))
        cases.append(EditCase("insert", canonical_caption(scene, with_background=True), render(alone, size), mask,
                              *pairs, scene))
    return cases


def appears(case: EditCase, result: Image.Image) -> bool:
    """An insert case's object of the asked colour and shape is centred inside the mask, and the kept
    object is still there."""
    inside = np.asarray(case.mask) > 127
    side = inside.shape[0]

    def in_mask(obj) -> bool:
        row, column = (min(int(c * side), side - 1) for c in (obj.center[1], obj.center[0]))
        return bool(inside[row, column])

    return kept_and_placed(analyse(result).objects, case.kept, case.edited, in_mask)


def kept_and_placed(found, kept: tuple[str, str], placed: tuple[str, str], where) -> bool:
    """Among the checker's `found` objects, one of the `kept` (colour, shape), and one of the `placed`
    (colour, shape) whose centre satisfies `where(obj)`."""
    pairs = [(obj.colour, obj.shape) for obj in found]
    return kept in pairs and any((o.colour, o.shape) == placed and where(o) for o in found)


def judge_edit(case: EditCase, result: Image.Image) -> bool:
    if case.task == "insert":
        return check(result, case.prompt)["all"]
    found = analyse(result).objects
    if len(found) != 1 or (found[0].colour, found[0].shape) != case.kept:
        return False
    pixels = np.asarray(result.convert("RGB"), dtype=np.float64)
    inside = np.asarray(case.mask) > 127
    background = np.array(BACKGROUNDS[case.scene.background], dtype=np.float64)
    return float(np.abs(pixels[inside] - background).mean()) <= BACKGROUND_TOLERANCE


def evaluate_inpainting(pipe, n: int = 20, seed: int = 0, *, steps: int = 20, guidance_scale: float = 5.0,
                        sampler: str = DEFAULT_SAMPLER, progress=None,
                        judged: Optional[list[Judged]] = None) -> dict[str, float]:
    """Pass rates of the erase cases and of the insert cases, loose ("appears") and strict ("insert");
    strength 1: the masked area is fully repainted. `judged`, when given, receives every picture with
    its verdict ("all": erase, or the strict insert), for a contact sheet."""
    passed = {"erase": [], "appears": [], "insert": []}
    for i, case in enumerate(edit_cases(n, seed)):
        result = pipe.inpaint(case.prompt, case.image, case.mask, strength=1.0, mask_blur=0, steps=steps,
                              guidance_scale=guidance_scale, sampler=sampler, seed=seed + i, noise="a1111-cpu")
        verdict = judge_edit(case, result.images[0])
        passed[case.task].append(verdict)
        if case.task == "insert":
            passed["appears"].append(appears(case, result.images[0]))
        if judged is not None:
            judged.append(Judged(case.task, f"{case.task}: {case.prompt}", seed + i, {"all": verdict}, result.images[0]))
        if progress is not None:
            progress(1)
    return {task: float(np.mean(values)) for task, values in passed.items()}


OUTPAINT_CANVAS = (96, 64)  # the 64 px picture and a 32 px margin: the canvas `eval shapes --size 96x64` judges
OUTPAINT_OVERLAP = 8  # px of the picture repainted along the seam (outpaint's default)


@dataclass
class OutpaintCase:
    prompt: str  # the whole scene's caption
    image: Image.Image  # the 64 x 64 part holding the kept object
    side: str  # "left" | "right": where the margin grows
    kept: tuple[str, str]  # (colour, shape) already in the picture
    added: tuple[str, str]  # (colour, shape) the margin should get
    scene: Scene  # the whole 96 x 64 scene


def _x_extent(obj, canvas: tuple[int, int]) -> tuple[float, float]:
    half = obj.side * min(canvas) / 2
    return obj.center[0] * canvas[0] - half, obj.center[0] * canvas[0] + half


def outpaint_cases(n: int, seed: int = 0) -> list[OutpaintCase]:
    """n cases, deterministic per seed: side-by-side scenes where the object to be painted lies wholly in
    the margin and the kept one wholly outside the repainted seam; even cases grow the right side."""
    width, height = OUTPAINT_CANVAS
    margin = width - height
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        side = "right" if len(cases) % 2 == 0 else "left"
        scene = sample_scene(rng, single_object_fraction=0.0, aspect=width / height)
        if scene.relation not in ("to the left of", "to the right of"):
            continue
        left, right = sorted(scene.objects, key=lambda o: o.center[0])
        added, kept = (right, left) if side == "right" else (left, right)
        if side == "right":
            fits = _x_extent(added, OUTPAINT_CANVAS)[0] >= height and _x_extent(kept, OUTPAINT_CANVAS)[1] <= height - OUTPAINT_OVERLAP
            box = (0, 0, height, height)
        else:
            fits = _x_extent(added, OUTPAINT_CANVAS)[1] <= margin and _x_extent(kept, OUTPAINT_CANVAS)[0] >= margin + OUTPAINT_OVERLAP
            box = (margin, 0, width, height)
        if not fits:
            continue
        alone = dataclasses.replace(scene, objects=(kept,), relation=None)
        cases.append(OutpaintCase(canonical_caption(scene, with_background=True),
                                  render(alone, OUTPAINT_CANVAS).crop(box), side,
                                  (kept.colour, kept.shape), (added.colour, added.shape), scene))
    return cases


def judge_outpaint(case: OutpaintCase, result: Image.Image) -> dict[str, bool]:
    """"appears": an object of the added colour and shape centred in the margin, the kept one still
    found; "outpaint": the checker finds the whole caption (count, colours, shapes, relation, background)."""
    picture = result.height / result.width  # the given picture's share of the width

    def in_margin(obj) -> bool:
        return obj.center[0] >= picture if case.side == "right" else obj.center[0] < 1 - picture

    appears = kept_and_placed(analyse(result).objects, case.kept, case.added, in_margin)
    return {"appears": appears, "outpaint": check(result, case.prompt)["all"]}


def evaluate_outpainting(pipe, n: int = 20, seed: int = 0, *, steps: int = 20, guidance_scale: float = 5.0,
                         sampler: str = DEFAULT_SAMPLER, progress=None,
                         judged: Optional[list[Judged]] = None, self_attention_scale: float = 1.0) -> dict[str, float]:
    """Pass rates of the outpainting cases, loose ("appears") and strict ("outpaint"), with outpaint's
    own defaults (strength 0.8, an 8 px seam). `judged`, when given, receives every picture with its
    verdicts ("all": the strict one), for a contact sheet. `self_attention_scale` as the pipelines take it."""
    passed = {"appears": [], "outpaint": []}
    for i, case in enumerate(outpaint_cases(n, seed)):
        result = pipe.outpaint(case.prompt, case.image, extend={case.side: OUTPAINT_CANVAS[0] - OUTPAINT_CANVAS[1]},
                               overlap=OUTPAINT_OVERLAP, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                               seed=seed + i, noise="a1111-cpu", self_attention_scale=self_attention_scale)
        verdicts = judge_outpaint(case, result.images[0])
        for key, value in verdicts.items():
            passed[key].append(value)
        if judged is not None:
            judged.append(Judged("outpaint", case.prompt, seed + i, {**verdicts, "all": verdicts["outpaint"]},
                                 result.images[0]))
        if progress is not None:
            progress(1)
    return {key: float(np.mean(values)) for key, values in passed.items()}


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def evaluate_upscaling(pipe, n: int = 10, seed: int = 0, *, low: int = 32, steps: int = 20,
                       guidance_scale: float = 5.0, sampler: str = DEFAULT_SAMPLER, noise_level: int = 20,
                       progress=None) -> dict[str, float]:
    """PSNR (dB) against the 4x render of the model's upscale and of bicubic interpolation: mean and median."""
    rng = np.random.default_rng(seed)
    model_psnr, bicubic_psnr = [], []
    for i in range(n):
        scene = sample_scene(rng)
        truth = render(scene, 4 * low)
        small = truth.resize((low, low), Image.BOX)  # area averaging, as the trainer's low_resolution
        result = pipe.upscale(small, canonical_caption(scene, with_background=True), steps=steps,
                              guidance_scale=guidance_scale, sampler=sampler, seed=seed + i,
                              noise_level=noise_level, noise="a1111-cpu")
        model_psnr.append(psnr(result.images[0], truth))
        bicubic_psnr.append(psnr(small.resize(truth.size, Image.BICUBIC), truth))
        if progress is not None:
            progress(1)
    # the median beside the mean: one scene whose background comes out wrong costs a mean of 10 some 2 dB
    return {"model": float(np.mean(model_psnr)), "bicubic": float(np.mean(bicubic_psnr)),
            "model_median": float(np.median(model_psnr)), "bicubic_median": float(np.median(bicubic_psnr))}
