"""Writing a model as one original-layout `.safetensors` file that other SD tools load.

The keys are those of the CompVis/Stability single files (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*`), so A1111, ComfyUI and diffusers' `from_single_file`
read it; sdlab's exact `ModelConfig` rides along in the metadata (`sdlab_config`), so a model whose
numbers SD's rules cannot guess (e.g. other head counts) loads back exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig, to_json
from ..errors import CheckpointError
from .convert import UNET_PREFIX, join_original
from .detect import METADATA_KEY

SHARED_PARTS_KEY = "sdlab_shared_parts"
RESERVED_METADATA = ("format", METADATA_KEY, SHARED_PARTS_KEY)


def save_single_file(
    path: str | os.PathLike,
    config: ModelConfig,
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    dtype: Optional[torch.dtype] = None,
    extra_metadata: Optional[Mapping[str, str]] = None,
    shared_parts: Optional[str] = None,
) -> Path:
    """Write the three networks to `path` (.safetensors), floating-point weights cast to `dtype` if given.

    `shared_parts`: the name of a single file in the same folder whose VAE and text encoder this model
    uses as they are (as an inpainting or upscaling model of one family shares them, like the
    components of a diffusers folder): only the UNet is written, and the loader takes the other two
    parts from that file. `vae` and `text_encoder` must then be that file's.

    The file appears complete or not at all: it is written to `path + ".tmp"` beside it and renamed
    over `path` (atomic on POSIX and Windows), and the temporary file is removed on any error.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"cannot save {path}: sdlab writes .safetensors files; name it {path.stem}.safetensors")
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save {path}: the folder {path.parent} does not exist")
    metadata = {"format": "pt", METADATA_KEY: to_json(config)}
    if shared_parts is not None:
        if os.path.basename(shared_parts) != shared_parts or not shared_parts.endswith(".safetensors"):
            raise CheckpointError(f"shared_parts must be a .safetensors file name in the same folder, got {shared_parts!r}")
        metadata[SHARED_PARTS_KEY] = shared_parts
    for key, value in (extra_metadata or {}).items():
        if key in RESERVED_METADATA or not isinstance(key, str) or not isinstance(value, str):
            raise CheckpointError(
                f"extra metadata must map str to str and may not set {', '.join(RESERVED_METADATA)} (got {key!r})"
            )
        metadata[key] = value
    state = join_original(config, unet.state_dict(), vae.state_dict(), text_encoder.state_dict())
    if shared_parts is not None:
        state = {key: tensor for key, tensor in state.items() if key.startswith(UNET_PREFIX)}
    for key, tensor in state.items():
        if tensor.is_meta:
            raise CheckpointError(f"cannot save {path}: {key} has no data (a module left on the meta device)")
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.to("cpu").contiguous()
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise CheckpointError(f"cannot save {path}: {getattr(exc, 'strerror', None) or exc}") from exc
        raise
    return path
