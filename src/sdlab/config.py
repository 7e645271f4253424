"""Model families as frozen dataclasses of a few numbers.

Everything else (module trees, key prefixes, latent sizes) derives from these. Field names follow
the original CompVis/Stability configs (`model_channels`, `channel_mult`, ...) so a reader can hold
one of their YAML files next to this one. `to_dict`/`from_dict` give the JSON that sdlab writes into
a checkpoint's safetensors metadata, so narrower models in the SD layout load back exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting (latents + mask + masked-image latents), 7 for the x4 upscaler
    out_channels: int = 4
    model_channels: int = 320  # width of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels with spatial transformers (ldm: attention_resolutions 4,2,1)
    num_heads: int = 8  # SD1: a fixed 8 heads at every level ...
    head_channels: Optional[int] = None  # ... SD2: 64 channels per head instead (heads = width // 64)
    transformer_depth: int = 1
    context_dim: int = 768  # width of the text embeddings the cross-attention reads
    use_linear_projection: bool = False  # SD2: proj_in/proj_out are Linear, SD1: 1x1 Conv2d
    num_classes: Optional[int] = None  # x4 upscaler: noise-level class embedding (label_emb)
    disable_self_attention: tuple[bool, ...] = ()  # per level; x4 upscaler: cross-attention only at levels 0-2
    norm_groups: int = 32  # GroupNorm groups of every norm (SD: 32); each level's width must be a multiple

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) for a transformer of the given width, by SD's rules."""
        if self.head_channels is not None:
            return channels // self.head_channels, self.head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # latent factor = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    z_channels: int = 4  # latent channels
    scaling_factor: float = 0.18215  # latents are multiplied by this before the UNet sees them
    norm_groups: int = 32  # GroupNorm groups of every norm (SD: 32); ch * each ch_mult must be a multiple

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    kind: Literal["clip", "open_clip"] = "clip"  # key layout: HF CLIPTextModel (SD1) or OpenCLIP (SD2)
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"  # CLIP ViT-L/14: quick_gelu; OpenCLIP ViT-H/14: gelu
    layer: Literal["last", "penultimate"] = "last"  # SD2 conditions on the penultimate layer
    pad_token_id: int = 49407  # SD1 pads with the end token, SD2 (OpenCLIP) with 0
    projection_dim: Optional[int] = None  # text_projection for contrastive training (OpenCLIP keeps one)

# The sampler every command, pipeline and evaluation uses when none is named: the web UI's default.
DEFAULT_SAMPLER = "Euler a"
# Whose random numbers a seed gives (noise.py): here, so that the CLI names them without loading torch.
NOISE_MODES = ("per-image", "diffusers", "a1111-cpu", "a1111-gpu", "comfy")
DEFAULT_NOISE = "per-image"

# The largest image (width x height) sdlab makes unless told otherwise: 8192x8192, below Pillow's
# decompression-bomb limit (about 89.5 megapixels), so every image sdlab writes opens again (img2img).
# Here, not in memory.py, so that building the CLI's parser needs no torch.
DEFAULT_MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class ScheduleConfig:
    """The discrete DDPM noise schedule SD was trained with (`scaled_linear` betas)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012


@dataclass(frozen=True)
class ModelConfig:
    name: str = "sd1"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: Literal["epsilon", "v"] = "epsilon"
    resolution: int = 512  # native image side in pixels

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


SD1 = ModelConfig(name="sd1")

SD2_UNET = UNetConfig(num_heads=8, head_channels=64, context_dim=1024, use_linear_projection=True)
OPEN_CLIP_H = TextConfig(
    kind="open_clip", width=1024, layers=24, heads=16, activation="gelu", layer="penultimate",
    pad_token_id=0, projection_dim=1024,
)
SD2 = ModelConfig(name="sd2-v", unet=SD2_UNET, text=OPEN_CLIP_H, prediction="v", resolution=768)
SD2_BASE = ModelConfig(name="sd2-base", unet=SD2_UNET, text=OPEN_CLIP_H, prediction="epsilon", resolution=512)

PRESETS = {"sd1": SD1, "sd2-v": SD2, "sd2-base": SD2_BASE}


# -- JSON (safetensors metadata) ------------------------------------------------------------------

_SECTIONS = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig, "schedule": ScheduleConfig}


def to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def to_json(config: ModelConfig) -> str:
    return json.dumps(to_dict(config), sort_keys=True)


def _build(cls, values: dict):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        if isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def from_dict(values: dict) -> ModelConfig:
    values = dict(values)
    for key, cls in _SECTIONS.items():
        if key in values:
            values[key] = _build(cls, values[key])
    return _build(ModelConfig, values)


def from_json(text: str) -> ModelConfig:
    try:
        return from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"invalid model config JSON: {exc}") from exc
