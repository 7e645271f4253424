"""Checkpoint files for the tests, in the exact layout of the public SD files, with random weights.

Real SD 1.x/2.x single files (CompVis `sd-v1-4.ckpt`, `v1-5-pruned.safetensors`, Stability
`v2-1_768-ema-pruned.ckpt`) hold, besides the three networks: ldm's DDPM schedule buffers at the top
level, the EMA copy of the UNet as `model_ema.<name without dots>` with its `decay`/`num_updates`
counters, and (SD1) CLIP's `position_ids`. The builders here add exactly those.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
import yaml

from sdlab.checkpoint import convert
from sdlab.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from sdlab.models import build_text_encoder, build_unet, build_vae
from sdlab.tokenizer import NUM_MERGES, VOCAB_PATH, Tokenizer

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
# SD1's rules (8 heads, CLIP with 64-channel heads) hold, so detection alone reproduces it.
TINY_SD1 = ModelConfig(
    name="sd1",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                    context_dim=64),
    vae=TINY_VAE,
    text=TextConfig(width=64, layers=2, heads=1),
)
# SD2's rules: 64 channels per head, linear projections, OpenCLIP text encoder read at the penultimate layer.
TINY_SD2 = ModelConfig(
    name="sd2-v",
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                    head_channels=64, context_dim=64, use_linear_projection=True),
    vae=TINY_VAE,
    text=TextConfig(kind="open_clip", width=64, layers=3, heads=1, activation="gelu", layer="penultimate",
                    pad_token_id=0, projection_dim=64),
    prediction="v",
    resolution=768,
)

# ldm.models.diffusion.ddpm.DDPM.register_schedule: the buffers every CompVis/Stability file carries
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter ~ N(0, 0.05^2): no zero-initialised layer hides a wrong key."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return module


def random_modules(config: ModelConfig, seed: int = 0):
    """(unet, vae, text_encoder) of sdlab with random weights."""
    return (randomize(build_unet(config.unet), seed), randomize(build_vae(config.vae), seed + 1),
            randomize(build_text_encoder(config.text), seed + 2))


def schedule_buffers(config: ModelConfig) -> dict[str, torch.Tensor]:
    s = config.schedule
    betas = torch.linspace(s.beta_start**0.5, s.beta_end**0.5, s.num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    values = [betas, alphas_cumprod, prev, alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt(),
              (1 - alphas_cumprod).log(), (1 / alphas_cumprod).sqrt(), (1 / alphas_cumprod - 1).sqrt(),
              betas * (1 - prev) / (1 - alphas_cumprod), (betas * (1 - prev) / (1 - alphas_cumprod)).clamp(min=1e-20).log(),
              betas * prev.sqrt() / (1 - alphas_cumprod), (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)]
    return {name: value.float() for name, value in zip(SCHEDULE_BUFFERS, values)}


def ldm_state_dict(config: ModelConfig, unet, vae, text_encoder, ema_unet=None) -> dict[str, torch.Tensor]:
    """The state dict of a CompVis/Stability single file holding these networks."""
    state = convert.join_original(config, unet.state_dict(), vae.state_dict(), text_encoder.state_dict())
    state.update(schedule_buffers(config))
    if config.text.kind == "clip":
        position_ids = torch.arange(config.text.context_length)[None]
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = position_ids
    if ema_unet is not None:
        # ldm.modules.ema.LitEma: buffer names are parameter names of the DiffusionWrapper, dots removed
        for key, value in ema_unet.state_dict().items():
            state["model_ema." + ("diffusion_model." + key).replace(".", "")] = value
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    return state


def ldm_yaml(config: ModelConfig) -> str:
    """The original (ldm) inference YAML of `config`, as diffusers' `original_config` reads it."""
    return yaml.safe_dump(ldm_document(config))


def ldm_document(config: ModelConfig) -> dict:
    """The document of `ldm_yaml`, laid out as CompVis `v1-inference.yaml` / Stability `v2-inference-v.yaml`."""
    unet, vae, text = config.unet, config.vae, config.text
    unet_params = {
        "image_size": config.resolution // vae.downsample_factor,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "model_channels": unet.model_channels,
        "attention_resolutions": [2**level for level in unet.attention_levels],
        "num_res_blocks": unet.num_res_blocks,
        "channel_mult": list(unet.channel_mult),
        "use_spatial_transformer": True,
        "use_linear_in_transformer": unet.use_linear_projection,
        "transformer_depth": unet.transformer_depth,
        "context_dim": unet.context_dim,
        "legacy": False,
    }
    if unet.head_channels is None:
        unet_params["num_heads"] = unet.num_heads
    else:
        unet_params["num_head_channels"] = unet.head_channels
    cond = "ldm.modules.encoders.modules." + ("FrozenCLIPEmbedder" if text.kind == "clip" else "FrozenOpenCLIPEmbedder")
    document = {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": config.schedule.beta_start,
            "linear_end": config.schedule.beta_end,
            "timesteps": config.schedule.num_train_timesteps,
            "scale_factor": vae.scaling_factor,
            "parameterization": "v" if config.prediction == "v" else "eps",
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": vae.z_channels,
                "ddconfig": {"double_z": True, "z_channels": vae.z_channels, "resolution": config.resolution,
                             "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": vae.ch,
                             "ch_mult": list(vae.ch_mult), "num_res_blocks": vae.num_res_blocks,
                             "attn_resolutions": [], "dropout": 0.0},
            }},
            "cond_stage_config": {"target": cond},
        },
    }}
    return document


def write_tokenizer(folder: Path, text: TextConfig) -> None:
    """A transformers CLIPTokenizer folder built from sdlab's bundled BPE merges (the same vocabulary)."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(VOCAB_PATH, "rt", encoding="utf-8") as file:
        merges = file.read().split("\n")[1:NUM_MERGES + 1]
    # HF names the special tokens <|startoftext|>/<|endoftext|> where CLIP's own code says <start_of_text>
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in Tokenizer().vocab.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pad = "<|endoftext|>" if text.pad_token_id == 49407 else "!"  # SD2's tokenizer pads with "!" (id 0)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": text.context_length,
         "do_lower_case": True}))


def write_diffusers_configs(folder: Path, config: ModelConfig) -> Path:
    """A diffusers folder without weights: model_index.json, the parts' configs and the tokenizer."""
    for relative, document in convert.diffusers_configs(config).items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2))
    write_tokenizer(folder / "tokenizer", config.text)
    return folder
