"""The models that ship with sdlab, so everything works offline on a fresh clone.

`demo` is a clearly named tiny model with *random* weights, built in a fraction of a second from a
fixed seed: it exercises the whole pipeline but draws noise, not pictures. The trained bundled model
(see MODEL_CARD.md) replaces it as the default once its weights are in `sdlab/weights/`.
"""

from __future__ import annotations

import os
import sys

from .config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from .errors import InputError

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
BUNDLED_MODEL = os.path.join(WEIGHTS_DIR, "sdlab-shapes.safetensors")
# the inpainting and x4-upscaling models hold only their UNet; the VAE and text encoder are BUNDLED_MODEL's
BUNDLED_INPAINTING = os.path.join(WEIGHTS_DIR, "sdlab-shapes-inpainting.safetensors")
BUNDLED_UPSCALER = os.path.join(WEIGHTS_DIR, "sdlab-shapes-upscaler.safetensors")
TASKS = ("txt2img", "inpaint", "upscale")

DEMO = ModelConfig(
    name="sdlab-demo-random",
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1,
                    num_heads=4, context_dim=64),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    text=TextConfig(width=64, layers=2, heads=2),
    resolution=128,
)


def default_model_path(task: str = "txt2img") -> str:
    """The bundled model for `task` when it is installed, else the random-weight demo (with a warning).

    inpaint: the inpainting model, else the text-to-image one (which inpaints by latent blending);
    upscale: the x4 upscaler, which nothing else can stand in for.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "inpaint" and os.path.isfile(BUNDLED_INPAINTING):
        return BUNDLED_INPAINTING
    if task == "upscale":
        if os.path.isfile(BUNDLED_UPSCALER):
            return BUNDLED_UPSCALER
        raise InputError("no bundled upscaler is installed; pass --model with an x4 upscaler checkpoint")
    if os.path.isfile(BUNDLED_MODEL):
        return BUNDLED_MODEL
    print("sdlab: no bundled model installed; using the random-weight demo model (it draws noise). "
          "Pass --model PATH for a real checkpoint.", file=sys.stderr)
    return "demo"


def demo_components(seed: int = 0):
    """(config, unet, vae, text_encoder) of the demo model, random weights from a fixed seed."""
    import torch  # here, not above: the server reads the paths above before torch is loaded

    from .models import build_text_encoder, build_unet, build_vae

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet, vae, text = build_unet(DEMO.unet), build_vae(DEMO.vae), build_text_encoder(DEMO.text)
    finally:
        torch.random.set_rng_state(state)
    return DEMO, unet, vae, text


def package(model: str, inpainting: str, upscaler: str, out_dir: str = WEIGHTS_DIR) -> list[str]:
    """Write the three trained shapes models as the bundled files, in fp16: `model` whole, the inpainting
    and upscaling models as their UNets only, sharing `model`'s VAE and text encoder (they were trained
    on them, with `model` as --base; this is checked)."""
    import torch

    from .checkpoint.load import load_components
    from .checkpoint.save import save_single_file
    from .errors import CheckpointError

    os.makedirs(out_dir, exist_ok=True)
    base = load_components(model, dtype=torch.float32)
    names = [os.path.basename(p) for p in (BUNDLED_MODEL, BUNDLED_INPAINTING, BUNDLED_UPSCALER)]
    written = [str(save_single_file(os.path.join(out_dir, names[0]), base.config, base.unet, base.vae,
                                    base.text_encoder, dtype=torch.float16))]
    for source, name in ((inpainting, names[1]), (upscaler, names[2])):
        other = load_components(source, dtype=torch.float32)
        for part in ("vae", "text_encoder"):
            ours, theirs = getattr(base, part).state_dict(), getattr(other, part).state_dict()
            if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
                raise CheckpointError(f"{source}: its {part} is not {model}'s; train it with --base {model}")
        written.append(str(save_single_file(os.path.join(out_dir, name), other.config, other.unet, base.vae,
                                            base.text_encoder, dtype=torch.float16, shared_parts=names[0])))
    return written
