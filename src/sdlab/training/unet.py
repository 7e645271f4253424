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

Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 8)
weights each sample's loss by min(SNR_t, gamma) / SNR_t for eps (/(SNR_t + 1) for v), with
SNR_t = a_t / (1 - a_t): the easy low-noise timesteps stop dominating the gradient.

`clean_error_weight_cap` works at the other end. Epsilon-MSE is SNR_t times the error in the clean
latents, so at the noisiest steps (SNR 0.005 at t = 999), where a sampler decides the layout, a wrong
layout costs almost nothing. The option raises each sample's weight so that the clean-latent error
counts at least min(1, cap * SNR_t) times. (On the shapes model, cap 50 for 1,250 steps did not change
which way round two objects are drawn: MODEL_CARD.md.)

`recolour_fraction` (shapes data, see `recolour`) noises some two-object samples from the picture with
the two colours exchanged, the target staying the true picture: only the caption can say which object
has which colour.

On the shapes data, `grounding_loss` adds TokenCompose's token loss (see `grounding`): each object's
words are taught where in the picture to be read, `relation_contrast` (see `relation_contrast`) asks
that a two-object caption predict its scene better than the same caption with its relation turned round,
and `scene_contrast` (see `scene_contrast`) that it predict its picture better than a near miss of it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from ..models.attention import recorded_cross_attention
from ..schedules import alphas_cumprod
from ..tokenizer import get_tokenizer
from . import components, grounding, recolour, scene_contrast
from .config import TrainConfig, UNetOptions
from .data import Batch
from .lora import loss_weights, noised
from .plots import image_grid
from .relation_contrast import contrasted, mirrored_denoising, relation_contrast


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


