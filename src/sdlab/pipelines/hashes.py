"""The web UI's "Model hash" of a checkpoint file, cached so a large file is read once."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

_HASHES_FILE = os.path.join(os.path.expanduser("~"), ".cache", "sdlab", "hashes.json")


def model_hash(path: str) -> Optional[str]:
    """The web UI's 'Model hash': the first 10 hex digits of the file's SHA-256, cached by size+mtime."""
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{int(stat.st_mtime)}"
    try:
        with open(_HASHES_FILE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        try:
            os.makedirs(os.path.dirname(_HASHES_FILE), exist_ok=True)
            tmp = _HASHES_FILE + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, _HASHES_FILE)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return cache[key][:10]
