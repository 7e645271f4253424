"""What a generation needs in memory, and refusing one that cannot fit before anything large is allocated.

A request the machine cannot hold should fail in a second with one line, not grow until the kernel
kills this process (or, on a shared machine, another one). `generation_memory` estimates the peak of
one generation from the model's config and the request alone, so the CLI can check before the model
loads and the pipelines before they allocate; `check_generation_fits` compares it with the device's
free memory and with `Limits`, hard caps that hold whatever the memory (a server sets its own).

The estimate is an upper bound calibrated on CPU (fp32) against two measurements: live tensor bytes
(tests/test_tiling.py's PeakMemory dispatch mode) and the process's peak RSS (tests/test_memory_limits.py).
A generation's phases run one after another, so its peak is the weights plus the largest phase:
- text encoding: every prompt and negative prompt through the text encoder;
- sampling: one UNet call on batch x 2 latents (classifier-free guidance), its activations growing
  with the largest level's (channels x pixels); attention is torch's scaled_dot_product_attention
  (models/attention.py), whose CPU and CUDA kernels never hold the (tokens x tokens) matrix: measured
  peaks grow linearly with the pixel count. Other devices (MPS) run the math path, which does; there it
  is counted. So do hooked layers (attention maps, prompt-to-prompt: models/attention.py's
  attention_hooks), which compute their probabilities explicitly: a hooked self-attention holds
  (batch x heads x pixels x pixels) numbers several times over, 3 GiB at 512 px for SD 1.5 and 16 GiB
  at 768 px, which `hooked_attention` finds and the estimate counts;
- decoding: the VAE on the whole batch, untiled or tiled (devices.vae_decode_bytes; its mid-block
  attention runs on the whole latent, fused as the UNet's), then the images turned into 8-bit pictures.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .config import DEFAULT_MAX_PIXELS, ModelConfig
from .devices import available_memory_bytes, proc_bytes, vae_decode_bytes, wants_tiled_vae
from .errors import TooLargeError

# Live tensor bytes of one UNet call at its peak, in units of the widest level's activation (batch x
# channels x pixels), measured with PeakMemory on SD-shaped and the bundled UNets at 32-96 latent px:
# 24-25 where the level has a transformer (the feed-forward's GEGLU holds 8x its width, plus the skip
# connections of the way down), 15-15.3 where it has ResBlocks only (the x4 upscaler's first level).
UNET_PEAK_WITH_ATTENTION = 25
UNET_PEAK_RESBLOCKS = 16
# The CLIP/OpenCLIP encoder's peak per token, in units of its width (the MLP's 4x hidden, its input,
# the residual stream, q/k/v): small beside the UNet except for large batches of tiny images.
TEXT_PEAK = 12
# Peak RSS over live tensor bytes: the allocator keeps freed blocks and oneDNN its scratch space. One
# UNet call measured 1.3 (192 latent px) to 1.6 (64 px) on the bundled UNet; whole generations need 2,
# since the decode can reuse only part of what sampling freed (glibc keeps its heap); 2.5 keeps the
# estimate above the 420-570 MB measured from run to run for a 384 px bundled generation.
ALLOCATOR_SLACK = 2.5
# The first generation's one-off costs: the tokenizer's tables, the kernel libraries' lazy set-up, the
# checkpoint's pages mapped while loading. Measured 100-170 MiB above the weights (CPU, bundled model).
RUNTIME_BYTES = 192 * 2**20
# An explicitly computed attention (a hooked layer) holds q k^T, its scaled copy and their softmax at once.
EXPLICIT_ATTENTION_COPIES = 3
# Latent-sized tensors alive while sampling: x, denoised, derivative, step noise, the CFG halves ...
LATENT_COPIES = 12
# Bytes per output pixel after decoding: the decoded float image, its clamped and scaled copies
# (pipelines.latents.decode_latents), the 8-bit picture and the grid it may join.
IMAGE_BYTES_PER_PIXEL = 4 * 3 * 4 + 3 + 3 + 3


@dataclass(frozen=True)
class Limits:
    """Hard caps on a request, whatever the free memory; None: no cap. The CLI's are --max-pixels and
    --max-batch; a server gives its own."""

    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS  # width x height of one image
    max_batch: Optional[int] = None  # images per run
    max_steps: Optional[int] = None  # denoising steps per run


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one generation needs at its peak, by part. `total` = weights + the largest phase."""

    weights: int
    runtime: int
    text: int
    sampling: int
    decoding: int
    tiled_vae: bool

    @property
    def work(self) -> int:
        """What the run allocates beyond the weights."""
        return self.runtime + max(self.text, self.sampling, self.decoding)

    @property
    def total(self) -> int:
        return self.weights + self.work


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@functools.lru_cache(maxsize=16)
def parameter_counts(config: ModelConfig) -> tuple[int, int, int]:
    """(UNet, VAE, text encoder) parameter and buffer element counts, from modules built on the meta
    device: exact for every config, and nothing is allocated."""
    from .models import build_text_encoder, build_unet, build_vae
    from .models.empty import empty_modules

    def count(module: torch.nn.Module) -> int:
        return sum(t.numel() for t in (*module.parameters(), *module.buffers()))

    with empty_modules():
        return count(build_unet(config.unet)), count(build_vae(config.vae)), count(build_text_encoder(config.text))


