"""Which networks a run starts from, and what its single file holds besides the part it trains.

One rule for every trainer, so each result is a complete Stable Diffusion file the pipelines load:
- the trained part's config comes from the recipe's `model` (preset name, ModelConfig JSON, or a
  table of changes to --base's config); unset, from --base; with neither, from the sd1 preset;
- its weights start from scratch (seeded by the recipe's seed), or from --base's with `init_from_base`;
- every other part, config and weights, is --base's; without --base it is freshly initialised from
  the model config (random weights, seeded), so the file still has SD's layout;
- `unet` needs --base: the UNet learns in the latent space of a trained VAE, conditioned by a trained
  text encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import SD1, ModelConfig
from ..errors import ConfigError
from ..models import build_text_encoder, build_unet, build_vae
from .config import TrainConfig, resolve_model_config

PARTS = ("unet", "vae", "text_encoder")
# the ModelConfig fields that belong to each part: a recipe's model config replaces these in --base's
PART_FIELDS = {"unet": ("unet", "schedule", "prediction", "resolution", "name"), "vae": ("vae",), "text_encoder": ("text",)}
BUILDERS = {"unet": (build_unet, "unet"), "vae": (build_vae, "vae"), "text_encoder": (build_text_encoder, "text")}


def base_config(config: TrainConfig) -> Optional[ModelConfig]:
    """--base's model config (read from the file, no modules built), or None without --base."""
    if config.base is None:
        return None
    from ..checkpoint.load import read_checkpoint

    return read_checkpoint(config.base).config


def model_config(config: TrainConfig, part: str, base: Optional[ModelConfig]) -> ModelConfig:
    """The whole model's config for a run training `part`, by the rule above; `base`: --base's config."""
    recipe = resolve_model_config(config.model, over=base or SD1)
    if base is None:
        if part == "unet":
            raise ConfigError("`sdlab train unet` needs --base: a checkpoint holding the trained VAE and text encoder "
                              "(e.g. the last.safetensors of `sdlab train text` run with --base from `sdlab train vae`)")
        result = recipe or SD1
    else:
        result = base if recipe is None else base.replace(**{k: getattr(recipe, k) for k in PART_FIELDS[part]})
    check_model_config(result)
    return result


def check_model_config(config: ModelConfig) -> None:
    if config.unet.context_dim != config.text.width:
        raise ConfigError(f"the UNet's context_dim {config.unet.context_dim} must equal the text encoder's width "
                          f"{config.text.width}: cross-attention reads the text embeddings")
    if config.unet.out_channels != config.vae.z_channels:
        raise ConfigError(f"the UNet's out_channels {config.unet.out_channels} must equal the VAE's z_channels "
                          f"{config.vae.z_channels}: it predicts noise in the VAE's latent space")


def build_part(part: str, model: ModelConfig, seed: int) -> nn.Module:
    """A freshly initialised part, the same for a given seed whatever ran before (global RNG untouched)."""
    builder, section = BUILDERS[part]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(getattr(model, section))


def base_part(config: TrainConfig, part: str) -> nn.Module:
    """--base's `part` with its weights, in fp32."""
    from ..checkpoint.load import load_components

    if config.base is None:
        raise ConfigError(f"init_from_base needs --base, the checkpoint whose {part} to start from")
    return getattr(load_components(config.base, dtype=torch.float32), part)


def starting_part(config: TrainConfig, part: str, model: ModelConfig, base: Optional[nn.Module] = None) -> nn.Module:
    """The trained part as the run starts: seeded fresh weights, or --base's with init_from_base
    (`base`: that part, when the caller has loaded it already).

    Tensors --base lacks (e.g. the text projection a contrastive run adds) keep their fresh values."""
    module = build_part(part, model, config.seed)
    if not config.init_from_base:
        return module
    base = (base if base is not None else base_part(config, part)).state_dict()
    own = module.state_dict()
    unexpected = sorted(set(base) - set(own))
    differ = sorted(k for k in set(base) & set(own) if base[k].shape != own[k].shape)
    if unexpected or differ:
        raise ConfigError(f"init_from_base: --base's {part} does not fit the recipe's model config "
                          f"(unexpected: {unexpected[:3]}, other shapes: {differ[:3]}); leave `model` unset "
                          "to fine-tune --base as it is")
    module.load_state_dict(base, strict=False)
    return module


def save_model(out_dir: Path, model: ModelConfig, config: TrainConfig, trained: dict[str, nn.Module],
               name: str = "last.safetensors") -> Path:
    """OUT/last.safetensors: the trained parts, the others from --base or fresh (see the module doc)."""
    from ..checkpoint.load import load_components
    from ..checkpoint.save import save_single_file

    parts: dict[str, Optional[nn.Module]] = dict.fromkeys(PARTS)
    parts.update(trained)
    missing = [part for part in PARTS if parts[part] is None]
    if missing and config.base is not None:
        base = load_components(config.base, dtype=torch.float32)
        for part in missing:
            parts[part] = getattr(base, part)
    for part in missing:
        if parts[part] is None:
            parts[part] = build_part(part, model, config.seed)
    recipe = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return save_single_file(Path(out_dir) / name, model, parts["unet"], parts["vae"], parts["text_encoder"],
                            extra_metadata={"sdlab_training": recipe})
