"""LoRA file keys -> the sdlab weights they change, with every shape checked before anything is applied.

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

import json
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
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
MAX_LISTED = 5  # problems named in one error message
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


# -- matching a file to a model --------------------------------------------------------------------------


@dataclass
class LoraLayer:
    name: str  # as the file names it
    target: Target
    down: torch.Tensor
    up: torch.Tensor
    mid: Optional[torch.Tensor]
    scale: float  # alpha / rank


def _peft_scale(metadata: dict, key: LayerKey, rank: int) -> Optional[float]:
    """lora_alpha / rank from diffusers' `lora_adapter_metadata` (PEFT LoraConfig fields per component)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"lora_adapter_metadata is not JSON ({exc})") from exc
    prefix = f"{key.component}."
    alpha = config.get(prefix + "lora_alpha")
    for pattern, value in (config.get(prefix + "alpha_pattern") or {}).items():
        path = key.path.removeprefix("text_model.") if not pattern.startswith("text_model.") else key.path
        if path == pattern or path.endswith("." + pattern):
            alpha = value
    if alpha is None:
        return None
    return alpha / (math.sqrt(rank) if config.get(prefix + "use_rslora") else rank)


def _check_shapes(layer_name: str, weight_shape: tuple, is_conv: bool, down, up, mid) -> Optional[str]:
    """Why down/up/mid do not fit a weight of `weight_shape`, or None."""
    out_features, in_features, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    rank = down.shape[0]
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        return f"{layer_name}: unexpected shapes down {tuple(down.shape)}, up {tuple(up.shape)}"
    inner = mid.shape[0] if mid is not None else rank
    if up.shape[1] != inner:
        before = "mid" if mid is not None else "down"
        return f"{layer_name}: up {tuple(up.shape)} does not follow {before} (rank {inner})"
    if up.shape[0] != out_features or down.shape[1] != in_features:
        return (f"{layer_name}: the LoRA maps {down.shape[1]} -> {up.shape[0]} features, this model's layer "
                f"{in_features} -> {out_features} (a LoRA for another model family, e.g. SD 1.x on SD 2.x)")
    down_kernel = tuple(down.shape[2:]) if down.ndim == 4 else (1, 1)
    if mid is not None:
        if mid.ndim != 4 or mid.shape[1] != rank or down_kernel != (1, 1) or not is_conv:
            return f"{layer_name}: lora_mid {tuple(mid.shape)} does not fit down {tuple(down.shape)} on this layer"
        down_kernel = tuple(mid.shape[2:])
    if is_conv and down_kernel != kernel:
        return f"{layer_name}: the LoRA's kernel is {down_kernel}, this model's layer has {kernel}"
    if not is_conv and down_kernel != (1, 1):
        return f"{layer_name}: a {down_kernel} convolution LoRA on a linear layer"
    return None


def match_layers(tensors: dict, metadata: dict, unet: nn.Module, text_encoder: nn.Module,
                 where: str) -> list[LoraLayer]:
    """Every layer of a LoRA file's `tensors` with its target weight in this UNet/text encoder, checked.

    Raises CheckpointError naming the problems (unknown layers, wrong shapes, other adapter types or
    model families) when anything does not fit; `where` names the file in messages.
    """
    targets = {("unet", path): t for path, t in unet_targets(unet).items()}
    targets.update({("text_encoder", path): t for path, t in text_encoder_targets(text_encoder).items()})
    kohya_paths = {f"lora_{'unet' if c == 'unet' else 'te'}_{path.replace('.', '_')}": (c, path)
                   for c, path in targets}
    # some converters write the UNet's original (ldm) names, lora_unet_input_blocks_1_1_proj_in; the web UI reads both
    kohya_paths.update({f"lora_unet_{t.module.replace('.', '_')}": (c, path)
                        for (c, path), t in targets.items() if c == "unet"})
    groups: dict[tuple[str, str], dict] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        try:
            parsed = parse_kohya_key(key, kohya_paths) if key.startswith("lora_") else parse_diffusers_key(key)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        if parsed is None or (parsed.component, parsed.path) not in targets:
            unknown.append(key.partition(".")[0] if key.startswith("lora_") else key)
            continue
        group = groups.setdefault((parsed.component, parsed.path), {"name": parsed.name})
        group[parsed.part] = tensor
    problems = []
    if unknown:
        names = list(dict.fromkeys(unknown))
        problems.append(f"{len(names)} layers name modules this model does not have, e.g. {', '.join(names[:3])} "
                        "(is it a LoRA for another architecture, such as SDXL?)")
    layers = []
    modules = {"unet": unet, "text_encoder": text_encoder}
    for (component, path), group in groups.items():
        target = targets[(component, path)]
        name = group["name"]
        if "down" not in group or "up" not in group:
            missing = "down" if "down" not in group else "up"
            problems.append(f"{name}: has no {missing} weight")
            continue
        module = modules[component].get_submodule(target.module)
        weight = getattr(module, target.param)
        shape = tuple(weight.shape) if target.rows is None else (target.rows[1] - target.rows[0], weight.shape[1])
        down, up, mid = group["down"], group["up"], group.get("mid")
        problem = _check_shapes(name, shape, isinstance(module, nn.Conv2d), down, up, mid)
        if problem:
            problems.append(problem)
            continue
        rank = down.shape[0]
        if "alpha" in group:
            scale = float(group["alpha"]) / rank
        else:
            peft = _peft_scale(metadata, LayerKey(component, path, "alpha", name), rank)
            scale = 1.0 if peft is None else peft
        layers.append(LoraLayer(name, target, down, up, mid, scale))
    if not layers and not problems:
        problems.append("it holds no LoRA layers")
    if problems:
        listed = "; ".join(problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise CheckpointError(f"{where} does not fit this model, nothing was applied: {listed}{more}")
    return layers
