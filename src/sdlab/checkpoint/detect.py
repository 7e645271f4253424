"""Which model a single-file checkpoint holds, read from its key names and tensor shapes.

Every number of an SD 1.x/2.x `ModelConfig` that changes a weight's shape can be read back from the
tensors (conv_in's width is model_channels, the count of `input_blocks` gives the levels, ...). What
shapes cannot tell comes from SD's own rules: SD1 (OpenAI CLIP text encoder) uses 8 attention heads
at every level, SD2 (OpenCLIP) 64 channels per head; SD2 defaults to v-prediction at 768 px, which
the caller overrides for the 512 px epsilon models (`prediction="epsilon"`), because the
prediction target leaves no trace in the weights. A file sdlab wrote carries its exact config in
the safetensors metadata (`sdlab_config`); it is used after checking that it agrees with the shapes.
An ldm config YAML beside the file overrides both (`ldm_yaml.py`, applied by `load.read_checkpoint`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Mapping, Optional

import torch

from ..config import ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig, from_json
from ..errors import CheckpointError, ConfigError, InputError
from .convert import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX

PREDICTIONS = ("epsilon", "v")
METADATA_KEY = "sdlab_config"

# The SD x4 upscaler (Stability's configs/stable-diffusion/x4-upscaling.yaml) keeps its latent scale as a
# plain attribute, not a buffer, so its file does not say it; its training schedule is in `betas`.
X4_SCALING_FACTOR = 0.08333
X4_SCHEDULE = ScheduleConfig(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02)

# The fields each part's tensor shapes determine; the metadata config must agree on all of them.
SHAPE_FIELDS = {
    "unet": ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_levels",
             "transformer_depth", "context_dim", "use_linear_projection", "num_classes"),
    "vae": ("in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels"),
    "text": ("kind", "vocab_size", "context_length", "width", "layers", "projection_dim"),
}


class _Shapes:
    """Shape lookups under one key prefix; `None` for an absent key."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], prefix: str):
        self.state_dict, self.prefix = state_dict, prefix

    def __call__(self, key: str) -> Optional[tuple[int, ...]]:
        tensor = self.state_dict.get(self.prefix + key)
        return None if tensor is None else tuple(tensor.shape)

    def require(self, key: str) -> tuple[int, ...]:
        shape = self(key)
        if shape is None:
            raise CheckpointError(f"not a Stable Diffusion 1.x/2.x checkpoint: {self.prefix + key} is missing")
        return shape

    def count(self, pattern: str) -> int:
        """How many consecutive n = 0, 1, ... have the key `pattern.format(n)`."""
        n = 0
        while self(pattern.format(n)) is not None:
            n += 1
        return n


def detect_config(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Optional[Mapping[str, str]] = None,
    prediction: Optional[str] = None,
    schedule_buffers: Optional[Mapping[str, torch.Tensor]] = None,
) -> ModelConfig:
    """The ModelConfig of an original-layout state dict (full keys, EMA weights already in place).

    `prediction` ("epsilon" or "v") overrides the default and the metadata. `schedule_buffers` are
    ldm's top-level buffers (`betas`, `scale_factor`, ...) when the file has them. Raises
    CheckpointError for anything that is not an SD 1.x/2.x single file (SDXL, LoRA, diffusers parts,
    VAE-only ...).
    """
    buffers = schedule_buffers or {}
    check_prediction(prediction)
    _refuse_other_layouts(state_dict)
    kind = text_kind(state_dict)
    text = _text_config(state_dict, kind)
    unet = _unet_config(state_dict, kind)
    vae = _vae_config(state_dict, buffers.get("scale_factor"))
    upscaler = is_x4_upscaler(unet, vae)
    if upscaler and buffers.get("scale_factor") is None:
        vae = replace(vae, scaling_factor=X4_SCALING_FACTOR)
    detected = ModelConfig(
        unet=unet,
        vae=vae,
        text=text,
        schedule=schedule_from_betas(buffers.get("betas")) or (X4_SCHEDULE if upscaler else ScheduleConfig()),
    )
    if metadata and METADATA_KEY in metadata:
        config = _from_metadata(metadata[METADATA_KEY], detected)
        return config if prediction is None else config.replace(prediction=prediction)
    return with_family_defaults(detected, prediction)


def is_x4_upscaler(unet: UNetConfig, vae: VAEConfig) -> bool:
    """The x4 upscaler's shapes: a noise-level class embedding (label_emb), the 3-channel low-resolution
    image stacked onto the latents (7 input channels), and a 3-level VAE (latents 1/4 of the image)."""
    return unet.num_classes is not None and unet.in_channels == vae.z_channels + 3 and len(vae.ch_mult) == 3


def check_prediction(prediction: Optional[str]) -> None:
    if prediction is not None and prediction not in PREDICTIONS:
        raise InputError(f"unknown prediction type '{prediction}': use epsilon or v")