def vae_dtype_for(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype as pipelines.pipeline.load_pipeline places it: fp32 on the CPU, else the compute dtype."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


def model_weights_bytes(config: ModelConfig, dtype: torch.dtype = torch.float32,
                        device: torch.device = torch.device("cpu")) -> int:
    unet, vae, text = parameter_counts(config)
    return (unet + text) * element_size(dtype) + vae * element_size(vae_dtype_for(device, dtype))


def unet_call_bytes(config: ModelConfig, latent_height: int, latent_width: int, batch_size: int,
                    dtype: torch.dtype, attention_matrix: bool = False, hooked: frozenset[str] = frozenset()) -> int:
    """Live tensor bytes of one UNet call on `batch_size` latents: the largest level's activation times
    the calibrated factor. `attention_matrix`: the attention kernel holds (batch, heads, N, N) scores.
    `hooked`: the kinds of attention ("self", "cross") computed explicitly, their probabilities held
    (batch, heads, N, N or text tokens) EXPLICIT_ATTENTION_COPIES times."""
    unet = config.unet
    peak, scores = 0, 0
    for level, mult in enumerate(unet.channel_mult):
        channels = unet.model_channels * mult
        pixels = math.ceil(latent_height / 2**level) * math.ceil(latent_width / 2**level)
        attention = level in unet.attention_levels
        factor = UNET_PEAK_WITH_ATTENTION if attention else UNET_PEAK_RESBLOCKS
        peak = max(peak, factor * channels * pixels)
        if not attention:
            continue
        heads = unet.heads_at(channels)[0]
        self_attention = not (unet.disable_self_attention and unet.disable_self_attention[level])
        if self_attention and "self" in hooked:
            scores = max(scores, EXPLICIT_ATTENTION_COPIES * heads * pixels * pixels)
        elif attention_matrix and self_attention:
            scores = max(scores, heads * pixels * pixels)
        if "cross" in hooked:
            scores = max(scores, EXPLICIT_ATTENTION_COPIES * heads * pixels * config.text.context_length)
    return batch_size * (peak + scores) * element_size(dtype)


def hooked_attention(unet: torch.nn.Module) -> frozenset[str]:
    """Which kinds of attention ("self", "cross") of `unet` have a hook set now, and so compute their
    probabilities explicitly instead of in the fused kernel."""
    from .models.attention import attention_sites

    return frozenset("cross" if site.cross else "self" for layer, site in attention_sites(unet)
                     if layer.hook is not None)


def generation_memory(config: ModelConfig, width: int, height: int, batch_size: int = 1, *,
                      guidance: bool = True, dtype: torch.dtype = torch.float32,
                      device: torch.device = torch.device("cpu"), tiled_vae: bool = False,
                      hooked: frozenset[str] = frozenset()) -> MemoryEstimate:
    """The peak bytes of generating `batch_size` width x height images with `config`'s model on `device`
    in `dtype` (the UNet's and text encoder's; the VAE's follows load_pipeline), by phase.

    guidance: classifier-free guidance runs the UNet on the conditional and unconditional halves at
    once (any scale but 1). tiled_vae: whether the decode runs in tiles (devices.wants_tiled_vae decides
    when the caller does not know). hooked: the attention kinds computed explicitly (hooked_attention).
    img2img's, inpainting's and hires's encodes need less than the decode.
    """
    device = torch.device(device)
    factor = config.vae.downsample_factor
    latent_height, latent_width = math.ceil(height / factor), math.ceil(width / factor)
    unet_batch = batch_size * (2 if guidance else 1)
    attention_matrix = device.type not in ("cpu", "cuda")
    size = element_size(dtype)

    text_tokens = unet_batch * config.text.context_length
    text = TEXT_PEAK * text_tokens * config.text.width * size
    conditioning = text_tokens * config.unet.context_dim * size
    latents = LATENT_COPIES * batch_size * config.latent_channels * latent_height * latent_width * 4
    unet = unet_call_bytes(config, latent_height, latent_width, unet_batch, dtype, attention_matrix, hooked)
    vae_dtype = vae_dtype_for(device, dtype)
    vae = vae_decode_bytes(config.vae, height, width, batch_size, vae_dtype, tiled=tiled_vae)
    if attention_matrix:  # the VAE's single-head attention on the whole latent, scores and softmax
        vae += 2 * batch_size * (latent_height * latent_width) ** 2 * element_size(vae_dtype)
    images = IMAGE_BYTES_PER_PIXEL * batch_size * height * width
    return MemoryEstimate(
        weights=model_weights_bytes(config, dtype, device),
        runtime=RUNTIME_BYTES,
        text=int(ALLOCATOR_SLACK * text),
        sampling=int(ALLOCATOR_SLACK * (unet + conditioning + latents)),
        decoding=int(ALLOCATOR_SLACK * (vae + latents)) + images,
        tiled_vae=tiled_vae,
    )


def generation_memory_bytes(config: ModelConfig, width: int, height: int, batch_size: int = 1, *,
                            guidance: bool = True, dtype: torch.dtype = torch.float32,
                            device: torch.device = torch.device("cpu"), tiled_vae: bool = False) -> int:
    """`generation_memory(...).total`: the peak bytes, weights included."""
    return generation_memory(config, width, height, batch_size, guidance=guidance, dtype=dtype, device=device,
                             tiled_vae=tiled_vae).total


def check_limits(width: int, height: int, batch_size: int, steps: Optional[int] = None,
                 limits: Limits = Limits()) -> None:
    """Refuse a request beyond `limits` (TooLargeError, one line saying which option raises the cap)."""
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise TooLargeError(
            f"{width}x{height} is {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{limits.max_pixels / 1e6:.1f} (--max-pixels {limits.max_pixels}): use a smaller size "
            "(or a hires fix/upscale of a smaller image), or raise --max-pixels")
    if limits.max_batch is not None and batch_size > limits.max_batch:
        raise TooLargeError(f"a batch of {batch_size} images is above the limit of {limits.max_batch} (--max-batch): "
                            "run fewer images at a time, or raise --max-batch")
    if limits.max_steps is not None and steps is not None and steps > limits.max_steps:
        raise TooLargeError(f"{steps} steps is above the limit of {limits.max_steps}: use fewer steps")


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident memory: Linux's VmHWM (ru_maxrss would carry a forking parent's peak
    across exec), else ru_maxrss; None where neither is known."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def gib(n: int) -> str:
    """Bytes in the binary unit that reads best: 39 MiB, 4.0 GiB, 14.8 TiB."""
    if n < 2**30:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**30:.1f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"