class UNetTrainer(UNetFamilyTrainer):
    """With `train_text_encoder`, the text encoder's transformer learns from the same loss (its token
    table and contrastive projection stay as they are): `trained` and `model` then hold both networks."""

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

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        text = self.model_config.text
        return get_tokenizer().tokenize(captions, text.context_length, pad_token_id=text.pad_token_id)

    def encode_text(self, captions: list[str], device: torch.device) -> torch.Tensor:
        ids = self.token_ids(captions)
        with torch.set_grad_enabled(self.options.train_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(ids.to(device))  # (b, 77, width)

    def loss(self, batch: Batch):
        options: UNetOptions = self.options
        device = batch.images.device
        with torch.no_grad():
            posterior = self.vae.encode(batch.images)
            eps = batch.randn(*posterior.mean.shape[1:]).to(posterior.mean.dtype)
            latents = (posterior.mean + posterior.std * eps).float() * self.model_config.vae.scaling_factor
            keep = batch.rand() >= options.caption_dropout
            captions = [caption if k else "" for caption, k in zip(batch.captions, keep.tolist())]
        text_embeddings = self.encode_text(captions, device)  # with gradients if the encoder trains

        noise = batch.randn(*latents.shape[1:])
        timesteps = batch.randint(self.model_config.schedule.num_train_timesteps)
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        if options.recolour_fraction:
            recoloured = self.recoloured_latents(batch, latents, eps, keep, timesteps)
            # the noise that takes the true latents to the noisy ones: the target
            noise = noise + (a / (1 - a)).sqrt() * (recoloured - latents)
        noisy_latents, target = noised(latents, noise, a, self.model_config.prediction)
        recording = (recorded_cross_attention(self.unet) if options.grounding_loss
                     else contextlib.nullcontext([]))
        with recording as maps:
            model_output = self.unet(noisy_latents, timesteps, text_embeddings).float()  # noise_pred, or v_pred
        errors = (model_output - target).pow(2).mean(dim=(1, 2, 3))  # (b,)
        logs = {}
        weight = self.sample_weights(a.view(-1))
        if weight is not None:
            logs["mse"] = errors.mean()
        loss = (errors if weight is None else errors * weight).mean()
        if (options.relation_contrast or options.relation_mirror_denoising or options.grounding_loss
                or options.scene_contrast):
            logs["diffusion"] = loss.detach()
        def denoise_as(x, t, texts):  # the UNet under other captions (the relation terms' mirrors)
            return self.unet(x, t, self.encode_text(texts, device))

        if options.relation_contrast:
            contrast, contrast_logs = relation_contrast(
                denoise_as, noisy_latents, timesteps, captions, target, errors,
                temperature=options.relation_contrast_temperature,
                min_timestep=options.relation_contrast_min_timestep)
            logs.update(contrast_logs)
            loss = loss + options.relation_contrast * contrast
        if options.relation_mirror_denoising:
            mirror, mirror_logs = mirrored_denoising(
                denoise_as, noisy_latents, timesteps, captions, target,
                min_timestep=options.relation_contrast_min_timestep)
            logs.update(mirror_logs)
            loss = loss + options.relation_mirror_denoising * mirror
        if options.scene_contrast:
            contrast, contrast_logs = self.scene_contrast_term(batch, captions, timesteps, noise, a,
                                                               text_embeddings, errors, eps)
            logs.update(contrast_logs)
            loss = loss + options.scene_contrast * contrast
        if options.grounding_loss:
            weights = grounding.timestep_weights(timesteps, self.model_config.schedule.num_train_timesteps,
                                                 options.grounding_weighting)
            logs["grounding"] = grounding.grounding_loss(maps, batch.images, self.token_ids(captions), weights,
                                                         options.grounding_place_words)
            loss = loss + options.grounding_loss * logs["grounding"]
        return loss, logs

    def scene_contrast_term(self, batch: Batch, captions: list[str], timesteps: torch.Tensor,
                            noise: torch.Tensor, a: torch.Tensor, text_embeddings: torch.Tensor,
                            errors: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """`scene_contrast`: the captioned two-object samples at timesteps >= `scene_contrast_min_timestep`
        against near misses of their pictures, noised with their own noise at their own timestep and
        denoised under their own caption."""
        options: UNetOptions = self.options
        kinds, choices, places = batch.rand(), batch.rand(), batch.rand()  # drawn every step, used or not
        # the two-object samples are those whose caption states a relation, as the relation contrast's
        chosen = [i for i, _ in contrasted(captions, timesteps, options.scene_contrast_min_timestep)]
        index = torch.tensor(chosen, dtype=torch.long, device=timesteps.device)
        if chosen:
            with torch.no_grad():
                misses, made = scene_contrast.near_misses(batch.images[index], kinds[index], choices[index],
                                                          places[index])
                index, misses = index[made.to(index.device)], misses[made]
        if len(index) == 0:
            return scene_contrast.scene_contrast(errors[:0], errors[:0].detach(), options.scene_contrast_temperature,
                                                 len(captions))
        with torch.no_grad():
            posterior = self.vae.encode(misses)
            miss_latents = (posterior.mean + posterior.std * eps[index]).float() * self.model_config.vae.scaling_factor
        a = a[index]
        noisy, target = noised(miss_latents, noise[index], a, self.model_config.prediction)
        output = self.unet(noisy, timesteps[index], text_embeddings[index]).float()
        miss_errors = (output - target).pow(2).mean(dim=(1, 2, 3))
        return scene_contrast.scene_contrast(errors[index], miss_errors, options.scene_contrast_temperature,
                                             len(captions))

    @torch.no_grad()
    def recoloured_latents(self, batch: Batch, latents: torch.Tensor, eps: torch.Tensor, keep: torch.Tensor,
                           timesteps: torch.Tensor) -> torch.Tensor:
        """`latents` with a `recolour_fraction` of the captioned two-object samples at timesteps >=
        `recolour_min_timestep` replaced by the latents of their picture with its colours exchanged."""
        options: UNetOptions = self.options
        candidates = ((batch.rand() < options.recolour_fraction) & keep.to(timesteps.device)
                      & (timesteps >= options.recolour_min_timestep))
        if not candidates.any():
            return latents
        swapped, swappable = recolour.swap_object_colours(batch.images[candidates])
        pick = torch.nonzero(candidates).flatten()[swappable]
        if len(pick) == 0:
            return latents
        posterior = self.vae.encode(swapped[swappable])
        out = latents.clone()
        out[pick] = (posterior.mean + posterior.std * eps[pick]).float() * self.model_config.vae.scaling_factor
        return out

    def sample_weights(self, alphas_cumprod: torch.Tensor) -> Optional[torch.Tensor]:
        """Each sample's loss weight at its noise level (b,), or None for the plain MSE (`lora.loss_weights`)."""
        options: UNetOptions = self.options
        return loss_weights(alphas_cumprod, self.model_config.prediction, options.min_snr_gamma,
                            options.clean_error_weight_cap)

    @torch.no_grad()
    def validate(self, model: nn.Module, examples, step: int, out_dir: Path) -> None:
        """Images sampled from the validation prompts with the model being trained (its EMA)."""
        from ..pipelines.api import StableDiffusion as Pipeline

        options: UNetOptions = self.options
        prompts = list(options.validation_prompts) or [caption for _, caption in examples]
        if not any(p.strip() for p in prompts):
            prompts = ["a picture"] * len(prompts)  # txt2img refuses all-empty prompts
        unet, text_encoder = self.parts(model)
        device = next(unet.parameters()).device
        pipe = Pipeline(self.model_config, unet, self.vae, text_encoder, device, torch.float32)
        size = self.config.resolution or self.resolution
        result = pipe.txt2img(prompts, steps=options.validation_steps, guidance_scale=options.validation_guidance,
                              seed=self.config.seed, width=size, height=size, batch_size=len(prompts),
                              sampler=options.validation_sampler, noise="diffusers")
        image_grid(result.images, columns=len(prompts), labels=prompts).save(Path(out_dir) / f"step-{step:06d}.png")


def build(config: TrainConfig, device: torch.device) -> UNetTrainer:
    from ..checkpoint.load import load_components
    from ..samplers import resolve_sampler

    resolve_sampler(config.options.validation_sampler)  # an unknown name fails now, not at the first validation
    if config.base is None:
        components.model_config(config, "unet", None)  # raises the error that says what --base must hold
    base = load_components(config.base, dtype=torch.float32)
    model = components.model_config(config, "unet", base.config)
    unet = components.starting_part(config, "unet", model, base.unet)
    return UNetTrainer(config, model, unet, base.vae, base.text_encoder).to(device)