def with_family_defaults(config: ModelConfig, prediction: Optional[str] = None) -> ModelConfig:
    """Prediction type, native resolution and name by SD's conventions for this architecture.

    SD1: epsilon, 512 px. SD2 text-to-image: v at 768 px (v2-0/v2-1 768), epsilon at 512 px for the
    base models; SD2 inpainting (9 input channels) and depth (5) models are epsilon at 512 px.
    """
    unet = config.unet
    if config.text.kind == "clip":
        prediction = prediction or "epsilon"
        resolution, name = 512, "sd1"
    else:
        if prediction is None:
            prediction = "epsilon" if unet.in_channels in (5, 9) else "v"
        plain = unet.in_channels == 4 and unet.num_classes is None
        resolution = 768 if prediction == "v" and plain else 512
        name = "sd2-v" if prediction == "v" else "sd2-base"
    if unet.num_classes is not None:
        name = "sd2-x4-upscaler"
    elif unet.in_channels == 9:
        name += "-inpainting"
    return config.replace(prediction=prediction, resolution=resolution, name=name)


def text_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    if TEXT_PREFIXES["clip"] + "text_model.embeddings.token_embedding.weight" in state_dict:
        return "clip"
    if TEXT_PREFIXES["open_clip"] + "token_embedding.weight" in state_dict:
        return "open_clip"
    raise CheckpointError(
        "not a Stable Diffusion 1.x/2.x checkpoint: no text encoder keys "
        f"({TEXT_PREFIXES['clip']}* for SD1's CLIP or {TEXT_PREFIXES['open_clip']}* for SD2's OpenCLIP)"
    )


def _refuse_other_layouts(state_dict: Mapping[str, torch.Tensor]) -> None:
    keys = list(state_dict)
    if any(key.startswith("conditioner.embedders.") for key in keys):
        raise CheckpointError(
            "this is an SDXL (or SD3-style) checkpoint with conditioner.embedders.* text encoders; "
            "sdlab loads Stable Diffusion 1.x/2.x"
        )
    if any("lora" in key.lower() for key in keys):
        raise CheckpointError("this is a LoRA file, not a model: load a base model and apply it as a LoRA adapter")
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        if any(key.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for key in keys):
            hint = "it looks like one part of a diffusers folder; pass the folder itself"
        elif any(key.startswith(("encoder.down.", VAE_PREFIX)) for key in keys):
            hint = "it looks like a VAE-only file"
        else:
            hint = f"its keys start like {', '.join(keys[:3])}"
        raise CheckpointError(f"not a Stable Diffusion 1.x/2.x checkpoint: no {UNET_PREFIX}* keys ({hint})")
    if not any(key.startswith(VAE_PREFIX) for key in keys):
        raise CheckpointError(f"not a complete Stable Diffusion checkpoint: no {VAE_PREFIX}* (VAE) keys")


