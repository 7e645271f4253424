"""`sdlab train unet`: the latent diffusion model (Rombach et al. 2022) on a frozen VAE and text encoder
(or, with `train_text_encoder`, training the text encoder's transformer on the same loss, as
DreamBooth's option does: for an encoder whose contrastive pre-training left word order out).

For each image: latents z0 = scaling_factor * (a sample of the VAE posterior), a timestep t uniform in
[0, T), noise eps, and the noised latents z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps with SD's schedule
(Ho et al. 2020, eq. 4). The UNet, given z_t, t and the caption's text embeddings, predicts eps, or
v = sqrt(a_t) eps - sqrt(1 - a_t) z0 for v-prediction models (Salimans & Ho 2022, section 4); the loss
is the mean squared error. Captions are replaced by the empty caption a fraction of the time, so the
same network also learns the unconditional prediction classifier-free guidance needs (Ho & Salimans
2022). The saved UNet is the exponential moving average of the weights.

`min_snr_gamma` and `clean_error_weight_cap` weight each sample's loss by its noise level
(`diffusion.loss_weights`). (On the shapes model, cap 50 for 1,250 steps did not change which way
round two objects are drawn: MODEL_CARD.md.)

The bundled shapes model's extra losses (token grounding, the relation and scene contrasts, recoloured
inputs) live in sdlab.shapes, in a subclass of this trainer (`UNetTrainer`'s hooks say how).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from ..schedules import alphas_cumprod
from . import components, diffusion
from .config import TrainConfig, UNetOptions
from .data import Batch


class UNetFamilyTrainer(nn.Module):
    """What every UNet-training trainer (text-to-image, inpainting, upscaling) holds and saves: the UNet
    it trains (and EMA-tracks), the frozen VAE and text encoder, and the schedule's alphas_cumprod."""

    def __init__(self, config: TrainConfig, model: ModelConfig, unet: nn.Module, vae: nn.Module,
                 text_encoder: nn.Module):
        super().__init__()
        self.config, self.options, self.model_config = config, config.options, model
        self.resolution = model.resolution
        self.model = self.unet = unet
        self.trained = nn.ModuleDict({"unet": unet})
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.register_buffer("alphas_cumprod", alphas_cumprod(model.schedule), persistent=False)

    def parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(UNet, text encoder) of `model` (the trained networks or their EMA): a UNet alone goes with
        the frozen text encoder; a ModuleDict holds both."""
        if isinstance(model, nn.ModuleDict):
            return model["unet"], model["text_encoder"]
        return model, self.text_encoder

    def save(self, out_dir: Path, model: nn.Module, data) -> Path:
        """A single file: `model`'s UNet and text encoder beside the VAE."""
        unet, text_encoder = self.parts(model)
        return components.save_model(out_dir, self.model_config, self.config,
                                     {"unet": unet, "vae": self.vae, "text_encoder": text_encoder})


@dataclass
class DiffusionStep:
    """One micro-batch on its way through `UNetTrainer.loss`: what its hooks and extra loss terms read."""

    batch: Batch
    captions: list[str]  # the batch's captions after dropout ("" where dropped)
    latents: torch.Tensor  # z0 (b, C, h, w)
    eps: torch.Tensor  # the posterior noise z0 was sampled with
    text_embeddings: torch.Tensor  # (b, 77, width), with gradients when the text encoder trains
    noise: torch.Tensor  # eps of z_t
    timesteps: torch.Tensor  # (b,)
    alphas_cumprod: torch.Tensor  # a_t (b, 1, 1, 1)
    noisy_latents: Optional[torch.Tensor] = None  # z_t
    target: Optional[torch.Tensor] = None  # eps or v
    errors: Optional[torch.Tensor] = None  # each sample's unweighted MSE (b,), with gradients
    records: dict = field(default_factory=dict)  # what a subclass's `denoise` keeps for its loss terms


