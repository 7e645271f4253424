"""The "see inside the model" jobs of the native API (issue #23): a picture made as txt2img makes it,
with one view of how it was made.

- trajectory: every `every`-th step's latents and predicted clean image (inside/trajectory.py), as
  frames and a grid; the last frame is the finished picture;
- attention: where each word of the prompt was read, averaged over steps and layers
  (inside/attention_maps.py), one heat map over the picture per word;
- edit: prompt-to-prompt (inside/prompt_to_prompt.py): the picture redrawn, and its edit for a target
  prompt that keeps the source's cross-attention for the first `cross_steps` of the steps.

They run on the job queue like every other job (progress, previews, cancel); `run_inside` is called
by the engine on the worker thread and returns the pipeline's result with the view, its images
already base64 PNGs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..errors import InputError
from .images import encode_png_base64
from .native_models import JobRequest

if TYPE_CHECKING:
    import torch
    from PIL import Image

# The views' modules import torch; they are imported where used, so the server answers before torch
# has loaded (test_server_cli.test_serve_answers_before_torch_is_imported).

INSIDE_KINDS = ("trajectory", "attention", "edit")
MAP_TILE = 256  # the side of each word's heat map: a 64 px picture's map is still readable
SHEET_TILE = 128


def inside_options(request: JobRequest) -> Optional[dict]:
    """The view's own settings of a native request, checked; None for the other kinds. Settings of a
    view given to another kind are refused, as the other kinds' settings are."""
    from ..inside.attention_maps import prompt_words

    kind = request.kind
    given = {name for name in ("every", "words", "target_prompt", "cross_steps", "self_steps", "reweight", "refine")
             if getattr(request, name) not in (None, {}, False)}
    own = {"trajectory": {"every"}, "attention": {"words"},
           "edit": {"target_prompt", "cross_steps", "self_steps", "reweight", "refine"}}.get(kind, set())
    if given - own:
        raise InputError(f"{', '.join(sorted(given - own))} "
                         f"{'is a setting' if len(given - own) == 1 else 'are settings'} of another job kind "
                         f"(every: trajectory; words: attention; target_prompt, cross_steps, self_steps, reweight, "
                         f"refine: edit); leave {'it' if len(given - own) == 1 else 'them'} out of {kind}")
    if kind not in INSIDE_KINDS:
        return None
    if request.batch_size != 1:
        raise InputError(f"{kind} shows the inside of one picture; leave batch_size at 1")
    if kind == "trajectory":
        return {"every": request.every or 5}
    if kind == "attention":
        words = prompt_words(request.prompt, request.steps)
        if not words:
            raise InputError("attention maps need a prompt with words to map")
        return {"words": chosen_words(request.prompt, words, request.words)}
    return edit_options(request)


def chosen_words(prompt: str, tokens: list[str], words: Optional[list[str]]) -> list[tuple[str, list[int]]]:
    """Each map's label and the token indices (0 = the prompt's first token) it sums: every token of
    the prompt, or the `words` asked for, each a word of the prompt."""
    from ..inside.attention_maps import word_positions
    from ..inside.prompt_to_prompt import prompt_tokens

    if words is None:
        return [(token, [i]) for i, token in enumerate(tokens)]
    words = [word.strip() for word in words if word.strip()]
    if not words:
        raise InputError("words takes words of the prompt, e.g. [\"red\", \"circle\"]; leave it out for every word")
    ids = prompt_tokens(prompt)
    return [(word, [position - 1 for position in word_positions(word, ids, "words")]) for word in words]


def edit_options(request: JobRequest) -> dict:
    from ..inside.prompt_to_prompt import EditOptions, build_edit
    from ..samplers import resolve_sampler

    if request.target_prompt is None or not request.target_prompt.strip():
        raise InputError("edit needs target_prompt: the prompt to edit the picture into, e.g. the prompt "
                         "with one word changed")
    if resolve_sampler(request.sampler).stochastic:
        raise InputError(f"the sampler {request.sampler} draws fresh noise every step, so an edit cannot redraw "
                         "the picture: make the picture and its edit with a deterministic sampler such as Euler, "
                         "DPM++ 2M or DDIM")
    options = {"target": request.target_prompt, "reweight": dict(request.reweight or {}),
               "refine": bool(request.refine)}
    for name, default in (("cross_steps", 0.8), ("self_steps", 0.4)):
        value = getattr(request, name)
        options[name] = default if value is None else value
    build_edit(request.prompt, EditOptions(**options), 1, request.steps)  # the words checked before the job waits
    return options


