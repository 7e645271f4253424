"""LoRA file keys -> the sdlab weights they change.

LoRA files name layers by the module paths of diffusers' UNet2DConditionModel and transformers'
CLIPTextModel, whatever the base model's own layout:

    kohya / web UI:  lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                     lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight   (+ .alpha, .lora_mid)
    diffusers/PEFT:  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
                     text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight
                     (older: .lora.down.weight, .lora_linear_layer.up.weight, attn1.processor.to_q_lora.down.weight)

kohya writes the diffusers path with '.' replaced by '_', also for SD 2.x, whose text encoder it
trains as a transformers CLIPTextModel. sdlab keeps the original layout (ldm UNet, OpenCLIP for SD2),
so the table here is built from the model: every Linear/Conv2d's diffusers path comes from
checkpoint/convert.py's block tables. OpenCLIP packs q, k and v into one (3W, W) `in_proj_weight`;
a LoRA on q_proj/k_proj/v_proj changes rows [0, W), [W, 2W) or [2W, 3W) of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..checkpoint.convert import OPEN_CLIP_LAYER, _rename_key, unet_blocks
from ..errors import CheckpointError


@dataclass(frozen=True)
class Target:
    """A weight a LoRA layer changes: `component`'s module at `module`, its parameter `param`, all of it
    or rows [rows[0], rows[1]) of it."""

    component: str  # "unet" or "text_encoder"
    module: str
    param: str = "weight"
    rows: Optional[tuple[int, int]] = None


def unet_targets(unet: nn.Module) -> dict[str, Target]:
    """diffusers module path -> Target, for every Linear and Conv2d of an sdlab UNet."""
    blocks = unet_blocks(unet.config)
    targets = {}
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hit = _rename_key(f"{name}.weight", blocks)
            if hit is not None:
                targets[hit[0].removesuffix(".weight")] = Target("unet", name)
    return targets


def text_encoder_targets(text_encoder: nn.Module) -> dict[str, Target]:
    """transformers CLIPTextModel module path (with `text_model.`) -> Target."""
    config = text_encoder.config
    if config.kind == "clip":  # sdlab's CLIP keeps transformers' names
        return {name: Target("text_encoder", name) for name, module in text_encoder.named_modules()
                if isinstance(module, nn.Linear)}
    targets = {}
    width = config.width
    for layer in range(config.layers):
        hf, ours = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for i, name in enumerate("qkv"):
            targets[hf + f"self_attn.{name}_proj"] = Target(
                "text_encoder", ours + "attn", "in_proj_weight", (i * width, (i + 1) * width))
        for open_clip_name, hf_name in OPEN_CLIP_LAYER.items():
            if not open_clip_name.startswith("ln_"):
                targets[hf + hf_name] = Target("text_encoder", ours + open_clip_name)
    return targets


# -- parsing keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKey:
    """What one key of a LoRA file is: a part of the layer at a diffusers module path."""

    component: str  # "unet" or "text_encoder"
    path: str  # diffusers module path; the text encoder's starts with "text_model."
    part: str  # "down", "up", "mid" or "alpha"
    name: str  # the layer's name in the file, for messages


KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}
DIFFUSERS_PARTS = {
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}
# diffusers' attention-processor LoRAs: `attn1.processor.to_q_lora.down.weight` is attn1.to_q's
PROCESSOR_LAYERS = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text_encoder": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
}
# LyCORIS and other adapter types: key fragment -> what it is
UNSUPPORTED = {
    "hada_": "LyCORIS LoHa (Hadamard product)", "lokr_": "LyCORIS LoKr (Kronecker product)",
    "oft_": "OFT (orthogonal fine-tuning)", "dora_scale": "DoRA (weight-decomposed LoRA)",
    "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)", "w_norm": "LyCORIS norm-layer weights",
    "b_norm": "LyCORIS norm-layer weights", "diff": "a full weight difference", "on_input": "IA3",
    "lora_B.bias": "LoRA bias terms", "weight_decompose": "DoRA (weight-decomposed LoRA)",
}
SUPPORTED = ("kohya/LyCORIS LoRA and LoCon (lora_down, lora_up, optional lora_mid, alpha) and diffusers/PEFT "
             "LoRA (lora_A, lora_B)")
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
_OTHER_MODELS = {
    "lora_te1_": "SDXL (two text encoders)", "lora_te2_": "SDXL (two text encoders)",
    "text_encoder_2.": "SDXL (two text encoders)", "lora_transformer_": "a transformer model (SD3, Flux)",
    "transformer.": "a transformer model (SD3, Flux)", "lora_unet_double_blocks_": "Flux",
    "lora_unet_single_blocks_": "Flux",
}


def _unsupported(key: str) -> CheckpointError:
    part = key.partition(".")[2] if key.startswith("lora_") else key  # kohya: what follows the layer name
    for fragment, kind in UNSUPPORTED.items():
        if fragment in part:
            return CheckpointError(f"key '{key}' is {kind}, which sdlab does not apply; supported: {SUPPORTED}")
    return CheckpointError(f"key '{key}' is no LoRA part sdlab knows; supported: {SUPPORTED}")


def _other_model(key: str) -> Optional[CheckpointError]:
    for prefix, model in _OTHER_MODELS.items():
        if key.startswith(prefix):
            return CheckpointError(f"this LoRA is for {model} (key '{key}'); sdlab runs SD 1.x and 2.x models")
    return None


def parse_kohya_key(key: str, kohya_paths: dict[str, tuple[str, str]]) -> Optional[LayerKey]:
    """A kohya key as a LayerKey; None when its module is not in `kohya_paths` (kohya name -> (component,
    diffusers path)). Raises for adapter types sdlab does not apply and other model families."""
    other = _other_model(key)
    if other is not None:
        raise other
    name, _, part = key.partition(".")
    if part not in KOHYA_PARTS:
        raise _unsupported(key)
    hit = kohya_paths.get(name)
    return None if hit is None else LayerKey(hit[0], hit[1], KOHYA_PARTS[part], name)


_PROCESSOR_RE = re.compile(r"(?:\.processor)?\.(to_[qkv]_lora|to_out_lora)\.(down|up)\.weight$")


def parse_diffusers_key(key: str) -> LayerKey:
    """A diffusers/PEFT key as a LayerKey (its path may still be missing from the model)."""
    other = _other_model(key)
    if other is not None:
        raise other
    rest = key.removeprefix("base_model.model.")
    if rest.startswith("unet."):
        component, rest = "unet", rest[len("unet."):]
    elif rest.startswith("text_encoder."):
        component, rest = "text_encoder", rest[len("text_encoder."):]
    elif rest.startswith(_UNET_ROOTS):
        component = "unet"
    else:
        raise CheckpointError(f"key '{key}' names neither the UNet (unet., down_blocks., ...) nor the text encoder "
                              f"(text_encoder.); supported: {SUPPORTED}")
    processor = _PROCESSOR_RE.search(rest)
    if processor:
        path = rest[:processor.start()] + "." + PROCESSOR_LAYERS[component][processor.group(1)]
        part = processor.group(2)
    else:
        for suffix, part in DIFFUSERS_PARTS.items():
            if rest.endswith("." + suffix):
                path = rest[:-len(suffix) - 1]
                break
        else:
            raise _unsupported(key)
    if component == "text_encoder" and not path.startswith("text_model."):
        path = "text_model." + path  # transformers >= 5 module names lack the `text_model.` level
    return LayerKey(component, path, part, f"{component}.{path.removeprefix('text_model.')}")
