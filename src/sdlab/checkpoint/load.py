"""Loading a model from a single-file checkpoint or a diffusers folder into sdlab's three networks.

    components = load_components("v1-5-pruned-emaonly.safetensors")
    components.unet, components.vae, components.text_encoder, components.config

A single file is read (memory-mapped), cleaned (EMA weights swapped in, training leftovers dropped),
detected (`detect.py`), completed by the ldm config YAML beside it if there is one (`ldm_yaml.py`:
heads, prediction, schedule, latent scale) and split by key prefix. A diffusers folder is read part
by part and renamed to the original layout (`convert.py`). Modules are then built on the meta device,
so no random weights are ever allocated, and receive the file's tensors with
`load_state_dict(strict=True, assign=True)`: the tensors become the parameters, with no second copy
unless a dtype cast or device move asks for one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ..config import ModelConfig, VAEConfig
from ..devices import default_dtype
from ..errors import CheckpointError
from ..models import build_text_encoder, build_unet, build_vae
from ..models.empty import empty_modules
from . import convert
from .detect import X4_SCALING_FACTOR, check_prediction, describe, detect_config, is_x4_upscaler, with_family_defaults
from .io import read_state_dict
from .keys import key_problems
from .ldm_yaml import apply_sidecar, read_sidecar
from .save import SHARED_PARTS_KEY
from .vae_file import VAEFile, apply_vae_file

StateDict = dict[str, torch.Tensor]

PARTS = ("unet", "vae", "text_encoder")
SD_SCALING_FACTOR = VAEConfig.scaling_factor


@dataclass
class Checkpoint:
    """A model's weights as original-layout state dicts (prefixes stripped), not yet in modules."""

    config: ModelConfig
    unet: StateDict
    vae: StateDict
    text_encoder: StateDict
    # ldm's top-level buffers as stored (betas, alphas_cumprod, ...): the schedule the model was trained with
    schedule_buffers: StateDict = field(default_factory=dict)
    ema: bool = False  # the UNet weights came from the file's EMA copy
    source: str = ""


@dataclass
class Components:
    """The three networks of one model, ready to run, and the config they were built from."""

    config: ModelConfig
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    schedule_buffers: StateDict = field(default_factory=dict)
    ema: bool = False
    source: str = ""
    vae_file: Optional[VAEFile] = None  # the VAE file that replaced the checkpoint's own VAE


def load_components(
    path: str | os.PathLike,
    prediction: Optional[str] = None,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    vae: Optional[str | os.PathLike] = None,
) -> Components:
    """Build UNet, VAE and text encoder from a `.safetensors`/`.ckpt` file or a diffusers folder.

    prediction: "epsilon" or "v", overriding the `.yaml` beside the file, what the file says, or SD's
    default for its family.
    dtype: None keeps fp32 files in fp32 and brings half-precision files to the device's compute
    dtype (fp32 on CPU); a dtype casts every floating-point weight to it.
    vae: a VAE file or folder whose weights replace the checkpoint's VAE (`vae_file.py`); the
    model's latent scale stays.
    """
    components = build_components(read_checkpoint(path, prediction), device, dtype)
    if vae is not None:
        components.vae_file = apply_vae_file(components.vae, vae)
    return components


def read_checkpoint(path: str | os.PathLike, prediction: Optional[str] = None) -> Checkpoint:
    """The weights and config of a single file or diffusers folder, without building modules."""
    check_prediction(prediction)
    path = Path(path)
    if path.is_dir():
        return _read_diffusers_folder(path, prediction)
    state_dict, metadata = read_state_dict(path)
    state_dict = _with_shared_parts(path, state_dict, metadata)
    state_dict, buffers, ema = clean_state_dict(state_dict)
    sidecar = read_sidecar(path)  # model.yaml beside model.safetensors, as the SD web UI reads it
    if sidecar is None:
        config = detect_config(state_dict, metadata, prediction, buffers)
    else:
        config = detect_config(state_dict, metadata, prediction or sidecar.prediction, buffers)
        config = apply_sidecar(config, sidecar, buffers, path.name)
    parts = convert.split_original(state_dict, config)
    return Checkpoint(config, parts["unet"], parts["vae"], parts["text_encoder"], buffers, ema, str(path))


