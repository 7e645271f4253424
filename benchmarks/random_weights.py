"""Random-weight models for the benchmarks: one single file that sdlab, diffusers and OpenVINO all start from.

`build_checkpoint(folder, config)` writes, in `folder`:
    model.safetensors        the original single-file layout (sdlab's exact config in its metadata)
    configs/                 diffusers' per-part configs and the CLIP tokenizer, so diffusers loads offline
    original.yaml            the ldm config (v1-inference.yaml's fields) diffusers' single-file loader reads

The SD 1.5 architecture (UNet 860M, VAE 84M, CLIP-L 123M parameters) is `SD1`; `TINY` is sdlab's demo
model, for the benchmarks' own tests (seconds, not minutes).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from sdlab.bundled import DEMO
from sdlab.config import SD1, ModelConfig

CONFIGS = {"sd15": SD1, "tiny": DEMO}


def build_checkpoint(folder: Path, config: ModelConfig, seed: int = 0) -> Path:
    """The model with random weights from `seed`, saved by sdlab, plus what diffusers needs to read it."""
    from sdlab.checkpoint import convert
    from sdlab.checkpoint.save import save_single_file
    from sdlab.models import build_text_encoder, build_unet, build_vae

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    torch.manual_seed(seed)
    unet, vae, text = build_unet(config.unet), build_vae(config.vae), build_text_encoder(config.text)
    randomise_zero_layers(unet)
    save_single_file(path, config, unet, vae, text)
    del unet, vae, text

    for relative, document in convert.diffusers_configs(config).items():
        target = folder / "configs" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(document, indent=2))
    write_tokenizer(folder / "configs" / "tokenizer")
    # YAML is a superset of JSON, so JSON text is a valid original config
    (folder / "original.yaml").write_text(json.dumps(original_config(config)))
    return path


def randomise_zero_layers(module: torch.nn.Module) -> None:
    """Give the layers a fresh UNet starts at zero (ldm's residual branches and output conv, so that an
    untrained block is the identity) their default random weights: with them at zero the UNet's output is
    exactly zero, and comparing libraries' outputs or images would prove nothing."""
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)) and not layer.weight.any():
            layer.reset_parameters()


def original_config(config: ModelConfig) -> dict:
    """The ldm config's fields for an SD 1.x-layout model (v1-inference.yaml's for SD1)."""
    unet, vae, schedule = config.unet, config.vae, config.schedule
    heads = {"num_head_channels": unet.head_channels} if unet.head_channels else {"num_heads": unet.num_heads}
    return {"model": {"params": {
        "linear_start": schedule.beta_start, "linear_end": schedule.beta_end,
        "timesteps": schedule.num_train_timesteps, "scale_factor": vae.scaling_factor,
        "parameterization": "eps" if config.prediction == "epsilon" else "v",
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        "unet_config": {"params": {
            "image_size": config.resolution // vae.downsample_factor, "in_channels": unet.in_channels,
            "out_channels": unet.out_channels, "model_channels": unet.model_channels,
            "attention_resolutions": [2 ** level for level in unet.attention_levels],
            "num_res_blocks": unet.num_res_blocks, "channel_mult": list(unet.channel_mult), **heads,
            "use_spatial_transformer": True, "transformer_depth": unet.transformer_depth,
            "context_dim": unet.context_dim, "use_linear_in_transformer": unet.use_linear_projection,
            "use_checkpoint": False, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": vae.z_channels, "ddconfig": {
            "double_z": True, "z_channels": vae.z_channels, "resolution": config.resolution, "in_channels": 3,
            "out_ch": 3, "ch": vae.ch, "ch_mult": list(vae.ch_mult), "num_res_blocks": vae.num_res_blocks,
            "attn_resolutions": [], "dropout": 0.0}}},
    }}}


def write_tokenizer(tokenizer_dir: Path) -> None:
    """sdlab's CLIP vocabulary as the files transformers' CLIPTokenizer reads."""
    from sdlab.tokenizer import NUM_MERGES, VOCAB_PATH, Tokenizer

    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in Tokenizer().vocab.items()}
    with gzip.open(VOCAB_PATH, "rt", encoding="utf-8") as file:
        merges = file.read().split("\n")[1:NUM_MERGES + 1]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77}))


def load_diffusers(folder: Path, dtype: torch.dtype = torch.float32):
    """diffusers' StableDiffusionPipeline from the single file, offline, with DPM++ 2M Karras (sdlab's
    'DPM++ 2M Karras'), no safety checker, no progress bar."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # "Loading pipeline components" on stderr
    pipe = StableDiffusionPipeline.from_single_file(
        str(folder / "model.safetensors"), config=str(folder / "configs"),
        original_config=str(folder / "original.yaml"), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, torch_dtype=dtype)
    pipe.scheduler = diffusers_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_scheduler(config):
    """diffusers' scheduler for sdlab's 'DPM++ 2M Karras' (the parity tests' pairing)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, algorithm_type="dpmsolver++")
