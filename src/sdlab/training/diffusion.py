"""What every trainer of a diffusion model does with a batch: the latents of its images, the text
embeddings of its captions (some of them dropped), the noised latents and their target, the loss, and
a validation grid of the model as it trains. The UNet, LoRA, DreamBooth, textual inversion, inpainting,
upscaling and DPO trainers are built from these.

Latents: z0 = scaling_factor * (a sample of the VAE posterior). Noising: a timestep t uniform in [0, T),
noise eps and z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps with the schedule's alphas_cumprod a_t (Ho et al.
2020, eq. 4); the UNet predicts eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) z0 for v-prediction models
(Salimans & Ho 2022, section 4), and the loss is the mean squared error. Captions are replaced by the
empty caption a fraction of the time, so the same network also learns the unconditional prediction
classifier-free guidance needs (Ho & Salimans 2022).

Every draw goes through the batch (`Batch.randn`, `rand`, `randint`), so the numbers do not depend on
how many processes or accumulation steps share it; each function says what it draws, in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import DEFAULT_SAMPLER, ModelConfig
from ..tokenizer import get_tokenizer
from .data import Batch
from .plots import image_grid


def scaled_latents(posterior, eps: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """z0 (b, C, h, w): the posterior's sample mean + std * eps, times the VAE's scaling factor."""
    return (posterior.mean + posterior.std * eps.to(posterior.mean.dtype)).float() * scaling_factor


@torch.no_grad()
def sample_latents(vae: nn.Module, images: torch.Tensor, batch: Batch,
                   scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, eps): a sample of the VAE posterior of `images`, scaled, and the noise eps it was drawn with
    (another picture encoded with the same eps is noised alike). Draws one batch.randn."""
    posterior = vae.encode(images)
    eps = batch.randn(*posterior.mean.shape[1:])
    return scaled_latents(posterior, eps, scaling_factor), eps.to(posterior.mean.dtype)


def encode_latents(vae: nn.Module, images: torch.Tensor, batch: Batch, scaling_factor: float) -> torch.Tensor:
    """z0 (b, C, h, w), a scaled sample of the VAE posterior. Draws one batch.randn."""
    return sample_latents(vae, images, batch, scaling_factor)[0]


def token_ids(model: ModelConfig, captions: list[str]) -> torch.Tensor:
    """(b, 77) token ids with the model's padding (SD1: the end token, SD2/OpenCLIP: 0)."""
    text = model.text
    return get_tokenizer().tokenize(captions, text.context_length, pad_token_id=text.pad_token_id)


def encode_text(text_encoder: nn.Module, model: ModelConfig, captions: list[str], device: torch.device) -> torch.Tensor:
    """(b, 77, width) text embeddings; gradients flow when the encoder (or an adapter on it) trains."""
    return text_encoder(token_ids(model, captions).to(device))


def drop_captions(captions: list[str], batch: Batch, dropout: float) -> list[str]:
    """The empty caption for a `dropout` fraction, for classifier-free guidance. Draws one batch.rand."""
    keep = batch.rand() >= dropout
    return [caption if k else "" for caption, k in zip(captions, keep.tolist())]


def draw_noise(latents: torch.Tensor, batch: Batch,
               schedule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eps like `latents`, timesteps (b,), their alphas_cumprod (b, 1, 1, 1)) for a schedule's
    alphas_cumprod (T,). Draws batch.randn (noise), then batch.randint (t)."""
    noise = batch.randn(*latents.shape[1:])
    timesteps = batch.randint(len(schedule))
    return noise, timesteps, schedule[timesteps].view(-1, 1, 1, 1)


def noised(latents: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, the UNet's target) for clean latents, noise and alphas_cumprod `a` (b, 1, 1, 1):
    z_t = sqrt(a) z0 + sqrt(1 - a) eps (Ho et al. 2020, eq. 4); the target is eps, or
    v = sqrt(a) eps - sqrt(1 - a) z0 for v-prediction (Salimans & Ho 2022)."""
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    return noisy, (a.sqrt() * noise - (1 - a).sqrt() * latents if prediction == "v" else noise)


def prediction_errors(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sample's mean squared error (b,), in fp32."""
    return (model_output.float() - target).pow(2).mean(dim=tuple(range(1, target.dim())))


def loss_weights(alphas_cumprod: torch.Tensor, prediction: str, min_snr_gamma: Optional[float] = None,
                 clean_error_weight_cap: Optional[float] = None) -> Optional[torch.Tensor]:
    """Each sample's loss weight at its noise level, or None for the plain MSE.

    The MSE of an eps (v) prediction carries the error in the clean latents with a factor SNR (SNR + 1),
    SNR_t = a_t / (1 - a_t). Min-SNR-gamma caps that factor at gamma (Hang et al. 2023, "Efficient
    Diffusion Training via Min-SNR Weighting Strategy", eq. 8): the easy low-noise timesteps stop
    dominating the gradient. `clean_error_weight_cap` raises it to at least min(1, cap * SNR), so the
    noisiest steps, where a sampler decides the layout, train on where things go."""
    if min_snr_gamma is None and clean_error_weight_cap is None:
        return None
    snr = alphas_cumprod / (1 - alphas_cumprod)
    factor = snr + 1 if prediction == "v" else snr  # output MSE per clean-latent MSE
    clean_weight = factor if min_snr_gamma is None else snr.clamp(max=min_snr_gamma)
    if clean_error_weight_cap is not None:
        clean_weight = torch.maximum(clean_weight, (clean_error_weight_cap * snr).clamp(max=1))
    return clean_weight / factor


def noised_prediction_loss(unet: nn.Module, latents: torch.Tensor, text_embeddings: torch.Tensor, batch: Batch,
                           schedule: torch.Tensor, prediction: str, min_snr_gamma: Optional[float] = None,
                           **conditioning) -> torch.Tensor:
    """Per-sample MSE (b,) of the UNet's eps (or v) prediction on noised `latents`, optionally Min-SNR-gamma
    weighted. `conditioning`: the UNet's `y` and `concat`. Draws batch.randn (noise), then batch.randint (t)."""
    noise, timesteps, a = draw_noise(latents, batch, schedule)
    noisy_latents, target = noised(latents, noise, a, prediction)
    per_sample = prediction_errors(unet(noisy_latents, timesteps, text_embeddings, **conditioning), target)
    weights = loss_weights(a.view(-1), prediction, min_snr_gamma)
    return per_sample if weights is None else per_sample * weights


@torch.no_grad()
def validation_grid(model_config: ModelConfig, unet, vae, text_encoder, prompts: list[str], size: int, steps: int,
                    seed: int, path: Path, guidance_scale: float = 5.0, sampler: str = DEFAULT_SAMPLER) -> None:
    """txt2img of `prompts` with the model as it trains, one row, saved to `path`."""
    from ..pipelines.api import StableDiffusion as Pipeline

    device = next(unet.parameters()).device
    pipe = Pipeline(model_config, unet, vae, text_encoder, device, torch.float32)
    result = pipe.txt2img(prompts, steps=steps, guidance_scale=guidance_scale, seed=seed, width=size, height=size,
                          batch_size=len(prompts), sampler=sampler, noise="diffusers")
    image_grid(result.images, columns=len(prompts), labels=prompts).save(path)
