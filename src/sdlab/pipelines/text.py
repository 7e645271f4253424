"""The prompts as the UNet reads them: text embeddings for both halves of classifier-free guidance."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from ..prompts import encode_conditioning, encode_prompts
from .pipeline import Pipeline


@torch.no_grad()
def encode_text(pipe: Pipeline, prompts: list[str], negative_prompts: list[str], clip_skip: int = 1,
                steps: Optional[int] = None):
    """Text embeddings for prompts and negative prompts, padded to the same number of 77-token chunks.

    Without `steps`: tensors (B, 77*n, D). With `steps`: ScheduledConditioning pairs that follow the
    web UI's prompt-editing syntax (`[from:to:when]`, `[a|b]`) over that many denoising steps.
    """
    if clip_skip < 1 or clip_skip >= pipe.config.text.layers:
        raise InputError(f"clip skip must be between 1 and {pipe.config.text.layers - 1}, got {clip_skip}")
    if steps is not None:
        cond, uncond = encode_conditioning(pipe.text_encoder, prompts, negative_prompts, steps, clip_skip)
        return cond.to(pipe.dtype), uncond.to(pipe.dtype)
    embeddings = encode_prompts(pipe.text_encoder, list(negative_prompts) + list(prompts), clip_skip=clip_skip)
    uncond, cond = embeddings.chunk(2)
    return cond.to(pipe.dtype), uncond.to(pipe.dtype)  # (B, 77*n, D) each
