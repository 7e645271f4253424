"""`sdlab train inpaint`: an inpainting UNet grown from a text-to-image one, as SD's inpainting models
were made (runwayml's sd-v1-5-inpainting: "5 additional input channels ... zero-initialized after
restoring the non-inpainting checkpoint"; LatentInpaintDiffusion in ldm).

The UNet's first convolution takes 9 channels instead of 4: the noisy latents, the mask (1 channel,
at latent size, nearest) and the latents of the masked image (the picture with the masked pixels set
to 0, grey in [-1, 1]), concatenated in that order, the order pipelines/inpaint.py feeds. The new
channels' weights start at zero, so at step 0 the model is the base model. Each sample gets a random
mask of rectangles and brush strokes, drawn from (seed, sample number) so a resumed run repeats it;
a `full_mask` fraction is masked entirely, which keeps plain text-to-image in the model (the masked
image is then all grey), and an `edge_masks` fraction of the rest along one edge, as outpainting masks. (sdlab.shapes' subclass masks whole objects of its pictures.) The loss is the noise-prediction MSE over the whole latent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..models import build_unet
from . import components
from .config import InpaintOptions, TrainConfig
from .data import Batch
from .diffusion import drop_captions, encode_latents, encode_text, noised_prediction_loss
from .lora import load_base
from .plots import image_grid, tensor_to_image
from .unet import UNetFamilyTrainer

EXTRA_CHANNELS = 5  # mask (1) + masked-image latents (4)


def random_mask(size, rng: np.random.Generator, options: InpaintOptions) -> torch.Tensor:
    """(1, height, width) of 0 (keep) and 1 (repaint): some boxes and brush strokes, or everything.
    `size`: N (N x N) or (width, height), an aspect-ratio bucket's canvas; boxes scale with each side,
    strokes with the shorter one (a square canvas draws what it always drew)."""
    width, height = (size, size) if isinstance(size, int) else size
    sides, short = np.array([width, height], dtype=np.float64), min(width, height)
    if rng.random() < options.full_mask:
        return torch.ones(1, height, width)
    if options.edge_masks and rng.random() < options.edge_masks:
        return edge_mask(width, height, rng)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    boxes = int(rng.integers(0, options.max_boxes + 1))
    strokes = int(rng.integers(0 if boxes else 1, options.max_strokes + 1))
    for _ in range(boxes):
        w, h = rng.uniform(0.1, 0.6, size=2) * sides
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        draw.rectangle((x, y, x + w, y + h), fill=255)
    for _ in range(strokes):
        points = [tuple(rng.uniform(0, 1, size=2) * sides)]
        for _ in range(int(rng.integers(2, 6))):  # a few segments in random directions, like a brush drag
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.4) * short
            x, y = points[-1]
            points.append((float(np.clip(x + length * np.cos(angle), 0, width)),
                           float(np.clip(y + length * np.sin(angle), 0, height))))
        stroke = max(1, int(rng.uniform(0.03, 0.12) * short))
        draw.line(points, fill=255, width=stroke, joint="curve")
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5).float()[None]


def edge_mask(width: int, height: int, rng: np.random.Generator) -> torch.Tensor:
    """(1, height, width): a strip along one edge, chosen at random, 20-50% of the canvas across: what
    outpainting repaints (the new margin and a seam of the old picture), which boxes and strokes never are."""
    side = int(rng.integers(4))  # left, right, top, bottom
    across = width if side < 2 else height
    depth = max(1, round(rng.uniform(0.2, 0.5) * across))
    mask = torch.zeros(1, height, width)
    strip = slice(0, depth) if side in (0, 2) else slice(across - depth, across)
    if side < 2:
        mask[:, :, strip] = 1
    else:
        mask[:, strip, :] = 1
    return mask


def inpainting_unet(base_unet: nn.Module, model: ModelConfig) -> tuple[nn.Module, ModelConfig]:
    """A 9-channel UNet with the base's weights; the first convolution's 5 new input channels zero."""
    unet_config = model.unet
    if unet_config.in_channels == unet_config.out_channels + EXTRA_CHANNELS:
        return base_unet, model  # already an inpainting model: fine-tune it as it is
    if unet_config.in_channels != unet_config.out_channels or unet_config.num_classes is not None:
        raise ConfigError(f"--base's UNet takes {unet_config.in_channels} channels (num_classes "
                          f"{unet_config.num_classes}); an inpainting model grows from a text-to-image UNet")
    unet_config = dataclasses.replace(unet_config, in_channels=unet_config.out_channels + EXTRA_CHANNELS)
    name = model.name if model.name.endswith("-inpainting") else f"{model.name}-inpainting"
    model = model.replace(unet=unet_config, name=name)
    unet = build_unet(unet_config)
    state = base_unet.state_dict()
    first = state["input_blocks.0.0.weight"]  # (C, 4, 3, 3)
    grown = torch.zeros(first.shape[0], unet_config.in_channels, *first.shape[2:], dtype=first.dtype)
    grown[:, :first.shape[1]] = first
    state["input_blocks.0.0.weight"] = grown
    unet.load_state_dict(state, strict=True)
    return unet, model


class InpaintTrainer(UNetFamilyTrainer):
    default_ema_decay = 0.0

    def masks(self, batch: Batch) -> torch.Tensor:
        """(b, 1, H, W): sample n's mask from the generator (seed, n)."""
        first = batch.step * batch.global_size + batch.start
        masks = []
        for image, n in zip(batch.images, range(first, first + batch.size)):
            masks.append(self.sample_mask(image, np.random.default_rng([self.config.seed, n, 2])))
        return torch.stack(masks).to(batch.images.device)

    def sample_mask(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(1, H, W) for a (3, H, W) image: one sample's mask, drawn from its own `rng` (a subclass may mask
        what it knows is in the picture: sdlab.shapes masks whole objects)."""
        return random_mask((image.shape[-1], image.shape[-2]), rng, self.options)

    def conditioning(self, images: torch.Tensor, masks: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(b, 5, h, w): [mask at latent size, masked-image latents]."""
        masked_latents = encode_latents(self.vae, images * (masks < 0.5), batch, self.model_config.vae.scaling_factor)
        latent_mask = F.interpolate(masks, size=masked_latents.shape[-2:])  # nearest, as the pipeline
        return torch.cat([latent_mask, masked_latents], dim=1)

    def loss(self, batch: Batch):
        latents = encode_latents(self.vae, batch.images, batch, self.model_config.vae.scaling_factor)
        masks = self.masks(batch)
        concat = self.conditioning(batch.images, masks, batch)
        captions = drop_captions(batch.captions, batch, self.options.caption_dropout)
        with torch.no_grad():
            text_embeddings = encode_text(self.text_encoder, self.model_config, captions, batch.images.device)
        per_sample = noised_prediction_loss(self.model, latents, text_embeddings, batch, self.alphas_cumprod,
                                            self.model_config.prediction, concat=concat)
        return per_sample.mean(), {"masked": masks.mean()}

    @torch.no_grad()
    def validate(self, model: nn.Module, examples, step: int, out_dir: Path) -> None:
        """Each validation image with a fixed mask, and the model's inpainting of it."""
        from ..pipelines.api import StableDiffusion as Pipeline

        device = next(model.parameters()).device
        pipe = Pipeline(self.model_config, model, self.vae, self.text_encoder, device, torch.float32)
        pictures, labels = [], []
        for i, (image, caption) in enumerate(examples[:2]):
            mask = random_mask((image.shape[-1], image.shape[-2]), np.random.default_rng([self.config.seed, i, 3]),
                               dataclasses.replace(self.options, full_mask=0.0))
            source, mask_image = tensor_to_image(image), Image.fromarray((mask[0].numpy() * 255).astype(np.uint8))
            # mask_blur 0: the sharp masks of training (the pipeline's default blur can erase a small one)
            result = pipe.inpaint(caption or "a picture", source, mask_image, steps=20, seed=self.config.seed,
                                  width=image.shape[-1], height=image.shape[-2], mask_blur=0)
            pictures += [source, mask_image.convert("RGB"), result.images[0]]
            labels += [caption, "mask", "inpainted"]
        image_grid(pictures, columns=3, labels=labels).save(Path(out_dir) / f"step-{step:06d}.png")


def build(config: TrainConfig, device: torch.device, trainer_class: type = InpaintTrainer) -> InpaintTrainer:
    options: InpaintOptions = config.options
    if not all(0 <= value <= 1 for value in (options.full_mask, options.caption_dropout, options.edge_masks)):
        raise ConfigError("inpaint.full_mask, inpaint.edge_masks and inpaint.caption_dropout must be in [0, 1]")
    if options.max_boxes < 0 or options.max_strokes < 0 or options.max_boxes + options.max_strokes == 0:
        raise ConfigError("inpaint.max_boxes and inpaint.max_strokes must not be negative, and one must be positive")
    base = load_base(config, "inpaint")
    unet, model = inpainting_unet(base.unet, base.config)
    return trainer_class(config, model, unet, base.vae, base.text_encoder).to(device)
