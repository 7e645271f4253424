"""The web UI's settings (`GET/POST /sdapi/v1/options`) as this server keeps them.

Those that change what sdlab does are checked and used: the model (`sd_model_checkpoint`, a switch
that waits for the running job), `CLIP_stop_at_last_layers` (clip skip), `samples_format`, and how
live previews are made (`show_progress_every_n_steps`, `live_previews_enable`, `show_progress_type`).
Any other setting a client sends is stored and echoed back, so clients that save and restore
settings round-trip them.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import InputError

DEFAULTS: dict[str, Any] = {
    "sd_model_checkpoint": None,  # filled in from the loaded model
    "sd_checkpoint_hash": None,
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "samples_format": "png",
    "samples_save": True,
    "grid_save": False,
    "outdir_samples": "",
    "show_progress_every_n_steps": 10,
    "live_previews_enable": True,
    "show_progress_type": "Approx cheap",
    "eta_noise_seed_delta": 0,
    "randn_source": "CPU",
    "enable_pnginfo": True,
}
SAMPLE_FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
FULL_PREVIEW_TYPES = ("Full",)  # the web UI's "Full" decodes with the VAE; its approximations map to ours


def check_option(key: str, value: Any) -> Any:
    """`value` for `key` as stored, or InputError saying what the setting takes."""
    if key == "CLIP_stop_at_last_layers":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
            raise InputError(f"CLIP_stop_at_last_layers must be an integer from 1 to 12, got {value!r}")
    elif key == "samples_format":
        if str(value).lower() not in SAMPLE_FORMATS:
            raise InputError(f"samples_format must be png, jpg or webp, got {value!r}")
        value = SAMPLE_FORMATS[str(value).lower()]
    elif key == "show_progress_every_n_steps":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"show_progress_every_n_steps must be an integer, got {value!r}")
    elif key == "sd_model_checkpoint" and not isinstance(value, str):
        raise InputError(f"sd_model_checkpoint must be a model title from GET /sdapi/v1/sd-models, got {value!r}")
    return value


class WebUIOptions:
    """The stored settings; safe to read and write from any request."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values = dict(DEFAULTS)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._values)

    def get(self, key: str, default=None):
        with self._lock:
            return self._values.get(key, default)

    def update(self, values: dict) -> None:
        """Store every setting in `values` (checked first: none is stored if one is refused)."""
        checked = {key: check_option(key, value) for key, value in values.items()}
        with self._lock:
            self._values.update(checked)

    def preview(self) -> tuple[str, int]:
        """(preview mode, every N steps) for web UI jobs."""
        values = self.snapshot()
        if not values.get("live_previews_enable", True) or values.get("show_progress_every_n_steps", 10) <= 0:
            return "none", 1
        mode = "full" if values.get("show_progress_type") in FULL_PREVIEW_TYPES else "approx"
        return mode, int(values.get("show_progress_every_n_steps", 10))
