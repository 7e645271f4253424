"""`sdlab train vae`: the KL autoencoder of latent diffusion (Rombach et al. 2022, section 3 and
appendix G; the loss of `ldm/modules/losses/contperceptual.py` without its LPIPS term).

    loss = l1 |x - x̂| + l2 (x - x̂)^2 + kl_weight KL(q(z|x) || N(0, I))            per pixel
         + adaptive_weight * disc_weight * (-D(x̂))                                  from disc_start
    critic: hinge(D(x), D(x̂)), trained in the same step on the detached reconstruction

With `train_decoder_only` the encoder is --base's and frozen: only the reconstruction terms train the
decoder, the KL term (which only the encoder can change) is still logged, and the file keeps --base's
scaling factor, so UNets trained in that latent space keep working.

The small KL weight keeps the latent space near N(0, I) without blurring reconstructions. The adaptive
weight (Esser et al. 2021, "Taming Transformers", eq. 7) balances the adversarial gradient against the
reconstruction gradient at the decoder's last layer. At the end, the scaling factor that gives the UNet
unit-variance latents (1 / std of posterior samples; SD's 0.18215) is measured and stored in the file.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..config import ModelConfig
from ..errors import ConfigError
from . import components, distributed
from .config import TrainConfig, VAEOptions
from .data import Batch
from .discriminator import PatchDiscriminator, hinge_d_loss
from .plots import image_grid, tensor_to_image


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||∇_L rec|| / ||∇_L g|| at the decoder's last layer L, clamped to [0, 1e4] (taming's numbers).

    The two gradients are averaged over ranks first, so the weight is that of the global batch."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    rec_grad, g_grad = distributed.mean_over_ranks(rec_grad), distributed.mean_over_ranks(g_grad)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class VAETrainer(nn.Module):
    default_ema_decay = 0.0  # ldm trained its autoencoders without EMA

    def __init__(self, config: TrainConfig, model: ModelConfig, vae: nn.Module):
        super().__init__()
        self.config, self.options, self.model_config = config, config.options, model
        self.resolution = model.resolution
        self.model = vae
        trained = {"vae": vae}
        if self.options.disc_start is not None:
            self.discriminator = PatchDiscriminator(model.vae.out_channels, self.options.disc_channels,
                                                    self.options.disc_layers)
            trained["discriminator"] = self.discriminator
        else:
            self.discriminator = None
        self.trained = nn.ModuleDict(trained)
        if self.options.train_decoder_only:
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)

    def loss(self, batch: Batch):
        options: VAEOptions = self.options
        images = batch.images
        with torch.set_grad_enabled(torch.is_grad_enabled() and not options.train_decoder_only):
            posterior = self.model.encode(images)
        eps = batch.randn(*posterior.mean.shape[1:]).to(posterior.mean.dtype)
        latents = posterior.mean + posterior.std * eps  # a posterior sample; eps drawn for the global batch
        reconstruction = self.model.decode(latents).float()
        error = reconstruction - images
        rec_loss = options.l1_weight * error.abs().mean() + options.l2_weight * error.pow(2).mean()
        kl_loss = posterior.kl().float().mean() / images[0].numel()  # per-sample KL sum, per pixel
        loss = rec_loss + options.kl_weight * kl_loss
        logs = {"rec": rec_loss, "kl": kl_loss}
        if self.discriminator is not None and batch.step >= options.disc_start:
            # generator term: the critic's weights are held fixed, only the reconstruction gets gradients
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            g_loss = -functional_call(self.discriminator, frozen, (reconstruction,)).float().mean()
            weight = adaptive_weight(rec_loss, g_loss, self.model.decoder.conv_out.weight) * options.disc_weight
            d_loss = hinge_d_loss(self.discriminator(images).float(), self.discriminator(reconstruction.detach()).float())
            loss = loss + weight * g_loss + d_loss
            logs.update(g=g_loss, d=d_loss, d_weight=weight)
        return loss, logs

    @torch.no_grad()
    def validate(self, model: nn.Module, examples, step: int, out_dir: Path) -> None:
        """Originals on top, their reconstructions (posterior means) below."""
        device = next(model.parameters()).device
        images = torch.stack([image for image, _ in examples]).to(device)
        reconstructions = model.decode(model.encode(images).mean)
        tiles = [tensor_to_image(t) for t in [*images, *reconstructions]]
        image_grid(tiles, columns=len(examples)).save(Path(out_dir) / f"step-{step:06d}.png")

    @torch.no_grad()
    def scaling_factor(self, model: nn.Module, data) -> float:
        """1 / std of posterior samples over `scale_batches` batches (Rombach et al. 2022, section 4.3.2:
        the rescaling SD's 0.18215 comes from), with the first samples of the data stream."""
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.config.seed)
        latents = []
        for b in range(self.options.scale_batches):
            numbers = range(b * self.config.batch_size, (b + 1) * self.config.batch_size)
            images = torch.stack([data[n][0] for n in numbers]).to(device)
            posterior = model.encode(images)
            eps = torch.randn(posterior.mean.shape, generator=generator).to(device)
            latents.append((posterior.mean + posterior.std * eps).float().cpu())
        return 1.0 / torch.cat(latents).std().item()

    def save(self, out_dir: Path, model: nn.Module, data) -> Path:
        model.eval()
        if self.options.train_decoder_only:  # the encoder did not move: build() took --base's scale
            scale, how = self.model_config.vae.scaling_factor, "kept from --base"
        else:
            scale, how = self.scaling_factor(model, data), "1/std"
        print(f"sdlab: latent scaling factor {how} = {scale:.5f}", file=sys.stderr)
        config = self.model_config.replace(vae=dataclasses.replace(self.model_config.vae, scaling_factor=scale))
        return components.save_model(out_dir, config, self.config, {"vae": model})


def build(config: TrainConfig, device: torch.device) -> VAETrainer:
    if config.options.l1_weight <= 0 and config.options.l2_weight <= 0:
        raise ConfigError("the VAE needs a reconstruction loss: set vae.l1_weight or vae.l2_weight above 0")
    if config.options.train_decoder_only and not (config.init_from_base and config.base):
        raise ConfigError("vae.train_decoder_only fine-tunes --base's decoder: set init_from_base = true "
                          "and give --base")
    base = components.base_config(config)
    model = components.model_config(config, "vae", base)
    if config.options.train_decoder_only:  # the latent space is --base's, whatever the recipe's model says
        model = model.replace(vae=dataclasses.replace(model.vae, scaling_factor=base.vae.scaling_factor))
    vae = components.starting_part(config, "vae", model)
    if config.options.initial_logvar is not None and not config.init_from_base:
        with torch.no_grad():  # quant_conv's output is (means, log-variances), z_channels each
            vae.quant_conv.bias[model.vae.z_channels:] = config.options.initial_logvar
    return VAETrainer(config, model, vae).to(device)
