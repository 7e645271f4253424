"""`sdlab eval shapes`: generate a fixed, seeded set of `shapes` captions and judge the images from pixels.

Each caption is tagged single / relation / held_out (sdlab.shapes.dataset.evaluation_captions); with
`paraphrase` every caption is also asked a second time in other words (synonyms, reordered phrases,
relations stated the other way round) and scored as its own group. The images are checked by
sdlab.shapes.check, which reads only pixels.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from ..config import DEFAULT_SAMPLER
from .dataset import evaluation_captions, paraphrase, parse_caption, scene_from_caption
from .check import check, summarize

GROUPS = ("single", "relation", "held_out", "paraphrased")
ATTRIBUTES = ("count", "colour", "shape", "size", "position", "relation", "background", "all")


@dataclass
class Judged:
    group: str
    caption: str
    seed: int
    result: dict[str, bool]
    image: Image.Image = field(repr=False)


def paraphrased(captions: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """The same meanings in other words, one paraphrase per caption, deterministic per seed."""
    rng = np.random.default_rng(seed + 10_000)
    out = []
    for _, caption in captions:
        scene = scene_from_caption(caption, rng)
        out.append(("paraphrased", paraphrase(scene, rng, with_background=parse_caption(caption).background is not None)))
    return out


def evaluate(pipe, n: int = 100, seed: int = 0, *, steps: int = 20, guidance_scale: float = 5.0,
             sampler: str = DEFAULT_SAMPLER, batch_size: int = 16, with_paraphrases: bool = True,
             progress: Optional[Callable[[int], None]] = None, width: Optional[int] = None,
             height: Optional[int] = None, hires: Optional[dict] = None,
             self_attention_scale: float = 1.0) -> list[Judged]:
    """Generate one image per evaluation caption and check it. Image i gets seed `seed + i` with the
    web UI's per-image noise, so any one of them is reproduced alone by
    `sdlab generate CAPTION --seed S --noise a1111-cpu` with the same steps, sampler and CFG (and
    --width/--height: unset, the model's resolution). `hires`: the hires fix's settings (hires_scale,
    hires_strength, ...; pipelines/hires.py): each image is the second pass's, judged at its larger size.
    `self_attention_scale`: as the pipelines take it (1: the network as trained)."""
    size = {key: value for key, value in (("width", width), ("height", height)) if value is not None}
    generate = pipe.txt2img if hires is None else functools.partial(pipe.hires_fix, **hires)
    tagged = evaluation_captions(n, seed)
    if with_paraphrases:
        tagged = tagged + paraphrased(tagged, seed)
    judged = []
    for start in range(0, len(tagged), batch_size):
        chunk = tagged[start:start + batch_size]
        prompts = [caption for _, caption in chunk]
        result = generate(prompts, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                          seed=seed + start, batch_size=len(chunk), noise="a1111-cpu",
                          self_attention_scale=self_attention_scale, **size)
        for i, ((group, caption), image) in enumerate(zip(chunk, result.images)):
            judged.append(Judged(group, caption, result.seeds[i], check(image, caption), image))
        if progress is not None:
            progress(len(chunk))
    return judged


def table(judged: list[Judged]) -> dict[str, dict[str, float]]:
    """{group: {attribute: pass rate}} over the captions of each group that ask for the attribute."""
    return {group: summarize([j.result for j in judged if j.group == group])
            for group in GROUPS if any(j.group == group for j in judged)}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% (z = 1.96) Wilson score interval of a pass rate of `successes` out of `n` (Wilson 1927):
    how far a rate measured on a few dozen captions may lie from the model's true rate."""
    if n < 1:
        raise ValueError("a pass rate needs at least one caption")
    rate, z2 = successes / n, z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def format_table(rates: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    """One row per attribute, one column per group; last, the 95% interval of "all" for the group's size."""
    groups = list(rates)
    header = f"{'attribute':<12}" + "".join(f"{g + f' ({counts[g]})':>18}" for g in groups)
    lines = [header, "-" * len(header)]
    for attribute in ATTRIBUTES:
        if not any(attribute in rates[g] for g in groups):
            continue
        cells = "".join(f"{rates[g][attribute] * 100:>17.1f}%" if attribute in rates[g] else f"{'-':>18}"
                        for g in groups)
        lines.append(f"{attribute:<12}{cells}")
    if all("all" in rates[g] for g in groups):
        intervals = [wilson_interval(round(rates[g]["all"] * counts[g]), counts[g]) for g in groups]
        lines.append(f"{'all, 95% CI':<12}" + "".join(f"{f'{low * 100:.0f}-{high * 100:.0f}%':>18}"
                                                       for low, high in intervals))
    return "\n".join(lines)


def contact_sheet(judged: list[Judged], columns: int = 10, zoom: int = 2) -> Image.Image:
    """Every image with its caption, a green frame when all attributes pass, red otherwise."""
    tile, tile_h = judged[0].image.width * zoom, judged[0].image.height * zoom
    label = 48
    rows = math.ceil(len(judged) / columns)
    sheet = Image.new("RGB", (columns * (tile + 8), rows * (tile_h + label + 8)), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    for i, j in enumerate(judged):
        x, y = (i % columns) * (tile + 8) + 4, (i // columns) * (tile_h + label + 8) + 4
        draw.rectangle((x - 3, y - 3, x + tile + 2, y + tile_h + 2), fill=(40, 160, 60) if j.result["all"] else (200, 40, 40))
        sheet.paste(j.image.resize((tile, tile_h), Image.NEAREST), (x, y))
        words, lines, line = j.caption.split(), [], ""
        for word in words:
            if len(line) + len(word) + 1 > tile // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((x, y + tile_h + 3), "\n".join(lines[:4]), fill=(0, 0, 0), spacing=1)
    return sheet


def write_report(judged: list[Judged], out_dir: str, settings: dict) -> None:
    """results.json (every caption, seed and verdict, plus the table) and sheet.png, written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    report = {"settings": settings, "table": table(judged),
              "images": [{"group": j.group, "caption": j.caption, "seed": j.seed, "result": j.result} for j in judged]}
    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    write_sheet(judged, out_dir)


def write_sheet(judged: list[Judged], out_dir: str) -> str:
    """OUT_DIR/sheet.png, the contact sheet of `judged`, written atomically; its path."""
    os.makedirs(out_dir, exist_ok=True)
    sheet = os.path.join(out_dir, "sheet.png")
    contact_sheet(judged).save(sheet + ".tmp.png")
    os.replace(sheet + ".tmp.png", sheet)
    return sheet