def check_generation_fits(config: ModelConfig, width: int, height: int, batch_size: int,
                          device: torch.device, dtype: torch.dtype, *, guidance: bool = True,
                          tiled_vae: Optional[bool] = None, steps: Optional[int] = None,
                          limits: Limits = Limits(), weights_loaded: bool = False,
                          hooked: frozenset[str] = frozenset()) -> MemoryEstimate:
    """Refuse, with one line, a generation that cannot fit in `device`'s free memory or breaks `limits`.

    Call it before anything large is allocated: with `weights_loaded` False before the model loads
    (its weights count as needed), True once they are in memory (the free memory already excludes
    them). tiled_vae: True/False as the user chose, None lets devices.wants_tiled_vae decide as the
    pipeline will. hooked: the attention kinds computed explicitly (hooked_attention(pipe.unet)).
    Returns the estimate. Unknown free memory (e.g. MPS) leaves only the limits.
    """
    device = torch.device(device)
    free = available_memory_bytes(device)
    tiled = wants_tiled_vae(config.vae, height, width, batch_size, vae_dtype_for(device, dtype), device, tiled_vae)
    estimate = generation_memory(config, width, height, batch_size, guidance=guidance, dtype=dtype,
                                 device=device, tiled_vae=tiled, hooked=hooked)
    needed = estimate.work if weights_loaded else estimate.total
    if free is not None and needed > free:
        images = f"{batch_size} {width}x{height} images" if batch_size > 1 else f"a {width}x{height} image"
        advice = "a smaller size or batch"
        if "self" in hooked:
            advice = "a smaller size or batch (the self-attention maps asked for hold every pixel pair)"
        if not tiled:
            advice += ", the tiled VAE (--tiled-vae)"
        if device.type == "cpu":
            advice += ", or a GPU (--device cuda)"
        parts = (f"weights {gib(estimate.weights)}, " if not weights_loaded else "") + (
            f"UNet {gib(estimate.sampling)}, VAE {gib(estimate.decoding)}")
        raise TooLargeError(f"{images} would need about {gib(needed)} ({parts}) but {device.type} has "
                            f"{gib(free)} free: use {advice}")
    check_limits(width, height, batch_size, steps, limits)
    return estimate
