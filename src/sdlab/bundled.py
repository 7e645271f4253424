"""The models that ship with sdlab, so everything works offline on a fresh clone.

`demo` is a clearly named tiny model with *random* weights, built in a fraction of a second from a
fixed seed: it exercises the whole pipeline but draws noise, not pictures. The trained bundled model
(see MODEL_CARD.md) replaces it as the default once its weights are in `sdlab/weights/`.
"""

from __future__ import annotations

import os
import sys

import torch

from .config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from .models import build_text_encoder, build_unet, build_vae

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
BUNDLED_MODEL = os.path.join(WEIGHTS_DIR, "sdlab-shapes.safetensors")

DEMO = ModelConfig(
    name="sdlab-demo-random",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1,
                    num_heads=4, context_dim=64),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    text=TextConfig(width=64, layers=2, heads=2),
    resolution=128,
)


def default_model_path() -> str:
    """The trained bundled model when it is installed, else the random-weight demo (with a warning)."""
    if os.path.isfile(BUNDLED_MODEL):
        return BUNDLED_MODEL
    print("sdlab: no bundled model installed; using the random-weight demo model (it draws noise). "
          "Pass --model PATH for a real checkpoint.", file=sys.stderr)
    return "demo"


def demo_components(seed: int = 0):
    """(config, unet, vae, text_encoder) of the demo model, random weights from a fixed seed."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet, vae, text = build_unet(DEMO.unet), build_vae(DEMO.vae), build_text_encoder(DEMO.text)
    finally:
        torch.random.set_rng_state(state)
    return DEMO, unet, vae, text