def _with_shared_parts(path: Path, state_dict: dict, metadata: Optional[Mapping[str, str]]) -> dict:
    """A file written with `save_single_file(shared_parts=NAME)` holds only its UNet: its VAE and text
    encoder are those of the single file NAME beside it, added here under their original keys."""
    name = (metadata or {}).get(SHARED_PARTS_KEY)
    if name is None:
        return state_dict
    if os.path.basename(name) != name:
        raise CheckpointError(f"{path}: its {SHARED_PARTS_KEY} metadata must name a file in the same folder, got {name!r}")
    other = path.parent / name
    if not other.is_file():
        raise CheckpointError(f"{path.name} takes its VAE and text encoder from {name}, which is not in {path.parent}")
    shared, _ = read_state_dict(other)
    prefixes = (convert.VAE_PREFIX, *convert.TEXT_PREFIXES.values())
    merged = {key: value for key, value in shared.items() if key.startswith(prefixes)}
    merged.update(state_dict)
    return merged


def build_components(
    checkpoint: Checkpoint, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None
) -> Components:
    """Modules built on the meta device and given the checkpoint's tensors (which they then own)."""
    device = torch.device(device)
    config = checkpoint.config
    target = dtype or _default_target(checkpoint, device)
    builders = {
        "unet": (build_unet, config.unet, convert.UNET_PREFIX),
        "vae": (build_vae, config.vae, convert.VAE_PREFIX),
        "text_encoder": (build_text_encoder, config.text, convert.TEXT_PREFIXES[config.text.kind]),
    }
    modules = {}
    for part, (builder, part_config, prefix) in builders.items():
        state_dict = getattr(checkpoint, part)
        with empty_modules():
            module = builder(part_config)
        _check_keys(module, state_dict, prefix, config, checkpoint.source)
        for key, value in state_dict.items():
            state_dict[key] = value.to(device=device, dtype=target if value.is_floating_point() else value.dtype)
        module.load_state_dict(state_dict, strict=True, assign=True)
        left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise CheckpointError(f"{part}: {len(left)} tensors were not filled from the file, e.g. {left[:3]}")
        modules[part] = module.eval()
    return Components(config, modules["unet"], modules["vae"], modules["text_encoder"],
                      checkpoint.schedule_buffers, checkpoint.ema, checkpoint.source)


def _default_target(checkpoint: Checkpoint, device: torch.device) -> torch.dtype:
    counts: Counter = Counter()
    for part in PARTS:
        for tensor in getattr(checkpoint, part).values():
            if tensor.is_floating_point():
                counts[tensor.dtype] += tensor.numel()
    stored = counts.most_common(1)[0][0] if counts else torch.float32
    return torch.float32 if stored == torch.float32 else default_dtype(device)


def _check_keys(module: nn.Module, state_dict: Mapping, prefix: str, config: ModelConfig, source: str) -> None:
    """Raise one CheckpointError naming the missing and unexpected keys and the differing shapes."""
    problems = key_problems(module.state_dict(), state_dict, prefix)
    if problems:
        raise CheckpointError(
            f"{source or 'checkpoint'} does not fit the model detected from it ({describe(config)}): "
            + "; ".join(problems)
        )


# -- single files: EMA weights and training leftovers ------------------------------------------------------

EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
JUNK_PREFIXES = (
    "first_stage_model.loss.",  # the autoencoder's training losses (LPIPS, discriminator)
)
JUNK_SUFFIXES = (
    "embeddings.position_ids",  # CLIP's constant arange, saved by transformers < 4.31
)
SCHEDULE_PREFIXES = ("low_scale_model.",)  # x4 upscaler: the noise-augmentation schedule of the low-res image
CLIP_TEXT_PREFIX = convert.TEXT_PREFIXES["clip"]

# Module names of the UNet, longest first, to put the dots back into ldm's EMA keys.
_UNET_WORDS = sorted(
    """time_embed label_emb input_blocks middle_block output_blocks out in_layers emb_layers out_layers
    skip_connection op conv norm proj_in proj_out transformer_blocks attn1 attn2 to_q to_k to_v to_out
    ff net proj norm1 norm2 norm3 weight bias""".split(),
    key=len, reverse=True,
)
_EMA_TOKEN = re.compile("|".join(_UNET_WORDS) + r"|\d+")


