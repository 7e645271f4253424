"""A standalone VAE file in place of a model's own VAE: the SD web UI's `--vae` / "SD VAE" setting.

    info = apply_vae_file(components.vae, "vae-ft-mse-840000-ema-pruned.safetensors")
    info.infotext_fields()  # {"VAE hash": "...", "VAE": "vae-ft-mse-840000-ema-pruned.safetensors"}

Fine-tuned VAEs are shared in three layouts, all read here into the keys of sdlab's `AutoencoderKL`
(models/vae.py), which are the original ones:
- original (ldm) keys `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`: Stability's
  `vae-ft-mse-840000-ema-pruned.safetensors` and `.ckpt`. The `.ckpt` is the autoencoder's Lightning
  checkpoint (`{"state_dict": ...}`): beside the weights it keeps the training loss (`loss.*`: LPIPS,
  the patch discriminator, `loss.logvar`) and LitEma's counters `model_ema.decay` and
  `model_ema.num_updates`; "ema-pruned" means the EMA weights are the weights, their copies are gone.
- a whole model's `first_stage_model.*`: any SD 1.x/2.x single file, or a `.vae.pt` cut from one.
- diffusers' AutoencoderKL: a folder with `config.json` and `diffusion_pytorch_model.safetensors`
  (`stabilityai/sd-vae-ft-mse`), that weights file on its own, or a model folder's `vae/`.

Loading is strict: every key of the model's VAE must come from the file with its shape, and nothing
else may be left over. The model's latent scale (`scaling_factor`) stays: a fine-tuned VAE is a
drop-in replacement trained on the same latents, and the web UI keeps the checkpoint's scale too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from ..config import VAEConfig
from ..errors import CheckpointError
from ..hashes import short_hash
from . import convert
from .io import read_state_dict
from .keys import key_problems

StateDict = dict[str, torch.Tensor]

ORIGINAL, CHECKPOINT, DIFFUSERS = "original", "checkpoint", "diffusers"
# Training leftovers of an autoencoder checkpoint (see above); the web UI drops them too.
IGNORED_PREFIXES = ("loss.", "model_ema.")
DIFFUSERS_KEYS = ("encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks.", "decoder.mid_block.")
# SDXL's VAE has SD's shapes but its own latent space (diffusers' sdxl-vae config.json: scaling_factor 0.13025)
SDXL_SCALING_FACTOR = 0.13025


@dataclass(frozen=True)
class VAEFile:
    """Where a VAE came from: what the infotext names, and what the weights were read as."""

    path: str  # as given: a file, a diffusers VAE folder or a diffusers model folder
    weights: str  # the file the tensors were read from
    layout: str  # ORIGINAL, CHECKPOINT (a whole model's first_stage_model.*) or DIFFUSERS
    latent_channels: Optional[int]

    @property
    def name(self) -> str:
        """The web UI's infotext "VAE": the file name with its extension (a folder: the folder's name)."""
        return Path(self.path).name

    @property
    def hash(self) -> Optional[str]:
        """The web UI's infotext "VAE hash": 10 hex digits of the weights file's SHA-256."""
        return short_hash(self.weights)

    def infotext_fields(self) -> dict[str, Optional[str]]:
        """The web UI's two fields, in its order; they follow "Model hash" and "Model"."""
        return {"VAE hash": self.hash, "VAE": self.name}


def vae_hash(path: str | os.PathLike) -> Optional[str]:
    """The web UI's "VAE hash" of a VAE file or folder (the SHA-256 of its weights file, 10 hex digits)."""
    return short_hash(weights_path(Path(path)))


def apply_vae_file(vae: nn.Module, path: str | os.PathLike) -> VAEFile:
    """Replace the weights of a built `AutoencoderKL` with those of a VAE file; the module keeps its
    device, dtype and config (the model's `scaling_factor` included)."""
    state_dict, info = read_vae_file(path)
    check_vae_fits(vae, state_dict, info)
    current = vae.state_dict()
    state_dict = {key: value.to(device=current[key].device, dtype=current[key].dtype) for key, value in state_dict.items()}
    # assign: the file's tensors become the parameters; a cast or a move above is the only copy
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return info


