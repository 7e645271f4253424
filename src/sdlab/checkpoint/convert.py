"""Conversion between the original single-file layout and diffusers folders: the one place for it.

sdlab's modules use the original CompVis/Stability key names, so a single `.safetensors`/`.ckpt`
loads by stripping a prefix. A diffusers folder stores the same tensors under other names:

    unet/diffusion_pytorch_model.safetensors   UNet2DConditionModel  (down_blocks/mid_block/up_blocks)
    vae/diffusion_pytorch_model.safetensors    AutoencoderKL         (mid-attention as Linear, not 1x1 conv)
    text_encoder/model.safetensors             transformers CLIPTextModel (SD2: OpenCLIP weights, q/k/v split)
    */config.json, scheduler/scheduler_config.json, model_index.json

Each network's renaming is a table from original block prefixes to diffusers block prefixes (plus a
few renames inside a block), built from the config and used in both directions. Only OpenCLIP's
fused attention projection needs more than renaming.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Optional

import torch

from ..config import ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig
from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]

# -- the original single-file layout ----------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"clip": "cond_stage_model.transformer.", "open_clip": "cond_stage_model.model."}


# The weights file of each part of a diffusers folder, in the order they are looked for (fp16 variants last).
DIFFUSERS_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}


def split_original(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, StateDict]:
    """{"unet", "vae", "text_encoder"} -> prefix-stripped state dicts; keys outside the three are left out."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIXES[config.text.kind]}
    parts: dict[str, StateDict] = {name: {} for name in prefixes}
    for key, value in state_dict.items():
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
    return parts


def join_original(config: ModelConfig, unet: Mapping, vae: Mapping, text_encoder: Mapping) -> StateDict:
    """The single-file state dict of three module state dicts (inverse of `split_original`)."""
    state: StateDict = {}
    for prefix, part in ((UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIXES[config.text.kind], text_encoder)):
        state.update({prefix + key: value for key, value in part.items()})
    return state


# -- block tables ------------------------------------------------------------------------------------