def _unet_config(state_dict: Mapping[str, torch.Tensor], kind: str) -> UNetConfig:
    shape = _Shapes(state_dict, UNET_PREFIX)
    model_channels, in_channels = shape.require("input_blocks.0.0.weight")[:2]
    out_channels = shape.require("out.2.weight")[0]
    if shape("label_emb.0.0.weight") is not None:
        raise CheckpointError(
            "this UNet has a vector-conditioning label_emb (SDXL / SD2 unCLIP); sdlab loads SD 1.x/2.x text-to-image, "
            "inpainting and x4-upscaler UNets"
        )
    n_input = _count_blocks(state_dict, UNET_PREFIX + "input_blocks.")
    downsamples = [i for i in range(n_input) if shape(f"input_blocks.{i}.0.op.weight") is not None]
    per_level = (downsamples[0] - 1) if downsamples else n_input - 1
    levels, rest = divmod(n_input, per_level + 1)
    if per_level < 1 or rest:
        raise CheckpointError(f"UNet input_blocks ({n_input}) do not form SD levels of ResBlocks and downsamplers")
    first = [1 + level * (per_level + 1) for level in range(levels)]
    channel_mult = tuple(shape.require(f"input_blocks.{i}.0.out_layers.3.weight")[0] // model_channels for i in first)
    attention_levels = tuple(level for level, i in enumerate(first) if shape(f"input_blocks.{i}.1.norm.weight") is not None)
    middle = "middle_block.1."
    depth = shape.count(middle + "transformer_blocks.{}.attn1.to_q.weight")
    context_dim = shape.require(middle + "transformer_blocks.0.attn2.to_k.weight")[1]
    use_linear = len(shape.require(middle + "proj_in.weight")) == 2
    label = shape("label_emb.weight")
    disable_self = []
    for level, i in enumerate(first):
        attn1_k = shape(f"input_blocks.{i}.1.transformer_blocks.0.attn1.to_k.weight")
        width = model_channels * channel_mult[level]
        disable_self.append(attn1_k is not None and attn1_k[1] != width)
    if kind == "clip":
        heads = dict(num_heads=8, head_channels=None)  # ldm v1-inference.yaml: num_heads 8
    elif label is not None:
        heads = dict(num_heads=8, head_channels=None)  # x4-upscaling.yaml: num_heads 8
    else:
        heads = dict(num_heads=8, head_channels=64)  # v2-inference.yaml: num_head_channels 64
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=per_level,
        attention_levels=attention_levels,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_projection=use_linear,
        num_classes=None if label is None else label[0],
        disable_self_attention=tuple(disable_self) if any(disable_self) else (),
        **heads,
    )


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """1 + the largest N of keys `prefix + N.*`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m[1]) for key in state_dict if (m := pattern.match(key))]
    return max(indices) + 1 if indices else 0


def _vae_config(state_dict: Mapping[str, torch.Tensor], scale_factor: Optional[torch.Tensor]) -> VAEConfig:
    shape = _Shapes(state_dict, VAE_PREFIX)
    ch, in_channels = shape.require("encoder.conv_in.weight")[:2]
    levels = shape.count("encoder.down.{}.block.0.conv1.weight")
    per_level = shape.count("encoder.down.0.block.{}.conv1.weight")
    if levels == 0 or per_level == 0:
        raise CheckpointError(f"not a Stable Diffusion VAE: {VAE_PREFIX}encoder.down.0.block.0.* is missing")
    ch_mult = tuple(shape.require(f"encoder.down.{level}.block.0.conv1.weight")[0] // ch for level in range(levels))
    return VAEConfig(
        in_channels=in_channels,
        out_channels=shape.require("decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=per_level,
        z_channels=shape.require("post_quant_conv.weight")[0],
        # ldm keeps scale_factor as a buffer only when it was estimated from data (scale_by_std)
        scaling_factor=VAEConfig.scaling_factor if scale_factor is None else round(float(scale_factor), 5),
    )


def _text_config(state_dict: Mapping[str, torch.Tensor], kind: str) -> TextConfig:
    shape = _Shapes(state_dict, TEXT_PREFIXES[kind])
    if kind == "clip":
        vocab_size, width = shape.require("text_model.embeddings.token_embedding.weight")
        context_length = shape.require("text_model.embeddings.position_embedding.weight")[0]
        layers = shape.count("text_model.encoder.layers.{}.self_attn.q_proj.weight")
        projection = shape("text_projection.weight")
        # OpenAI CLIP ViT-L/14: 64-channel heads, quick_gelu, pads with the end token
        return TextConfig(kind="clip", vocab_size=vocab_size, context_length=context_length, width=width,
                          layers=layers, heads=max(1, width // 64),
                          projection_dim=None if projection is None else projection[0])
    vocab_size, width = shape.require("token_embedding.weight")
    context_length = shape.require("positional_embedding")[0]
    layers = shape.count("transformer.resblocks.{}.attn.in_proj_weight")
    projection = shape("text_projection")
    # OpenCLIP ViT-H/14 as SD2 uses it: 64-channel heads, exact GELU, penultimate layer, pads with 0
    return TextConfig(kind="open_clip", vocab_size=vocab_size, context_length=context_length, width=width,
                      layers=layers, heads=max(1, width // 64), activation="gelu", layer="penultimate", pad_token_id=0,
                      projection_dim=None if projection is None else projection[1])


def schedule_from_betas(betas: Optional[torch.Tensor]) -> Optional[ScheduleConfig]:
    """The training schedule from ldm's `betas` buffer when it is SD's scaled-linear one
    (sqrt(beta) linear in t, Rombach et al. 2022 app. E), else None (the family's default applies)."""
    if betas is None or betas.ndim != 1 or len(betas) < 2:
        return None
    betas = betas.double()
    roots = torch.linspace(betas[0].sqrt().item(), betas[-1].sqrt().item(), len(betas), dtype=torch.float64)
    if not torch.allclose(roots**2, betas, rtol=1e-2, atol=0):
        return None
    # 3 significant digits undo float32/float16 storage (0.00085 and 0.012 in every SD config)
    return ScheduleConfig(num_train_timesteps=len(betas), beta_start=float(f"{betas[0].item():.3g}"),
                          beta_end=float(f"{betas[-1].item():.3g}"))


def _from_metadata(text: str, detected: ModelConfig) -> ModelConfig:
    try:
        config = from_json(text)
    except ConfigError as exc:
        raise CheckpointError(f"the file's {METADATA_KEY} metadata is not a valid sdlab config: {exc}") from exc
    for part, names in SHAPE_FIELDS.items():
        stored, found = getattr(config, part), getattr(detected, part)
        for name in names:
            if getattr(stored, name) != getattr(found, name):
                raise CheckpointError(
                    f"the file's {METADATA_KEY} metadata disagrees with its tensors: {part}.{name} is "
                    f"{getattr(stored, name)!r} in the metadata but {getattr(found, name)!r} in the weights"
                )
    return config


def describe(config: ModelConfig) -> str:
    """One line naming what was detected, for logs and error messages."""
    unet, text = config.unet, config.text
    return (
        f"{config.name}: UNet {unet.model_channels}x{list(unet.channel_mult)} in={unet.in_channels}, "
        f"text {text.kind} {text.width}x{text.layers}, {config.prediction}-prediction, {config.resolution}px"
    )
