"""Relation contrast: the caption must predict its own scene better than the caption turned round.

Plain MSE hardly teaches a small model which of two objects a caption puts where. The bundled model's
prediction for "a blue square above a yellow triangle" was the same as for "... below ..." at every
noise level (MODEL_CARD.md), because at the noisiest steps, where a sampler settles the layout, knowing
the direction lowers the expected error by a fraction of a percent, and at the others the noisy
latents already show it. Its gradient towards reading the relation is lost in the rest.

This term asks for that difference alone. For each captioned sample whose caption states a relation,
at a timestep >= the minimum, the same noisy latents are also denoised under the mirrored caption
(`dataset.mirrored_caption`: "above" <-> "below", "left" <-> "right", the caption of the mirrored
scene). With e and e' the sample's mean squared errors under its caption and under the mirror, and s
their mean held constant, the two captions are scored as a two-way softmax over -e / (tau s) and the
loss is the cross-entropy of the true one:

    softplus((e - e') / (tau s)) = -log sigmoid((e' - e) / (tau s))

It is log 2 while the model ignores the relation and fades once the true caption's error is a few
tau below the mirror's (relative to s, so every noise level counts alike); nothing pulls the mirror's
prediction further once the captions are told apart. The same idea, a denoising error that must rank
the right caption first, is the diffusion classifier's (Li et al. 2023, "Your Diffusion Model is
Secretly a Zero-Shot Classifier"), used here as a training signal on hard negatives.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .dataset import mirrored_caption


def contrasted(captions: list[str], timesteps: torch.Tensor, min_timestep: int) -> list[tuple[int, str]]:
    """(index, mirrored caption) of the samples the term trains: a caption that states a relation
    (dropped captions are empty and state none), at a timestep >= `min_timestep`."""
    pairs = []
    for i, caption in enumerate(captions):
        mirror = mirrored_caption(caption) if caption else None
        if mirror is not None and int(timesteps[i]) >= min_timestep:
            pairs.append((i, mirror))
    return pairs


def _denoise_mirrored(denoise, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                      pairs: list[tuple[int, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, the model's float output for those samples under their mirrored captions)."""
    index = torch.tensor([i for i, _ in pairs], device=noisy_latents.device)
    return index, denoise(noisy_latents[index], timesteps[index], [mirror for _, mirror in pairs]).float()


def relation_contrast(denoise: Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor],
                      noisy_latents: torch.Tensor, timesteps: torch.Tensor, captions: list[str],
                      target: torch.Tensor, errors: torch.Tensor, temperature: float,
                      min_timestep: int) -> tuple[torch.Tensor, dict]:
    """The term summed over the contrasted samples and divided by the batch size, and its logs.

    `denoise(x, t, captions)` is the model's output for those captions; `errors` (b,) each sample's
    mean squared error against `target` under its own caption, with gradients."""
    pairs = contrasted(captions, timesteps, min_timestep)
    if not pairs:  # the same log names every step: ranks and micro-batches average them name by name
        zero = errors.sum() * 0
        return zero, {"relation_contrast": zero.detach(), "relation_margin": zero.detach()}
    index, mirrored = _denoise_mirrored(denoise, noisy_latents, timesteps, pairs)
    mirror_error = (mirrored - target[index]).pow(2).mean(dim=tuple(range(1, target.dim())))
    loss, margin = ranking_loss(errors[index], mirror_error, temperature)
    return loss.sum() / len(captions), {"relation_contrast": loss.mean().detach(),
                                        "relation_margin": margin.mean().detach()}


def ranking_loss(true_errors: torch.Tensor, other_errors: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (n,): softplus((e - e') / (tau s)), the cross-entropy of the true pair in a two-way
    softmax over -error / (tau s), s the two errors' mean held constant; and the margin (e' - e) / s."""
    scale = ((true_errors + other_errors) / 2).detach().clamp_min(torch.finfo(true_errors.dtype).tiny)
    margin = (other_errors - true_errors) / scale
    return F.softplus(-margin / temperature), margin


def below_contrast(captions: list[str], timesteps: torch.Tensor, min_timestep: int) -> list[tuple[int, str]]:
    """(index, mirrored caption) of the relation samples the contrast leaves out: timestep < `min_timestep`."""
    pairs = contrasted(captions, timesteps, 0)
    return [(i, mirror) for i, mirror in pairs if int(timesteps[i]) < min_timestep]


def mirrored_denoising(denoise: Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor],
                       noisy_latents: torch.Tensor, timesteps: torch.Tensor, captions: list[str],
                       target: torch.Tensor, min_timestep: int) -> tuple[torch.Tensor, dict]:
    """Below the contrast's timesteps, the mirrored caption must denoise the latents as they are.

    Once a sampler has settled the layout, the noisy latents show where each object is, and a caption
    that says otherwise must not move them: the pictures the model is trained on never disagree with
    their caption, so nothing else says what to do when they do, and a model taught by the contrast to
    follow the words draws the object a second time where the words put it. Each relation sample at a
    timestep < `min_timestep` is also denoised under its mirrored caption against the same target; the
    term is those mean squared errors summed and divided by the batch size, unweighted (the diffusion
    loss's min-SNR weights, which lower the least noisy samples, are not applied here)."""
    pairs = below_contrast(captions, timesteps, min_timestep)
    if not pairs:
        zero = noisy_latents.new_zeros(())
        return zero, {"mirror_denoising": zero}
    index, mirrored = _denoise_mirrored(denoise, noisy_latents, timesteps, pairs)
    errors = (mirrored - target[index]).pow(2).mean(dim=tuple(range(1, target.dim())))
    return errors.sum() / len(captions), {"mirror_denoising": errors.mean().detach()}
