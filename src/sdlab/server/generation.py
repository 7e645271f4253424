"""What both APIs check and build before a job is queued: the server's limits, the sampler and its
schedule type, the seed, and the options this sdlab may or may not have yet. A request that fails here is
answered at once (4xx) and never waits in the queue.
"""

from __future__ import annotations

import math
from typing import Optional

from ..errors import InputError
from .engine import engine_takes
from .settings import ServerSettings

# The web UI's request fields whose engine option may not exist in this sdlab yet (web UI name ->
# GenerationOptions field). Each is passed on only when GenerationOptions has the field.
WEBUI_TO_ENGINE = {
    "subseed": "subseed",
    "subseed_strength": "subseed_strength",
    "seed_resize_from_w": "seed_resize_from_w",
    "seed_resize_from_h": "seed_resize_from_h",
}


def check_limits(limits: ServerSettings, *, steps: int, batch_size: int, n_iter: int = 1, cfg: float = 7.0,
                 width: Optional[int] = None, height: Optional[int] = None) -> None:
    """Refuse work beyond the server's limits (its --max-* options), each with the limit named."""
    _check_int("steps", steps, 1, limits.max_steps, "--max-steps")
    _check_int("batch size", batch_size, 1, limits.max_batch, "--max-batch")
    _check_int("batch count (n_iter)", n_iter, 1, limits.max_n_iter, "the server's batch count limit")
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or not 0 <= cfg <= limits.max_cfg:
        raise InputError(f"CFG scale must be a number from 0 to {limits.max_cfg:g}, got {cfg!r}")
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            _check_int(name, value, 1, limits.max_size, "--max-size")


def check_number(name: str, value, low: float, high: float) -> float:
    """`value` as a float when it is a finite number from `low` to `high`; else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def check_output_size(limits: ServerSettings, width: int, height: int, what: str) -> None:
    if width > limits.max_size or height > limits.max_size:
        raise InputError(f"{what} would be {width}x{height}, more than this server's --max-size {limits.max_size} px "
                         "per side; ask for less")


def _check_int(name: str, value, low: int, high: int, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise InputError(f"{name} must be at least {low}, got {value}")
    if value > high:
        raise InputError(f"{name} {value} is more than this server allows ({high}, set by {flag})")


def sampler_settings(sampler: str, schedule: Optional[str], eta: Optional[float]) -> dict:
    """{"sampler", ["schedule_type"], ["eta"]} for a sampler name, a schedule type and eta.

    Unknown names raise (UnknownSamplerError names the samplers there are). A schedule type other than
    "Automatic" goes to the pipelines' schedule_type option for the samplers that take one. eta is passed
    only to samplers that take one: web UI clients send it whatever the sampler, and the web UI ignores
    it where it means nothing.
    """
    from ..samplers import resolve_sampler
    from ..schedules import resolve_schedule

    spec = resolve_sampler(sampler)
    settings = {"sampler": spec.name}
    kind = resolve_schedule(schedule) if schedule else None
    if kind is not None and kind.function is not None and spec.takes_schedule_types:
        settings["schedule_type"] = kind.key
    if eta is not None and spec.eta is not None:
        if not math.isfinite(eta) or eta < 0:
            raise InputError(f"eta must be 0 or more, got {eta!r}")
        settings["eta"] = float(eta)
    return settings


def request_seed(seed: Optional[int]) -> int:
    """The seed a job runs with: -1 or None picks a random one now, so the answer can report it."""
    from ..pipelines.seeds import check_seed, random_seed

    if seed is None or seed == -1:
        return random_seed()
    return check_seed(seed)


def variation_settings(subseed: Optional[int], subseed_strength: Optional[float],
                       resize_w: Optional[int], resize_h: Optional[int]) -> tuple[dict, Optional[int]]:
    """The variation-seed options for the engine (when it takes them) and the subseed to report.

    Asking for a variation (strength > 0) or a seed resize of an engine without them is an error,
    rather than an image that silently ignores them."""
    settings, reported = {}, None
    if subseed_strength:
        reported = request_seed(subseed)
        if not (engine_takes(WEBUI_TO_ENGINE["subseed"]) and engine_takes(WEBUI_TO_ENGINE["subseed_strength"])):
            raise InputError("variation seeds (subseed_strength > 0) are not available in this sdlab version; "
                             "send subseed_strength 0")
        settings[WEBUI_TO_ENGINE["subseed"]] = reported
        settings[WEBUI_TO_ENGINE["subseed_strength"]] = float(subseed_strength)
    if (resize_w or 0) > 0 and (resize_h or 0) > 0:
        if not engine_takes(WEBUI_TO_ENGINE["seed_resize_from_w"]):
            raise InputError("seed resize (seed_resize_from_w/h) is not available in this sdlab version; send -1")
        settings[WEBUI_TO_ENGINE["seed_resize_from_w"]] = resize_w
        settings[WEBUI_TO_ENGINE["seed_resize_from_h"]] = resize_h
    return settings, reported


def batches(n_iter: int) -> tuple[dict, int]:
    """(engine settings, batches the server runs): the server runs the n_iter batches itself, one after
    another, so that "skip" ends one batch and the next still runs, as in the web UI (the engine's own
    n_iter would end with the first)."""
    return {}, n_iter