class UNetTrainer(UNetFamilyTrainer):
    """With `train_text_encoder`, the text encoder's transformer learns from the same loss (its token
    table and contrastive projection stay as they are): `trained` and `model` then hold both networks.

    A subclass adds loss terms in one place, `extra_losses(step)`, which returns them weighted (they are
    added to the diffusion loss in order) with their logs. Two more hooks let it change what the UNet
    sees and watch what it does: `training_noise(step)` (the noise z_t is made with) and
    `denoise(step)` (the UNet's prediction). sdlab.shapes' trainer uses all three."""

    default_ema_decay = 0.9999  # CompVis' LitEma for SD

    def __init__(self, config: TrainConfig, model: ModelConfig, unet: nn.Module, vae: nn.Module,
                 text_encoder: nn.Module):
        super().__init__(config, model, unet, vae, text_encoder)
        if self.options.train_text_encoder:
            text_encoder.train().requires_grad_(True)
            text_encoder.token_embedding.requires_grad_(False)
            if getattr(text_encoder, "text_projection", None) is not None:  # a Linear, or OpenCLIP's bare matrix
                text_encoder.text_projection.requires_grad_(False)
            self.trained = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
            self.model = self.trained

    def param_groups(self) -> list[dict]:
        """The UNet at the run's learning rate; a trained text encoder at `text_encoder_lr`."""
        unet = [p for p in self.trained["unet"].parameters() if p.requires_grad]
        if "text_encoder" not in self.trained:
            return [{"params": unet}]
        options: UNetOptions = self.options
        scale = 1.0 if options.text_encoder_lr is None else options.text_encoder_lr / self.config.lr
        text = [p for p in self.trained["text_encoder"].parameters() if p.requires_grad]
        return [{"params": unet}, {"params": text, "lr_scale": scale}]

    def encode_text(self, captions: list[str], device: torch.device) -> torch.Tensor:
        """(b, 77, width), with gradients when the text encoder trains (and grad is on)."""
        with torch.set_grad_enabled(self.options.train_text_encoder and torch.is_grad_enabled()):
            return diffusion.encode_text(self.text_encoder, self.model_config, captions, device)

    def loss(self, batch: Batch):
        options: UNetOptions = self.options
        latents, eps = diffusion.sample_latents(self.vae, batch.images, batch, self.model_config.vae.scaling_factor)
        captions = diffusion.drop_captions(batch.captions, batch, options.caption_dropout)
        text_embeddings = self.encode_text(captions, batch.images.device)
        noise, timesteps, a = diffusion.draw_noise(latents, batch, self.alphas_cumprod)
        step = DiffusionStep(batch, captions, latents, eps, text_embeddings, noise, timesteps, a)
        step.noise = self.training_noise(step)
        step.noisy_latents, step.target = diffusion.noised(latents, step.noise, a, self.model_config.prediction)
        step.errors = diffusion.prediction_errors(self.denoise(step), step.target)
        weight = self.sample_weights(a.view(-1))
        logs = {} if weight is None else {"mse": step.errors.mean()}
        loss = (step.errors if weight is None else step.errors * weight).mean()
        terms, term_logs = self.extra_losses(step)
        if terms:
            logs["diffusion"] = loss.detach()
        for term in terms:
            loss = loss + term
        logs.update(term_logs)
        return loss, logs

    def training_noise(self, step: DiffusionStep) -> torch.Tensor:
        """The noise that makes z_t from z0: the drawn eps here."""
        return step.noise

    def denoise(self, step: DiffusionStep) -> torch.Tensor:
        """The UNet's eps (or v) prediction for z_t under the captions."""
        return self.unet(step.noisy_latents, step.timesteps, step.text_embeddings)

    def extra_losses(self, step: DiffusionStep) -> tuple[list[torch.Tensor], dict]:
        """Loss terms beyond the diffusion loss, each weighted, and their logs: none here."""
        return [], {}

    def sample_weights(self, alphas_cumprod: torch.Tensor) -> Optional[torch.Tensor]:
        """Each sample's loss weight at its noise level (b,), or None for the plain MSE (`diffusion.loss_weights`)."""
        options: UNetOptions = self.options
        return diffusion.loss_weights(alphas_cumprod, self.model_config.prediction, options.min_snr_gamma,
                                      options.clean_error_weight_cap)

    @torch.no_grad()
    def validate(self, model: nn.Module, examples, step: int, out_dir: Path) -> None:
        """Images sampled from the validation prompts with the model being trained (its EMA)."""
        options: UNetOptions = self.options
        prompts = list(options.validation_prompts) or [caption for _, caption in examples]
        if not any(p.strip() for p in prompts):
            prompts = ["a picture"] * len(prompts)  # txt2img refuses all-empty prompts
        unet, text_encoder = self.parts(model)
        diffusion.validation_grid(self.model_config, unet, self.vae, text_encoder, prompts,
                                  self.config.resolution or self.resolution, options.validation_steps,
                                  self.config.seed, Path(out_dir) / f"step-{step:06d}.png",
                                  guidance_scale=options.validation_guidance, sampler=options.validation_sampler)


def build(config: TrainConfig, device: torch.device, trainer_class: type = UNetTrainer) -> UNetTrainer:
    from ..checkpoint.load import load_components
    from ..samplers import resolve_sampler

    resolve_sampler(config.options.validation_sampler)  # an unknown name fails now, not at the first validation
    if config.base is None:
        components.model_config(config, "unet", None)  # raises the error that says what --base must hold
    base = load_components(config.base, dtype=torch.float32)
    model = components.model_config(config, "unet", base.config)
    unet = components.starting_part(config, "unet", model, base.unet)
    return trainer_class(config, model, unet, base.vae, base.text_encoder).to(device)
