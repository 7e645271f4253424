"""The latent space: an image's latent channels as pictures, and walks between two starting noises
(spherical interpolation) or between two prompts' encodings (linear), each point generated.

Slerp, not lerp, between Gaussian noises: a straight line between two independent draws passes
through vectors of about 1/sqrt(2) their norm, noise the model never saw at that sigma; the great
circle keeps the norm (Shoemake 1985; used for GAN and diffusion latents since White 2016,
"Sampling Generative Networks").
"""

from __future__ import annotations

import torch
from PIL import Image

from ..errors import InputError
from ..pipelines.images import load_image, resize_image, to_pixels
from ..pipelines.latents import decode_latents, encode_posterior
from ..pipelines.seeds import NoiseDraws
from ..pipelines.text import encode_text
from .sheets import channel_picture, labelled_grid


@torch.no_grad()
def latent_channels_picture(pipe, image) -> Image.Image:
    """The image (at the model's resolution), its VAE round trip, and each latent channel in greyscale."""
    size = pipe.config.resolution
    image = resize_image(load_image(image, "image"), size, size, "crop")
    z0 = encode_posterior(pipe, to_pixels(image)).mean.float().cpu() * pipe.config.vae.scaling_factor
    decoded = decode_latents(pipe, z0)[0]
    channels = [channel_picture(c).resize(image.size, Image.Resampling.NEAREST) for c in z0[0]]
    labels = ["original", "decoded latent"] + [f"channel {i}\n{c.min():.2f} .. {c.max():.2f}"
                                                for i, c in enumerate(z0[0])]
    return labelled_grid([[image, decoded, *channels]], column_labels=labels,
                         title=f"Latents: {tuple(z0.shape[1:])} for a {image.width}x{image.height} image")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1) along the great circle between them."""
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum() / (a64.norm() * b64.norm())
    angle = torch.arccos(cos.clamp(-1, 1))
    if angle < 1e-4:  # nearly parallel: the circle is a line
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    return ((torch.sin((1 - t) * angle) * a64 + torch.sin(t * angle) * b64) / torch.sin(angle)).to(a.dtype)


def fractions(frames: int) -> list[float]:
    if not isinstance(frames, int) or frames < 2:
        raise InputError(f"an interpolation needs 2 frames or more, got {frames!r}")
    return [i / (frames - 1) for i in range(frames)]


def interpolate_seeds(pipe, prompt: str, seeds: tuple[int, int], frames: int, **settings) -> list[Image.Image]:
    """`frames` images of `prompt`, their starting noise slerped from seeds[0]'s to seeds[1]'s."""
    size = settings.get("width") or pipe.config.resolution, settings.get("height") or pipe.config.resolution
    shape = (pipe.config.latent_channels, size[1] // pipe.latent_factor, size[0] // pipe.latent_factor)
    noise = [NoiseDraws(settings.get("noise", "diffusers"), seed, 1, shape).initial() for seed in seeds]
    return [pipe.txt2img(prompt, latents=slerp(noise[0], noise[1], t), seed=seeds[0], **settings).images[0]
            for t in fractions(frames)]


def interpolate_prompts(pipe, prompts: tuple[str, str], frames: int, negative_prompt: str = "",
                        **settings) -> list[Image.Image]:
    """`frames` images from one seed, conditioned on text embeddings moving linearly from prompts[0]'s
    encoding to prompts[1]'s (both CFG halves' negative prompt fixed)."""
    steps = fractions(frames)
    encoded = [encode_text(pipe, [prompt], [negative_prompt], settings.get("clip_skip", 1)) for prompt in prompts]
    (cond_a, uncond), (cond_b, _) = encoded
    if cond_a.shape != cond_b.shape:
        raise InputError("the two prompts encode to different lengths (one is over 75 tokens); shorten it")
    return [pipe.txt2img(prompts[0] if t < 0.5 else prompts[1], negative_prompt,
                         text_embeddings=(torch.lerp(cond_a, cond_b, t), uncond), **settings).images[0]
            for t in steps]


def interpolation_strip(images: list[Image.Image], start: str, end: str) -> Image.Image:
    labels = [f"{i / (len(images) - 1):.2f}" for i in range(len(images))]
    return labelled_grid([images], column_labels=labels, title=f"{start}  ->  {end}")