def read_vae_file(path: str | os.PathLike) -> tuple[StateDict, VAEFile]:
    """The tensors of a VAE file or folder under sdlab's (the original) VAE keys, and where they came from.

    Raises CheckpointError for a missing or unreadable file, a file that holds no VAE (a UNet, a LoRA,
    a text encoder ...) and SDXL's VAE, whose latents SD 1.x/2.x models do not use.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE file not found: {path}")
    weights = weights_path(path)
    _check_diffusers_config(weights, path)
    tensors, _ = read_state_dict(weights)
    state_dict, layout = _vae_part(tensors, path)
    if layout == DIFFUSERS:
        try:
            state_dict = convert.vae_from_diffusers(state_dict, _block_counts(state_dict))
        except CheckpointError as exc:
            raise CheckpointError(f"{path} is not an SD VAE in the diffusers layout: {exc}") from exc
    info = VAEFile(str(path), str(weights), layout, latent_channels(state_dict))
    return state_dict, info


def check_vae_fits(vae: nn.Module, state_dict: Mapping[str, torch.Tensor], info: VAEFile) -> None:
    """Raise one CheckpointError unless `state_dict` loads strictly into `vae` (an AutoencoderKL)."""
    config: VAEConfig = vae.config
    if info.latent_channels is not None and info.latent_channels != config.z_channels:
        raise CheckpointError(
            f"{info.path}: this VAE has {info.latent_channels} latent channels, the model {config.z_channels}; "
            "it was made for another family of models (SD3 and Flux VAEs have 16): use a VAE made for this "
            "model's latents, e.g. one for Stable Diffusion 1.x/2.x"
        )
    problems = key_problems(vae.state_dict(), state_dict)
    if problems:
        raise CheckpointError(
            f"{info.path} does not fit this model's VAE (widths {config.ch}x{list(config.ch_mult)}, "
            f"num_res_blocks {config.num_res_blocks}, {config.z_channels} latent channels): " + "; ".join(problems)
        )


def latent_channels(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """The latent channels the decoder reads (its conv_in's inputs); None without a decoder."""
    for key, dim in (("decoder.conv_in.weight", 1), ("post_quant_conv.weight", 0)):
        tensor = state_dict.get(key)
        if tensor is not None and tensor.ndim == 4:
            return tensor.shape[dim]
    return None


def weights_path(path: Path) -> Path:
    """The weights file of a VAE file (itself), a diffusers VAE folder or a diffusers model folder (its vae/)."""
    if not path.is_dir():
        return path
    folder = path / "vae" if (path / "model_index.json").is_file() and (path / "vae").is_dir() else path
    names = convert.DIFFUSERS_WEIGHT_FILES["vae"]
    found = next((folder / name for name in names if (folder / name).is_file()), None)
    if found is None:
        raise CheckpointError(
            f"{path} is a folder without VAE weights: expected {' or '.join(names[::2])} (a diffusers VAE folder), "
            "or pass the VAE file itself"
        )
    return found


# -- which layout, and is it a VAE at all --------------------------------------------------------------------


def _check_diffusers_config(weights: Path, given: Path) -> None:
    """The config.json beside a diffusers weights file must describe an SD AutoencoderKL."""
    if weights.name not in convert.DIFFUSERS_WEIGHT_FILES["vae"]:
        return
    config_path = weights.parent / "config.json"
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config_path}: {exc}") from exc
    kind = config.get("_class_name", "AutoencoderKL")
    if kind != "AutoencoderKL":
        raise CheckpointError(f"{given} holds a diffusers {kind}, not a VAE (AutoencoderKL): pass a VAE folder or file")
    if config.get("scaling_factor") == SDXL_SCALING_FACTOR:
        raise CheckpointError(_SDXL_VAE.format(given))


_SDXL_VAE = "{} is SDXL's VAE (scaling_factor 0.13025): its latents are not those of SD 1.x/2.x models; use a VAE for SD 1.x/2.x"


def _vae_part(tensors: Mapping[str, torch.Tensor], path: Path) -> tuple[StateDict, str]:
    """The VAE tensors of a file (a whole model's `first_stage_model.*` prefix stripped, training
    leftovers dropped) and their layout; CheckpointError naming what the file is when it holds no VAE."""
    keys = list(tensors)
    if any(key.startswith("conditioner.embedders.") for key in keys):
        raise CheckpointError(_SDXL_VAE.format(path) + " (this is a whole SDXL checkpoint)")
    if any("lora" in key.lower() for key in keys):
        raise CheckpointError(f"{path} is a LoRA file, not a VAE: apply it to the model as a LoRA")
    if any(key.startswith(convert.VAE_PREFIX) for key in keys):
        prefix, layout = convert.VAE_PREFIX, CHECKPOINT
    else:
        prefix, layout = "", ORIGINAL
    state_dict = {
        key[len(prefix):]: value for key, value in tensors.items()
        if key.startswith(prefix) and not key[len(prefix):].startswith(IGNORED_PREFIXES)
    }
    if not any(key.startswith(("encoder.", "decoder.")) for key in state_dict):
        raise CheckpointError(f"{path} is not a VAE: {_what_it_holds(keys)}; a VAE file has encoder.* and decoder.* keys")
    if any(key.startswith(DIFFUSERS_KEYS) for key in state_dict):
        layout = DIFFUSERS
    return state_dict, layout


def _what_it_holds(keys: list[str]) -> str:
    if any(key.startswith(convert.UNET_PREFIX) for key in keys):
        return f"it holds a UNet ({convert.UNET_PREFIX}*) and no VAE ({convert.VAE_PREFIX}*)"
    if any(key.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for key in keys):
        return "it looks like a diffusers UNet"
    if any(key.startswith(("text_model.", "cond_stage_model.", "transformer.resblocks.")) for key in keys):
        return "it looks like a text encoder"
    return f"its keys start like {', '.join(keys[:3])}"


_BLOCK_INDEX = {
    "levels": re.compile(r"(?:encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\."),
    "encoder_resnets": re.compile(r"encoder\.down_blocks\.\d+\.resnets\.(\d+)\."),
    "decoder_resnets": re.compile(r"decoder\.up_blocks\.\d+\.resnets\.(\d+)\."),
}


def _block_counts(state_dict: Mapping[str, torch.Tensor]) -> VAEConfig:
    """A VAEConfig with the file's number of levels and of ResBlocks per level: all that the diffusers
    renaming table (`convert.vae_blocks`) reads. The decoder has one ResBlock more per level."""

    def count(name: str) -> int:
        indices = [int(m[1]) for key in state_dict if (m := _BLOCK_INDEX[name].match(key))]
        return max(indices) + 1 if indices else 0

    per_level = count("encoder_resnets") or max(count("decoder_resnets") - 1, 1)
    return VAEConfig(ch_mult=(1,) * count("levels"), num_res_blocks=per_level)
