"""The three networks of Stable Diffusion, each a module tree that mirrors its checkpoint keys.

Prefixes in the original single-file layout:
- UNet: `model.diffusion_model.`            -> models/unet.py  UNetModel
- VAE: `first_stage_model.`                 -> models/vae.py   AutoencoderKL
- SD1 text encoder: `cond_stage_model.transformer.` -> models/clip.py  CLIPTextModel
- SD2 text encoder: `cond_stage_model.model.`       -> models/open_clip.py  OpenCLIPTextModel
"""

from ..config import TextConfig, UNetConfig, VAEConfig


def build_unet(config: UNetConfig):
    from .unet import UNetModel

    return UNetModel(config)


def build_vae(config: VAEConfig):
    from .vae import AutoencoderKL

    return AutoencoderKL(config)


def build_text_encoder(config: TextConfig):
    if config.kind == "clip":
        from .clip import CLIPTextModel

        return CLIPTextModel(config)
    from .open_clip import OpenCLIPTextModel

    return OpenCLIPTextModel(config)
