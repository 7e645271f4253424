"""`sdlab train text`: contrastive pre-training of the text encoder, CLIP's recipe in miniature
(Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
section 2.3 and figure 3).

A batch of N image-caption pairs gives an N x N matrix of cosine similarities between image features
and caption features (sdlab's text encoder, `pooled` through its `text_projection`), scaled by a
learned temperature. The loss is the cross-entropy of picking each image's caption among the N
captions and each caption's image among the N images (symmetric InfoNCE, van den Oord et al. 2018).
The logit scale starts at ln(1/0.07) and the scale exp(s) is capped at 100, CLIP's numbers. The text
encoder trained this way is then frozen to condition the UNet, as SD did with OpenAI's CLIP.

A subclass can add NegCLIP's hard negatives (Yuksekgonul et al. 2023, "When and why vision-language
models behave like bags-of-words", section 4) through `hard_negatives(captions)`: a caption per caption
that names the same things wrongly (sdlab.shapes: the relation inverted), as an extra column of the
image-to-caption logits. No image matches it, so an image must score its own caption above the one
that names the same objects the other way round; the caption-to-image direction is unchanged.

Under torchrun the features of all ranks are gathered, so the negatives are the whole global
(micro-)batch, exactly as in one process. With gradient accumulation the contrast is within each
micro-batch of batch_size / grad_accum pairs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig
from ..models import build_text_encoder
from ..tokenizer import get_tokenizer
from . import components, distributed
from .config import TextOptions, TrainConfig
from .data import Batch
from .image_tower import ImageTower
from .loop import atomic_write
from .plots import image_grid, tensor_to_image

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP, section 2.5
LOGIT_SCALE_MAX = 100.0  # "clipped to prevent scaling the logits by more than 100"


class ContrastivePair(nn.Module):
    """The two towers and the learned temperature: what the contrastive loss trains (and EMA averages)."""

    def __init__(self, text_encoder: nn.Module, image_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        own = getattr(text_encoder, "logit_scale", None)  # OpenCLIP's layout stores the temperature with the text tower
        self.logit_scale = own if isinstance(own, nn.Parameter) else nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def features(self, images: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (B, D) image and caption features."""
        image_features = F.normalize(self.image_encoder(images).float(), dim=-1)
        text_features = F.normalize(self.text_encoder.pooled(input_ids).float(), dim=-1)
        return image_features, text_features

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)


def tokenize(captions: list[str], model: ModelConfig, device: torch.device) -> torch.Tensor:
    """(B, 77) ids with the model's padding (SD1: end token, SD2/OpenCLIP: 0)."""
    text = model.text
    return get_tokenizer().tokenize(captions, text.context_length, pad_token_id=text.pad_token_id).to(device)


