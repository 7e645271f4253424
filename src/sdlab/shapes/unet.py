"""`sdlab train unet` with the [shapes] section: the UNet trainer with the shapes model's extra terms,
each on through its weight (options.py), added through the trainer's hooks (sdlab.training.unet).

- `recolour_fraction` (recolour.py) noises some two-object samples from the picture with the two
  colours exchanged, the target staying the true picture: only the caption can say which object has
  which colour (`training_noise`);
- `grounding_loss` adds TokenCompose's token loss (grounding.py) on the cross-attention maps of the
  diffusion loss's own forward (`denoise`): each object's words are taught where in the picture to be read;
- `relation_contrast` and `relation_mirror_denoising` (relation_contrast.py) ask that a two-object
  caption predict its scene better than the same caption with its relation turned round, and that the
  turned caption not move what the latents already show;
- `scene_contrast` (scene_contrast.py) asks that it predict its picture better than a near miss of it.
"""

from __future__ import annotations

import torch

from ..models.attention import recorded_cross_attention
from ..training import diffusion, unet
from ..training.config import TrainConfig
from ..training.unet import DiffusionStep
from . import grounding, recolour, scene_contrast
from .options import ShapesOptions, shapes_options
from .relation_contrast import contrasted, mirrored_denoising, relation_contrast


class ShapesUNetTrainer(unet.UNetTrainer):
    @property
    def shapes(self) -> ShapesOptions:
        return shapes_options(self.config)

    def training_noise(self, step: DiffusionStep) -> torch.Tensor:
        """With `recolour_fraction`: the noise that takes the true latents to those of the recoloured
        picture's noisy latents, so the target stays the true picture's."""
        if not self.shapes.recolour_fraction:
            return step.noise
        a = step.alphas_cumprod
        recoloured = self.recoloured_latents(step)
        return step.noise + (a / (1 - a)).sqrt() * (recoloured - step.latents)

    def denoise(self, step: DiffusionStep) -> torch.Tensor:
        """With `grounding_loss`, the forward's cross-attention maps are kept for it."""
        if not self.shapes.grounding_loss:
            return super().denoise(step)
        with recorded_cross_attention(self.unet) as maps:
            output = super().denoise(step)
        step.records["attention_maps"] = maps
        return output

    def extra_losses(self, step: DiffusionStep) -> tuple[list[torch.Tensor], dict]:
        options = self.shapes
        device = step.batch.images.device
        terms, logs = [], {}

        def denoise_as(x, t, texts):  # the UNet under other captions (the relation terms' mirrors)
            return self.unet(x, t, self.encode_text(texts, device))

        if options.relation_contrast:
            contrast, contrast_logs = relation_contrast(
                denoise_as, step.noisy_latents, step.timesteps, step.captions, step.target, step.errors,
                temperature=options.relation_contrast_temperature,
                min_timestep=options.relation_contrast_min_timestep)
            logs.update(contrast_logs)
            terms.append(options.relation_contrast * contrast)
        if options.relation_mirror_denoising:
            mirror, mirror_logs = mirrored_denoising(
                denoise_as, step.noisy_latents, step.timesteps, step.captions, step.target,
                min_timestep=options.relation_contrast_min_timestep)
            logs.update(mirror_logs)
            terms.append(options.relation_mirror_denoising * mirror)
        if options.scene_contrast:
            contrast, contrast_logs = self.scene_contrast_term(step)
            logs.update(contrast_logs)
            terms.append(options.scene_contrast * contrast)
        if options.grounding_loss:
            weights = grounding.timestep_weights(step.timesteps, self.model_config.schedule.num_train_timesteps,
                                                 options.grounding_weighting)
            logs["grounding"] = grounding.grounding_loss(
                step.records["attention_maps"], step.batch.images, diffusion.token_ids(self.model_config, step.captions),
                weights, options.grounding_place_words, options.grounding_words, options.grounding_captions)
            terms.append(options.grounding_loss * logs["grounding"])
        return terms, logs

    def scene_contrast_term(self, step: DiffusionStep) -> tuple[torch.Tensor, dict]:
        """`scene_contrast`: the captioned two-object samples at timesteps >= `scene_contrast_min_timestep`
        against near misses of their pictures, noised with their own noise at their own timestep and
        denoised under their own caption."""
        options, batch, errors = self.shapes, step.batch, step.errors
        kinds, choices, places = batch.rand(), batch.rand(), batch.rand()  # drawn every step, used or not
        # the two-object samples are those whose caption states a relation, as the relation contrast's
        chosen = [i for i, _ in contrasted(step.captions, step.timesteps, options.scene_contrast_min_timestep)]
        index = torch.tensor(chosen, dtype=torch.long, device=step.timesteps.device)
        if chosen:
            with torch.no_grad():
                misses, made = scene_contrast.near_misses(batch.images[index], kinds[index], choices[index],
                                                          places[index])
                index, misses = index[made.to(index.device)], misses[made]
        if len(index) == 0:
            return scene_contrast.scene_contrast(errors[:0], errors[:0].detach(), options.scene_contrast_temperature,
                                                 len(step.captions))
        with torch.no_grad():
            miss_latents = diffusion.scaled_latents(self.vae.encode(misses), step.eps[index],
                                                    self.model_config.vae.scaling_factor)
        noisy, target = diffusion.noised(miss_latents, step.noise[index], step.alphas_cumprod[index],
                                         self.model_config.prediction)
        output = self.unet(noisy, step.timesteps[index], step.text_embeddings[index])
        miss_errors = diffusion.prediction_errors(output, target)
        return scene_contrast.scene_contrast(errors[index], miss_errors, options.scene_contrast_temperature,
                                             len(step.captions))

    @torch.no_grad()
    def recoloured_latents(self, step: DiffusionStep) -> torch.Tensor:
        """The latents with a `recolour_fraction` of the captioned two-object samples at timesteps >=
        `recolour_min_timestep` replaced by the latents of their picture with its colours exchanged."""
        options, batch, timesteps = self.shapes, step.batch, step.timesteps
        captioned = torch.tensor([bool(caption) for caption in step.captions], device=timesteps.device)
        candidates = ((batch.rand() < options.recolour_fraction) & captioned
                      & (timesteps >= options.recolour_min_timestep))
        if not candidates.any():
            return step.latents
        swapped, swappable = recolour.swap_object_colours(batch.images[candidates])
        pick = torch.nonzero(candidates).flatten()[swappable]
        if len(pick) == 0:
            return step.latents
        out = step.latents.clone()
        out[pick] = diffusion.scaled_latents(self.vae.encode(swapped[swappable]), step.eps[pick],
                                             self.model_config.vae.scaling_factor)
        return out


def build(config: TrainConfig, device: torch.device) -> ShapesUNetTrainer:
    return unet.build(config, device, ShapesUNetTrainer)
