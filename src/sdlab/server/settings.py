"""What `sdlab serve` is told on its command line, as one frozen value the app factory builds from."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

from ..errors import InputError

MEGABYTE = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    models_dir: Optional[str] = None  # checkpoints by name; Lora/, embeddings/, VAE/ inside it
    model: Optional[str] = None  # the model loaded first: a file, a name in models_dir; None: the bundled one
    api_auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty: no authentication
    max_size: int = 2048  # px, either side of a generated image
    max_batch: int = 8
    max_steps: int = 150
    max_n_iter: int = 16  # batches per request (the web UI's "Batch count")
    max_cfg: float = 30.0
    max_body_bytes: int = 64 * MEGABYTE  # a request body larger than this is refused with 413
    max_image_pixels: int = 4096 * 4096  # an uploaded image larger than this is refused before decoding
    cors_allow_origins: tuple[str, ...] = ()  # none: browsers on other origins cannot read our answers
    outputs_dir: str = "outputs"  # where save_images writes, as the CLI does
    device: Optional[str] = None
    dtype: Optional[str] = None
    lowvram: bool = False  # each network on the device only while it works (pipelines/lowvram.py)
    prepack: bool = False  # every job's UNet on weights packed once for oneDNN (models/prepack.py; CPU fp32)
    load_model_at_start: bool = True  # False: the first job loads it (tests that never generate)
    finished_jobs_kept: int = 200  # finished jobs whose results GET /api/v1/jobs/{id} still returns


def parse_api_auth(text: Optional[str]) -> tuple[tuple[str, str], ...]:
    """`user:pass[,user2:pass2]` (the web UI's --api-auth) -> ((user, pass), ...)."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise InputError(f"--api-auth takes user:password pairs separated by commas, got '{item.strip()}'")
        pairs.append((user, password))
    return tuple(pairs)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
