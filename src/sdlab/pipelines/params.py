"""Each image's generation parameters in the web UI's words: the fields of its `parameters` text."""

from __future__ import annotations

from .. import __version__
from .pipeline import Pipeline

_RNG_NAMES = {"a1111-cpu": "CPU", "a1111-gpu": "NV"}


def generation_params(pipe: Pipeline, *, steps, sampler, guidance_scale, seed, width, height, noise,
                      schedule_type="Automatic", clip_skip=1, batch_size=1, batch_pos=0, tiling=False,
                      extra=None) -> dict:
    """The web UI's field names and order (1.9+: the sampler and its schedule type apart, as
    samplers.sampler_and_schedule_names gives them); sdlab-only fields come after them."""
    params = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": guidance_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": pipe.model_hash,
        "Model": pipe.model_name,
        **(pipe.vae_file.infotext_fields() if pipe.vae_file is not None else {}),  # "VAE hash", "VAE"
        "Clip skip": clip_skip if clip_skip != 1 else None,
        "Batch size": batch_size if batch_size > 1 else None,
        "Batch pos": batch_pos if batch_size > 1 else None,
        "RNG": _RNG_NAMES.get(noise),
        "Tiling": "True" if tiling else None,
        "Noise": noise if noise not in _RNG_NAMES else None,
        "Prediction": pipe.config.prediction if pipe.config.prediction != "epsilon" else None,
    }
    params.update(extra or {})
    params["Version"] = f"sdlab {__version__}"
    return params
