"""The pipelines as methods of a loaded model: what `sdlab.load` returns.

pipeline.Pipeline knows no pipeline, so that every pipeline's file can take one; this subclass binds
the pipeline functions to it, and no module a pipeline imports imports this one.

    pipe = sdlab.load("v1-5-pruned-emaonly.safetensors")
    pipe.txt2img("a red circle", negative_prompt="blurry", steps=20, guidance_scale=7, seed=1)
"""

from __future__ import annotations

from ..inside.prompt_to_prompt import edit
from .hires import hires_fix
from .img2img import img2img
from .inpaint import inpaint
from .outpaint import outpaint
from .pipeline import Pipeline
from .txt2img import txt2img
from .upscale import upscale


class StableDiffusion(Pipeline):
    """A Pipeline with the pipelines as methods: `pipe.img2img(prompt, image, ...)` is
    img2img(pipe, prompt, image, ...); each takes the fields of options.GenerationOptions as keywords."""

    # each pipeline function, whose first argument is the pipeline, bound as a method
    txt2img = txt2img
    img2img = img2img
    inpaint = inpaint
    outpaint = outpaint
    hires_fix = hires_fix
    upscale = upscale
    edit = edit  # prompt-to-prompt (inside/prompt_to_prompt.py)