# Inside a block, the few names that differ. ldm ResBlock: in_layers = (GroupNorm, SiLU, Conv),
# emb_layers = (SiLU, Linear), out_layers = (GroupNorm, SiLU, Dropout, Conv).
UNET_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers < 0.14 named the VAE attention differently; such files are still on the Hub
VAE_ATTENTION_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _conv1x1_to_linear(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.flatten(1) if tensor.ndim == 4 else tensor


def _linear_to_conv1x1(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, :, None, None] if tensor.ndim == 2 else tensor


# original prefix -> (diffusers prefix, renames inside the block, tensor reshape original->diffusers)
Blocks = dict[str, tuple[str, dict[str, str], Optional[Callable]]]


def unet_blocks(config: UNetConfig) -> Blocks:
    """ldm `input_blocks`/`middle_block`/`output_blocks` <-> diffusers `down_blocks`/`mid_block`/`up_blocks`.

    input_blocks.0 is conv_in; each level then has `num_res_blocks` (ResBlock[, SpatialTransformer])
    followed, except at the last level, by a Downsample. output_blocks run the levels in reverse with
    one more ResBlock each, the last one of a level carrying the Upsample. diffusers numbers up_blocks
    from the deepest level.
    """
    levels, per_level = len(config.channel_mult), config.num_res_blocks
    blocks: Blocks = {
        "time_embed.0": ("time_embedding.linear_1", {}, None),
        "time_embed.2": ("time_embedding.linear_2", {}, None),
        "input_blocks.0.0": ("conv_in", {}, None),
        "middle_block.0": ("mid_block.resnets.0", UNET_RESNET, None),
        "middle_block.1": ("mid_block.attentions.0", {}, None),
        "middle_block.2": ("mid_block.resnets.1", UNET_RESNET, None),
        "out.0": ("conv_norm_out", {}, None),
        "out.2": ("conv_out", {}, None),
    }
    if config.num_classes is not None:
        blocks["label_emb"] = ("class_embedding", {}, None)
    index = 1
    for level in range(levels):
        for j in range(per_level):
            blocks[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", UNET_RESNET, None)
            if level in config.attention_levels:
                blocks[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", {}, None)
            index += 1
        if level < levels - 1:
            blocks[f"input_blocks.{index}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", {}, None)
            index += 1
    for i in range(levels * (per_level + 1)):
        up, j = divmod(i, per_level + 1)
        level = levels - 1 - up
        attention = level in config.attention_levels
        blocks[f"output_blocks.{i}.0"] = (f"up_blocks.{up}.resnets.{j}", UNET_RESNET, None)
        if attention:
            blocks[f"output_blocks.{i}.1"] = (f"up_blocks.{up}.attentions.{j}", {}, None)
        if j == per_level and level > 0:
            blocks[f"output_blocks.{i}.{2 if attention else 1}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", {}, None)
    return blocks


def vae_blocks(config: VAEConfig) -> Blocks:
    """ldm `encoder.down.L.block.J` / `decoder.up.L.block.J` <-> diffusers `down_blocks`/`up_blocks`
    (decoder levels reversed), and the mid-block attention's 1x1 convs <-> Linear layers."""
    levels = len(config.ch_mult)
    blocks: Blocks = {name: (name, {}, None) for name in ("quant_conv", "post_quant_conv")}
    for coder in ("encoder", "decoder"):
        blocks[f"{coder}.conv_in"] = (f"{coder}.conv_in", {}, None)
        blocks[f"{coder}.conv_out"] = (f"{coder}.conv_out", {}, None)
        blocks[f"{coder}.norm_out"] = (f"{coder}.conv_norm_out", {}, None)
        blocks[f"{coder}.mid.block_1"] = (f"{coder}.mid_block.resnets.0", VAE_RESNET, None)
        blocks[f"{coder}.mid.block_2"] = (f"{coder}.mid_block.resnets.1", VAE_RESNET, None)
        blocks[f"{coder}.mid.attn_1"] = (f"{coder}.mid_block.attentions.0", VAE_ATTENTION, _conv1x1_to_linear)
    for level in range(levels):
        for j in range(config.num_res_blocks):
            blocks[f"encoder.down.{level}.block.{j}"] = (f"encoder.down_blocks.{level}.resnets.{j}", VAE_RESNET, None)
        if level < levels - 1:
            blocks[f"encoder.down.{level}.downsample.conv"] = (f"encoder.down_blocks.{level}.downsamplers.0.conv", {}, None)
        up = levels - 1 - level
        for j in range(config.num_res_blocks + 1):
            blocks[f"decoder.up.{level}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", VAE_RESNET, None)
        if level > 0:
            blocks[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", {}, None)
    return blocks


def _inverse(blocks: Blocks) -> Blocks:
    inverse_reshape = {_conv1x1_to_linear: _linear_to_conv1x1, None: None}
    return {
        new: (old, {b: a for a, b in inner.items()}, inverse_reshape[reshape])
        for old, (new, inner, reshape) in blocks.items()
    }


def _rename_key(key: str, blocks: Blocks) -> Optional[tuple[str, Optional[Callable]]]:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        hit = blocks.get(".".join(parts[:n]))
        if hit is not None:
            new_prefix, inner, reshape = hit
            rest = ".".join(parts[n:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{new_prefix}.{rest}", reshape
    return None


def _rename(state_dict: Mapping[str, torch.Tensor], blocks: Blocks, what: str) -> StateDict:
    out: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        hit = _rename_key(key, blocks)
        if hit is None:
            unknown.append(key)
            continue
        new_key, reshape = hit
        out[new_key] = reshape(value) if reshape else value
    if unknown:
        raise CheckpointError(
            f"{what}: {len(unknown)} keys do not fit the detected architecture, e.g. {', '.join(unknown[:4])}"
        )
    return out


# -- per network --------------------------------------------------------------------------------------


def unet_to_diffusers(state_dict: Mapping, config: UNetConfig) -> StateDict:
    return _rename(state_dict, unet_blocks(config), "UNet (original -> diffusers)")


def unet_from_diffusers(state_dict: Mapping, config: UNetConfig) -> StateDict:
    return _rename(state_dict, _inverse(unet_blocks(config)), "UNet (diffusers -> original)")


def vae_to_diffusers(state_dict: Mapping, config: VAEConfig) -> StateDict:
    return _rename(state_dict, vae_blocks(config), "VAE (original -> diffusers)")


def vae_from_diffusers(state_dict: Mapping, config: VAEConfig) -> StateDict:
    renamed = {}
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        block, _, sub = prefix.rpartition(".")
        if ".mid_block.attentions." in key and sub in VAE_ATTENTION_LEGACY:
            key = f"{block}.{VAE_ATTENTION_LEGACY[sub]}.{name}"
        renamed[key] = value
    return _rename(renamed, _inverse(vae_blocks(config)), "VAE (diffusers -> original)")


# HF CLIPTextModel layer <-> OpenCLIP resblock, inside a layer
OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Not part of a CLIPTextModel: the contrastive head (SD never uses it) and a buffer some exports keep.
OPEN_CLIP_HEAD = ("text_projection", "logit_scale", "attn_mask")
CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature (Radford et al. 2021, sec. 2.5)
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


def diffusers_text_layers(config: TextConfig) -> int:
    """Layers a diffusers text_encoder keeps: SD2 folders drop OpenCLIP's last resblock, since SD2
    conditions on the penultimate layer's output (diffusers' stable-diffusion-2 has 23 of 24)."""
    if config.kind == "open_clip" and config.layer == "penultimate":
        return config.layers - 1
    return config.layers


def text_to_diffusers(state_dict: Mapping, config: TextConfig) -> StateDict:
    """sdlab/original text-encoder keys (prefix stripped) -> transformers CLIPTextModel `text_model.*` keys."""
    if config.kind == "clip":
        return {key: value for key, value in state_dict.items() if not key.endswith("position_ids")}
    keep = diffusers_text_layers(config)
    out: StateDict = {}
    for key, value in state_dict.items():
        if key in OPEN_CLIP_HEAD:
            continue
        match = _RESBLOCK.fullmatch(key)
        if match is None:
            if key not in OPEN_CLIP_TOP:
                raise CheckpointError(f"OpenCLIP text encoder: unexpected key {key}")
            out[OPEN_CLIP_TOP[key]] = value
            continue
        layer, rest = int(match[1]), match[2]
        if layer >= keep:
            continue
        hf = f"text_model.encoder.layers.{layer}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            # nn.MultiheadAttention stacks the q, k, v projections row-wise in one (3W, W) matrix
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[hf + f"self_attn.{name}_proj.{kind}"] = part
            continue
        module, _, param = rest.rpartition(".")
        if module not in OPEN_CLIP_LAYER:
            raise CheckpointError(f"OpenCLIP text encoder: unexpected key {key}")
        out[hf + f"{OPEN_CLIP_LAYER[module]}.{param}"] = value
    return out


def text_from_diffusers(state_dict: Mapping, config: TextConfig) -> StateDict:
    """transformers CLIPTextModel keys (with or without the `text_model.` level, which transformers
    >= 5.6 no longer writes) -> sdlab/original text-encoder keys."""
    hf = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        hf[key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key] = value
    if config.kind == "clip":
        return hf
    top = {new: old for old, new in OPEN_CLIP_TOP.items()}
    layer_names = {new: old for old, new in OPEN_CLIP_LAYER.items()}
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key in top:
            out[top[key]] = value
            continue
        match = _HF_LAYER.fullmatch(key)
        if match is None:
            raise CheckpointError(f"text encoder (diffusers -> OpenCLIP): unexpected key {key}")
        layer, rest = int(match[1]), match[2]
        module, _, param = rest.rpartition(".")
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, param), {})[module[-6]] = value
        elif module in layer_names:
            out[f"transformer.resblocks.{layer}.{layer_names[module]}.{param}"] = value
        else:
            raise CheckpointError(f"text encoder (diffusers -> OpenCLIP): unexpected key {key}")
    for (layer, param), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise CheckpointError(f"text encoder layer {layer}: q/k/v {param} incomplete ({''.join(sorted(parts))})")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    present = len({layer for layer, _ in qkv})
    reference = out["token_embedding.weight"]
    for layer in range(present, config.layers):
        # A diffusers SD2 text encoder lacks OpenCLIP's last resblock. SD2 reads the penultimate
        # layer, so the missing block never affects an image; zeros make the file complete.
        out.update(_zero_resblock(layer, config.width, reference))
    if config.projection_dim is not None:
        # CLIPTextModel carries no contrastive head; SD never uses it, zeros keep the layout whole.
        out["text_projection"] = reference.new_zeros(config.width, config.projection_dim)
        out["logit_scale"] = reference.new_tensor(CLIP_LOGIT_SCALE)
    return out


def _zero_resblock(layer: int, width: int, like: torch.Tensor) -> StateDict:
    shapes = {
        "ln_1.weight": (width,), "ln_1.bias": (width,),
        "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
        "ln_2.weight": (width,), "ln_2.bias": (width,),
        "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
        "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,),
    }
    return {f"transformer.resblocks.{layer}.{name}": like.new_zeros(shape) for name, shape in shapes.items()}


# -- whole model ----------------------------------------------------------------------------------------


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, StateDict]:
    """A single-file state dict -> {"unet", "vae", "text_encoder"} diffusers state dicts."""
    parts = split_original(state_dict, config)
    return {
        "unet": unet_to_diffusers(parts["unet"], config.unet),
        "vae": vae_to_diffusers(parts["vae"], config.vae),
        "text_encoder": text_to_diffusers(parts["text_encoder"], config.text),
    }


def diffusers_to_original(unet: Mapping, vae: Mapping, text_encoder: Mapping, config: ModelConfig) -> StateDict:
    """diffusers UNet, VAE and text-encoder state dicts -> one single-file state dict."""
    return join_original(
        config,
        unet_from_diffusers(unet, config.unet),
        vae_from_diffusers(vae, config.vae),
        text_from_diffusers(text_encoder, config.text),
    )


# -- configs ------------------------------------------------------------------------------------------------

PREDICTION_TO_DIFFUSERS = {"epsilon": "epsilon", "v": "v_prediction"}


def diffusers_configs(config: ModelConfig) -> dict[str, dict]:
    """The JSON configs of a diffusers folder for `config`, keyed by their path in the folder."""
    unet, vae, text = config.unet, config.vae, config.text
    widths = [unet.model_channels * m for m in unet.channel_mult]
    heads = [unet.heads_at(w)[0] for w in widths]
    attention = [level in unet.attention_levels for level in range(len(widths))]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    factor = vae.downsample_factor
    scheduler = "PNDMScheduler"
    pipeline = "StableDiffusionInpaintPipeline" if unet.in_channels == 9 else "StableDiffusionPipeline"
    return {
        "model_index.json": {
            "_class_name": pipeline,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", scheduler],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": config.resolution // factor,
            "in_channels": unet.in_channels,
            "out_channels": unet.out_channels,
            "down_block_types": down,
            "up_block_types": up,
            "block_out_channels": widths,
            "layers_per_block": unet.num_res_blocks,
            "cross_attention_dim": unet.context_dim,
            # diffusers' historical name: for SD this field holds the number of heads per level
            "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
            "transformer_layers_per_block": unet.transformer_depth,
            "use_linear_projection": unet.use_linear_projection,
            "num_class_embeds": unet.num_classes,
            "only_cross_attention": list(unet.disable_self_attention) if any(unet.disable_self_attention) else False,
            # SD 2.x v-models were trained with attention softmax in fp32 (diffusers' stable-diffusion-2)
            "upcast_attention": config.text.kind == "open_clip" and config.prediction == "v",
            "act_fn": "silu",
            "norm_num_groups": unet.norm_groups,
            "norm_eps": 1e-5,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
        },
        "vae/config.json": {
            "_class_name": "AutoencoderKL",
            "in_channels": vae.in_channels,
            "out_channels": vae.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(vae.ch_mult),
            "up_block_types": ["UpDecoderBlock2D"] * len(vae.ch_mult),
            "block_out_channels": [vae.ch * m for m in vae.ch_mult],
            "layers_per_block": vae.num_res_blocks,
            "latent_channels": vae.z_channels,
            "act_fn": "silu",
            "norm_num_groups": vae.norm_groups,
            "sample_size": config.resolution,
            "scaling_factor": vae.scaling_factor,
        },
        "text_encoder/config.json": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.context_length,
            "hidden_size": text.width,
            "intermediate_size": 4 * text.width,
            "num_hidden_layers": diffusers_text_layers(text),
            "num_attention_heads": text.heads,
            "hidden_act": text.activation,
            "layer_norm_eps": 1e-5,
            "projection_dim": text.projection_dim or text.width,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": text.pad_token_id,
        },
        "scheduler/scheduler_config.json": {
            "_class_name": scheduler,
            "num_train_timesteps": config.schedule.num_train_timesteps,
            "beta_start": config.schedule.beta_start,
            "beta_end": config.schedule.beta_end,
            "beta_schedule": "scaled_linear",
            "prediction_type": PREDICTION_TO_DIFFUSERS[config.prediction],
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "clip_sample": False,
        },
    }


def _heads(widths: list[int], value, name: str) -> tuple[int, Optional[int]]:
    """diffusers' per-level head counts -> sdlab's (num_heads, head_channels)."""
    counts = list(value) if isinstance(value, (list, tuple)) else [value] * len(widths)
    if len(counts) != len(widths):
        raise CheckpointError(f"unet/config.json: {name} has {len(counts)} entries for {len(widths)} levels")
    if len(set(counts)) == 1 and len(widths) > 1 and len({w // counts[0] for w in widths}) > 1:
        return counts[0], None  # SD1: the same head count at every width
    per_head = {w // c for w, c in zip(widths, counts)}
    if len(per_head) == 1:
        return UNetConfig.num_heads, per_head.pop()  # SD2: fixed channels per head
    if len(set(counts)) == 1:
        return counts[0], None
    raise CheckpointError(f"unet/config.json: {name} {counts} is neither one head count nor one head width")


def config_from_diffusers(
    unet: Mapping, vae: Mapping, text: Mapping, scheduler: Optional[Mapping] = None
) -> ModelConfig:
    """A ModelConfig from the config.json files of a diffusers folder."""
    widths = list(unet["block_out_channels"])
    model_channels = widths[0]
    heads_value = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)
    num_heads, head_channels = _heads(widths, heads_value, "attention_head_dim")
    depth = unet.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise CheckpointError(f"unet/config.json: per-level transformer depths {depth} are not an SD 1.x/2.x UNet")
        depth = depth[0]
    cross_only = unet.get("only_cross_attention", False)
    disable_self = tuple(cross_only) if isinstance(cross_only, (list, tuple)) and any(cross_only) else ()
    if cross_only is True:
        disable_self = (True,) * len(widths)
    down_types = list(unet["down_block_types"])
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down_types):
        raise CheckpointError(f"unet/config.json: block types {down_types} are not an SD 1.x/2.x UNet")
    unet_config = UNetConfig(
        in_channels=unet.get("in_channels", 4),
        out_channels=unet.get("out_channels", 4),
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        num_res_blocks=unet.get("layers_per_block", 2),
        attention_levels=tuple(i for i, t in enumerate(down_types) if t.startswith("CrossAttn")),
        num_heads=num_heads,
        head_channels=head_channels,
        transformer_depth=depth,
        context_dim=unet["cross_attention_dim"],
        use_linear_projection=bool(unet.get("use_linear_projection", False)),
        num_classes=unet.get("num_class_embeds"),
        disable_self_attention=disable_self,
        norm_groups=unet.get("norm_num_groups", 32),
    )
    vae_widths = list(vae["block_out_channels"])
    vae_config = VAEConfig(
        in_channels=vae.get("in_channels", 3),
        out_channels=vae.get("out_channels", 3),
        ch=vae_widths[0],
        ch_mult=tuple(w // vae_widths[0] for w in vae_widths),
        num_res_blocks=vae.get("layers_per_block", 2),
        z_channels=vae.get("latent_channels", 4),
        scaling_factor=vae.get("scaling_factor", VAEConfig.scaling_factor),
        norm_groups=vae.get("norm_num_groups", 32),
    )
    # OpenCLIP ViT-H (SD2) uses exact GELU; OpenAI CLIP ViT-L (SD1) quick_gelu.
    open_clip = text.get("hidden_act") == "gelu"
    width = text["hidden_size"]
    layers = text["num_hidden_layers"]
    text_config = TextConfig(
        kind="open_clip" if open_clip else "clip",
        vocab_size=text.get("vocab_size", 49408),
        context_length=text.get("max_position_embeddings", 77),
        width=width,
        layers=layers + 1 if open_clip else layers,  # the dropped last resblock, see diffusers_text_layers
        heads=text["num_attention_heads"],
        activation="gelu" if open_clip else "quick_gelu",
        layer="penultimate" if open_clip else "last",
        pad_token_id=0 if open_clip else 49407,
        projection_dim=width if open_clip else None,  # OpenCLIP ViT-H: text_projection is (1024, 1024)
    )
    scheduler = scheduler or {}
    schedule_kind = scheduler.get("beta_schedule", "scaled_linear")
    if schedule_kind != "scaled_linear":
        raise CheckpointError(f"scheduler_config.json: beta_schedule '{schedule_kind}' is not SD's scaled_linear")
    prediction_type = scheduler.get("prediction_type", "epsilon")
    predictions = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}
    if prediction_type not in predictions:
        raise CheckpointError(f"scheduler_config.json: prediction_type '{prediction_type}' is not epsilon or v_prediction")
    defaults = ScheduleConfig()
    schedule = ScheduleConfig(
        num_train_timesteps=scheduler.get("num_train_timesteps", defaults.num_train_timesteps),
        beta_start=scheduler.get("beta_start", defaults.beta_start),
        beta_end=scheduler.get("beta_end", defaults.beta_end),
    )
    sample_size = unet.get("sample_size", 64)
    resolution = (sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size) * vae_config.downsample_factor
    return ModelConfig(
        unet=unet_config, vae=vae_config, text=text_config, schedule=schedule,
        prediction=predictions[prediction_type], resolution=resolution,
    )
