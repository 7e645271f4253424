"""Each image's generation parameters in the web UI's words: the fields of its `parameters` text."""

from __future__ import annotations

from .. import __version__
from .pipeline import Pipeline

# The web UI's "RNG" (its randn source) of the noise modes that draw its numbers. "per-image" draws the
# CPU source's initial and step noise (and besides samples the VAE posterior with the image's generator,
# which the web UI leaves to an unseeded one), so it is written "RNG: CPU" for the web UI and
# "Noise: per-image" for sdlab; a reader takes "Noise" when there is one, else "RNG".
_RNG_NAMES = {"per-image": "CPU", "a1111-cpu": "CPU", "a1111-gpu": "NV"}
_WEB_UI_MODES = ("a1111-cpu", "a1111-gpu")


def generation_params(pipe: Pipeline, *, steps, sampler, guidance_scale, seed, width, height, noise,
                      schedule_type="Automatic", clip_skip=1, batch_size=1, batch_pos=0, tiling=False,
                      subseed=None, subseed_strength=0, seed_resize_from=None, extra=None) -> dict:
    """The web UI's field names and order (1.9+: the sampler and its schedule type apart, as
    samplers.sampler_and_schedule_names gives them); sdlab-only fields come after them. The variation
    fields are written as the web UI writes them: only with a strength, "Seed resize from" as WIDTHxHEIGHT."""
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
        "Variation seed": subseed if subseed_strength else None,
        "Variation seed strength": subseed_strength if subseed_strength else None,
        "Seed resize from": f"{seed_resize_from[0]}x{seed_resize_from[1]}" if seed_resize_from else None,
        "Clip skip": clip_skip if clip_skip != 1 else None,
        "Batch size": batch_size if batch_size > 1 else None,
        "Batch pos": batch_pos if batch_size > 1 else None,
        "RNG": _RNG_NAMES.get(noise),
        "Tiling": "True" if tiling else None,
        "Noise": noise if noise not in _WEB_UI_MODES else None,
        "Prediction": pipe.config.prediction if pipe.config.prediction != "epsilon" else None,
    }
    params.update(extra or {})
    params["Version"] = f"sdlab {__version__}"
    return params