def run_inside(pipe, work, settings: dict) -> tuple:
    """Run `work` (a job of an INSIDE_KINDS kind) with the pipeline `settings` (its step callback
    included); returns (the pipeline's result, the view for the job's answer)."""
    import torch

    views = {"trajectory": _trajectory, "attention": _attention, "edit": _edit}
    if work.kind in views:
        with torch.no_grad():
            return views[work.kind](pipe, work, settings)
    raise InputError(f"'{work.kind}' is not a view of the inside; choose one of {', '.join(INSIDE_KINDS)}")


def _trajectory(pipe, work, settings: dict) -> tuple:
    from ..inside.trajectory import Trajectory, trajectory_grid

    every = work.inside["every"]
    recorder = Trajectory(every, then=settings["callback"])
    result = pipe.txt2img(work.prompt, work.negative_prompt, **dict(settings, callback=recorder))
    frames = recorder.frames(pipe, result)
    view = {"every": every, "grid": encode_png_base64(trajectory_grid(frames)),
            "frames": [{"step": frame.step, "total": frame.total, "sigma": frame.sigma,
                        "noisy": encode_png_base64(frame.noisy), "denoised": encode_png_base64(frame.denoised)}
                       for frame in frames]}
    return result, {"trajectory": view}


def _attention(pipe, work, settings: dict) -> tuple:
    import torch

    from ..inside.attention_maps import StepMaps, attention_sheet
    from ..models.attention import attention_hooks

    words = work.inside["words"]
    count = max(i for _, group in words for i in group) + 1
    steps = settings.get("steps", 20)
    recorder = StepMaps(batch_size=1, count=count, steps=range(steps))
    callback = settings["callback"]

    def step(info: dict) -> None:
        recorder.advance(info)
        callback(info)

    with attention_hooks(pipe.unet, recorder):
        result = pipe.txt2img(work.prompt, work.negative_prompt, **dict(settings, callback=step))
    mean = recorder.mean()  # (count, 64, 64)
    maps = torch.stack([mean[group].sum(0) for _, group in words])
    labels = [word for word, _ in words]
    image = result.images[0]
    view = {"sheet": encode_png_base64(attention_sheet(image, maps, labels, tile=SHEET_TILE, overlay=True)),
            "words": [{"word": word, "map": encode_png_base64(word_overlay(image, word_map, word))}
                      for word, word_map in zip(labels, maps)]}
    return result, {"attention": view}


def word_overlay(image: Image.Image, word_map: torch.Tensor, word: str) -> Image.Image:
    """One word's heat map over a faded copy of the picture, at the picture's aspect: the map tile of
    a one-word attention sheet (its layout: a 4 px margin, the picture's tile, then the word's)."""
    from PIL import Image

    from ..inside.attention_maps import attention_sheet

    sheet = attention_sheet(image, word_map[None], [word], tile=MAP_TILE, overlay=True)
    left = 4 + MAP_TILE + 4
    tile = sheet.crop((left, 4, left + MAP_TILE, 4 + MAP_TILE))
    scale = MAP_TILE / max(image.size)
    return tile.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def _edit(pipe, work, settings: dict) -> tuple:
    options = work.inside
    result = pipe.edit(work.prompt, options["target"], work.negative_prompt, cross_steps=options["cross_steps"],
                       self_steps=options["self_steps"], reweight=options["reweight"], refine=options["refine"],
                       **settings)
    source, edited = result.images[0], result.images[-1]
    view = {"source_prompt": work.prompt, "target_prompt": options["target"], "cross_steps": options["cross_steps"],
            "self_steps": options["self_steps"], "source": encode_png_base64(source),
            "edit": encode_png_base64(edited)}
    return result, {"edit": view}
