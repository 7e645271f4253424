"""SHA-256 of model files, as the SD web UI prints them in its infotext ("Model hash", "VAE hash").

The web UI's short hash is the first 10 hex digits of the file's SHA-256 (its modules/hashes.py,
used by sd_models.py and sd_vae.py alike). Hashing a 2-4 GB checkpoint takes
seconds, so digests are cached in ~/.cache/sdlab/hashes.json under path, size and mtime: a file
rewritten in place gets a new entry, a file left alone is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

CACHE_FILE = os.path.join(os.path.expanduser("~"), ".cache", "sdlab", "hashes.json")
SHORT_HASH_DIGITS = 10  # the web UI's "Model hash" and "VAE hash"
_BLOCK = 1 << 22


def file_sha256(path: str | os.PathLike) -> str:
    """The full hex SHA-256 of a file, from the cache when its size and mtime are unchanged."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{int(stat.st_mtime)}"
    cache = _read_cache()
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(_BLOCK), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        _write_cache(cache)
    return cache[key]


def short_hash(path: str | os.PathLike) -> Optional[str]:
    """The web UI's short hash of a file (10 hex digits of its SHA-256); None for a folder or a missing file."""
    if not os.path.isfile(path):
        return None
    return file_sha256(path)[:SHORT_HASH_DIGITS]


def _read_cache() -> dict[str, str]:
    try:
        with open(CACHE_FILE) as file:
            cache = json.load(file)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict[str, str]) -> None:
    try:
        os.makedirs(os.path.dirname(CACHE_FILE), exist_ok=True)
        temporary = f"{CACHE_FILE}.{os.getpid()}.tmp"
        with open(temporary, "w") as file:
            json.dump(cache, file)
        os.replace(temporary, CACHE_FILE)
    except OSError:
        pass  # a read-only home only costs hashing again next time
