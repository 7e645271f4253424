"""Reading tensors out of checkpoint files, safely and without a second copy.

Two containers hold Stable Diffusion weights:
- `.safetensors`: a JSON header (shapes, dtypes, byte offsets, a `__metadata__` dict of strings)
  followed by raw tensor bytes. `safe_open` memory-maps the file, so tensors are views of the page
  cache until written to. sdlab stores its `ModelConfig` JSON under the metadata key `sdlab_config`.
- `.ckpt` / `.pt` / `.pth` / `.bin`: a `torch.save` zip of pickles. Unpickling can run arbitrary
  code, so they are read with `weights_only=True`, which allows tensors and plain containers only.
  PyTorch Lightning (which trained SD 1.x/2.x) wraps the weights as `{"state_dict": {...},
  "global_step": ...}` and may add numpy scalars and a `ModelCheckpoint` class reference; those few
  harmless globals are allowed, everything else (e.g. `os.system`) is refused before it runs.
"""

from __future__ import annotations

import _codecs
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


class _LightningCallback:
    """Stands in for `pytorch_lightning`'s `ModelCheckpoint`, which old Lightning versions pickled as
    a dict key next to the weights (CompVis `sd-v1-*-full-ema.ckpt`). Only its name is needed."""


_SAFE_GLOBALS = [
    # numpy scalars and arrays (e.g. `best_model_score`), under the numpy 1.x and 2.x module names
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np._core.multiarray._reconstruct,
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    *[getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")],
    _codecs.encode,  # pickle protocol 2 stores the bytes of numpy scalars through it
    (_LightningCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a checkpoint file and its safetensors metadata ({} for pickles).

    A Lightning `{"state_dict": ...}` wrapper is unwrapped; non-tensor entries are left out.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file; pass a .safetensors/.ckpt file "
            "or a diffusers folder (with unet/, vae/, text_encoder/ and model_index.json)"
        )
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    raise CheckpointError(
        f"unknown checkpoint format '{suffix or path.name}' ({path}); sdlab reads {', '.join(SUFFIXES)}"
    )


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file, read from its header alone."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({_first_line(exc)})") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"cannot read {path}: truncated or corrupt safetensors file ({_first_line(exc)}); "
            "download or save it again"
        ) from exc
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    # mmap needs the zip container of torch >= 1.6; older files are read into memory
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(
                f"refusing to load {path}: its pickle would call {unsafe.group(1)} when opened, which could "
                "run code on this machine; only tensors are loaded. Use a .safetensors file of this model"
            ) from exc
        raise CheckpointError(f"cannot read {path}: corrupt, or not a PyTorch checkpoint") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt checkpoint ({_first_line(exc)})") from exc
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (expected a state dict, got {type(obj).__name__})")
    return tensors


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