def ema_key_to_unet_key(name: str) -> str:
    """`diffusion_modelinput_blocks11transformer_blocks0attn1to_qweight` -> `input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`.

    ldm's LitEma stores each UNet parameter under its name with the dots removed (buffer names may
    not contain dots). Module names are a closed vocabulary and only `input_blocks`/`output_blocks`
    are followed by two indices, the second a single digit (0-2), so the dots go back unambiguously.
    """
    body = name.removeprefix("diffusion_model")
    tokens, pos = [], 0
    while pos < len(body):
        match = _EMA_TOKEN.match(body, pos)
        if match is None:
            raise CheckpointError(f"cannot map the EMA key {EMA_PREFIX}{name} to a UNet parameter")
        token = match[0]
        if token.isdigit() and tokens and tokens[-1] in ("input_blocks", "output_blocks") and len(token) > 1:
            tokens += [token[:-1], token[-1]]
        else:
            tokens.append(token)
        pos = match.end()
    return ".".join(tokens)


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict, bool]:
    """(weights, schedule buffers, whether EMA weights replaced the UNet's) of a single-file state dict.

    EMA weights (`model_ema.*`) are preferred where present: they are what SD's authors sampled with.
    Dropped: the EMA counters, VAE training losses, CLIP's saved position_ids. Top-level keys without
    a dot (`betas`, `alphas_cumprod`, ...) are ldm's schedule buffers, returned separately.
    """
    weights: StateDict = {}
    buffers: StateDict = {}
    ema: StateDict = {}
    for key, value in state_dict.items():
        if key in EMA_COUNTERS or key.startswith(JUNK_PREFIXES) or key.endswith(JUNK_SUFFIXES):
            continue
        if key.startswith(EMA_PREFIX):
            ema[convert.UNET_PREFIX + ema_key_to_unet_key(key[len(EMA_PREFIX):])] = value
        elif "." not in key or key.startswith(SCHEDULE_PREFIXES):
            buffers[key] = value
        elif key.startswith(CLIP_TEXT_PREFIX) and not key.startswith(
                (CLIP_TEXT_PREFIX + "text_model.", CLIP_TEXT_PREFIX + "text_projection.")):
            # some SD1 merges saved CLIPTextTransformer itself, without the `text_model.` level
            weights[CLIP_TEXT_PREFIX + "text_model." + key[len(CLIP_TEXT_PREFIX):]] = value
        else:
            weights[key] = value
    weights.update(ema)
    return weights, buffers, bool(ema)


# -- diffusers folders ---------------------------------------------------------------------------------------


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / part / "config.json").is_file() for part in PARTS)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _read_diffusers_folder(folder: Path, prediction: Optional[str]) -> Checkpoint:
    missing = [f"{part}/config.json" for part in PARTS if not (folder / part / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is a directory but not a diffusers model folder: {', '.join(missing)} not found "
            "(expected unet/, vae/, text_encoder/ and scheduler/)"
        )
    configs = {part: _read_json(folder / part / "config.json") for part in PARTS}
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.is_file() else None
    config = convert.config_from_diffusers(configs["unet"], configs["vae"], configs["text_encoder"], scheduler)
    if is_x4_upscaler(config.unet, config.vae) and configs["vae"].get("scaling_factor") in (None, SD_SCALING_FACTOR):
        # early x4-upscaler folders leave SD's 0.18215 in the VAE config; diffusers' upscale pipeline
        # overrides it with the model's 0.08333, and so do we
        config = config.replace(vae=dataclasses.replace(config.vae, scaling_factor=X4_SCALING_FACTOR))
    if prediction is not None:
        config = config.replace(prediction=prediction)
    config = config.replace(name=with_family_defaults(config, config.prediction).name)
    weights = {}
    for part in PARTS:
        names = convert.DIFFUSERS_WEIGHT_FILES[part]
        found = next((folder / part / name for name in names if (folder / part / name).is_file()), None)
        if found is None:
            raise CheckpointError(f"{folder / part} has no weights ({' or '.join(names[::2])})")
        weights[part], _ = read_state_dict(found)
    return Checkpoint(
        config,
        convert.unet_from_diffusers(weights["unet"], config.unet),
        convert.vae_from_diffusers(weights["vae"], config.vae),
        convert.text_from_diffusers(weights["text_encoder"], config.text),
        source=str(folder),
    )