class TextTrainer(nn.Module):
    default_ema_decay = 0.0

    def __init__(self, config: TrainConfig, model: ModelConfig, text_encoder: nn.Module, image_encoder: nn.Module):
        super().__init__()
        self.config, self.model_config = config, model
        self.resolution = model.resolution
        self.model = ContrastivePair(text_encoder, image_encoder)
        self.trained = nn.ModuleDict({"clip": self.model})

    def loss(self, batch: Batch):
        ids = tokenize(batch.captions, self.model_config, batch.images.device)
        image_features, text_features = self.model.features(batch.images, ids)  # (b, D) each, this rank's rows
        all_image = distributed.gather_with_grad(image_features)  # (B, D), every rank's rows in rank order
        all_text = distributed.gather_with_grad(text_features)
        scale = self.model.scale()
        first = batch.rank * batch.size  # our rows' place among the gathered ones
        labels = torch.arange(first, first + batch.size, device=ids.device)  # our rows' partners
        logits_per_image = scale * image_features @ all_text.T  # (b, B): our images against every caption
        logits_per_text = scale * text_features @ all_image.T  # (b, B): our captions against every image
        negative_captions = self.hard_negatives(batch.captions)
        if negative_captions is not None:
            negatives, has_negative = self.negatives(negative_captions, batch.images.device)
            logits_negative = (scale * image_features @ negatives.T).masked_fill(~has_negative, float("-inf"))
            logits_per_image = torch.cat([logits_per_image, logits_negative], dim=1)  # (b, 2B)
        # this rank's share of the global mean; the shares sum to the loss of the whole batch
        share = (F.cross_entropy(logits_per_image, labels, reduction="sum")
                 + F.cross_entropy(logits_per_text, labels, reduction="sum")) / (2 * batch.micro_size)
        with torch.no_grad():
            accuracy = (logits_per_image.argmax(dim=1) == labels).float().mean()
        logs = {"loss": share * batch.world_size, "accuracy": accuracy, "scale": scale.detach()}
        # the loop averages gradients over ranks; scaling by world_size turns that average into the sum
        # of the shares' gradients, the gradient of the global loss
        return share * batch.world_size, logs

    def hard_negatives(self, captions: list[str]) -> Optional[list[Optional[str]]]:
        """A caption no image matches for each caption (None where there is none), or None: no hard
        negatives, as here."""
        return None

    def negatives(self, captions: list[Optional[str]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) features of every rank's hard-negative captions and a (B,) mask of those that exist: a
        missing one gets the empty caption's row, which the loss masks out of the softmax (each rank
        computes b rows so that all can be gathered)."""
        ids = tokenize([c if c is not None else "" for c in captions], self.model_config, device)
        features = F.normalize(self.model.text_encoder.pooled(ids).float(), dim=-1)
        has = torch.tensor([c is not None for c in captions], device=device)
        return distributed.gather_with_grad(features), distributed.gather_with_grad(has.float()) > 0

    @torch.no_grad()
    def validate(self, model: ContrastivePair, examples, step: int, out_dir: Path) -> None:
        """The similarity matrix of the validation pairs: image i (column) against caption j (row),
        the matching pairs on the diagonal; the title gives the top-1 accuracy both ways."""
        device = next(model.parameters()).device
        images = torch.stack([image for image, _ in examples]).to(device)
        captions = [caption for _, caption in examples]
        image_features, text_features = model.features(images, tokenize(captions, self.model_config, device))
        similarity = (text_features @ image_features.T).cpu()  # (captions, images), cosines
        n = len(examples)
        hits_i = (similarity.argmax(dim=0) == torch.arange(n)).float().mean().item()
        hits_t = (similarity.argmax(dim=1) == torch.arange(n)).float().mean().item()
        thumbs = image_grid([tensor_to_image(image) for image in images], columns=n)
        cell = (thumbs.width - 2) // n
        label_width = 260
        picture = Image.new("RGB", (label_width + thumbs.width, 18 + thumbs.height + cell * n + 4), "white")
        draw = ImageDraw.Draw(picture)
        draw.text((4, 2), f"step {step}: image->caption top-1 {hits_i:.0%}, caption->image {hits_t:.0%}", fill=(0, 0, 0))
        picture.paste(thumbs, (label_width, 18))
        top = 18 + thumbs.height
        for j in range(n):
            draw.text((4, top + j * cell + cell // 2 - 6), captions[j][:42], fill=(0, 0, 0))
            for i in range(n):
                shade = int(round(255 * (1 - (similarity[j, i].item() + 1) / 2)))  # cosine -1..1 -> white..black
                x0, y0 = label_width + 2 + i * cell, top + j * cell
                draw.rectangle((x0, y0, x0 + cell - 2, y0 + cell - 2), fill=(shade, shade, shade),
                               outline=(220, 30, 30) if i == j else None)
        picture.save(Path(out_dir) / f"step-{step:06d}.png")

    def save(self, out_dir: Path, model: ContrastivePair, data) -> Path:
        """OUT/last.safetensors with the text encoder; OUT/image_tower.safetensors keeps the image tower,
        the temperature and the text projection (to score images against captions; SD does not use them).

        SD1's layout (Hugging Face's CLIPTextModel under `cond_stage_model.transformer.`) has no text
        projection, so a `clip`-kind encoder is saved without one; OpenCLIP's layout keeps its own."""
        head = {f"image_encoder.{k}": v for k, v in model.image_encoder.state_dict().items()}
        head["logit_scale"] = model.logit_scale.reshape(())
        head.update({k: v for k, v in model.text_encoder.state_dict().items() if k.startswith("text_projection")})
        head = {k: v.detach().cpu().contiguous() for k, v in head.items()}
        options: TextOptions = self.config.options
        metadata = {"size": str(self.config.resolution or self.resolution), "channels": str(options.image_channels),
                    "stages": str(options.image_stages), "projection_dim": str(self.model_config.text.projection_dim)}
        atomic_write(Path(out_dir) / "image_tower.safetensors", lambda tmp: save_file(head, str(tmp), metadata=metadata))

        text_encoder, config = model.text_encoder, self.model_config
        if config.text.kind == "clip":
            config = config.replace(text=dataclasses.replace(config.text, projection_dim=None))
            state = {k: v for k, v in text_encoder.state_dict().items() if not k.startswith("text_projection")}
            text_encoder = build_text_encoder(config.text)
            text_encoder.load_state_dict(state, strict=True)
        return components.save_model(out_dir, config, self.config, {"text_encoder": text_encoder})


def build(config: TrainConfig, device: torch.device, trainer_class: type = TextTrainer) -> TextTrainer:
    model = components.model_config(config, "text_encoder", components.base_config(config))
    if model.text.projection_dim is None:
        # the contrastive loss compares projected features; width keeps the projection square (OpenCLIP's habit)
        model = model.replace(text=dataclasses.replace(model.text, projection_dim=model.text.width))
        distributed.note(f"text.projection_dim unset; using the text width {model.text.width}")
    text_encoder = components.starting_part(config, "text_encoder", model)
    options: TextOptions = config.options
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        image_encoder = ImageTower(config.resolution or model.resolution, model.text.projection_dim,
                                   options.image_channels, options.image_stages)
    return trainer_class(config, model, text_encoder, image_encoder).to(device)
