"""Tiled VAE: the untiled image without seams, in less memory.

Naive tiling (each latent tile decoded on its own and the pieces put side by side) is the contrast that
shows the seam measure can fail: its tile borders stand out, ours do not.
"""

import contextlib
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from sdlab import devices
from sdlab.config import VAEConfig
from sdlab.devices import vae_decode_bytes
from sdlab.errors import InputError
from sdlab.models import tiling
from sdlab.models.tiling import Box, TiledVAE, decode_tiled, encode_tiled, tile_grid
from sdlab.models.vae import ResnetBlock
from test_img2img import sample_image
from test_vae import random_vae

torch.set_num_threads(1)  # the measured peaks are per-op allocations; threads only add noise to the timing

TWO_LEVELS = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
THREE_LEVELS = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)  # the x4 upscaler's depth
SD_SHAPED = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2)  # SD's VAE at a quarter of its width


def picture_latents(vae, width: int, height: int) -> torch.Tensor:
    """Latents of a structured picture (gradients, a disc, texture), as the decoder meets them."""
    from sdlab.pipelines.images import to_pixels

    with torch.no_grad():
        return vae.encode(to_pixels(sample_image(width, height))).mean


def naive_decode(vae, latents: torch.Tensor, tile: int) -> torch.Tensor:
    f = vae.config.downsample_factor
    out = torch.empty(latents.shape[0], 3, latents.shape[2] * f, latents.shape[3] * f)
    with torch.no_grad():
        for box in tile_grid(*latents.shape[-2:], tile):
            out[..., box.top * f:box.bottom * f, box.left * f:box.right * f] = vae.decode(
                latents[..., box.top:box.bottom, box.left:box.right])
    return out


def seam_ratio(images: torch.Tensor, columns: list[int], rows: list[int], pool: int) -> float:
    """Mean step between neighbouring `pool`-pixel blocks across the tile borders, over the mean step
    everywhere. Averaging blocks first lets a tile-wide shift (other GroupNorm statistics, zero padding
    at the tile's edge) stand out of a random decoder's pixel-level noise; borders are multiples of `pool`."""
    blocks = F.avg_pool2d(images, pool)
    dx = (blocks[..., :, 1:] - blocks[..., :, :-1]).abs()  # dx[..., j - 1]: from block j - 1 to block j
    dy = (blocks[..., 1:, :] - blocks[..., :-1, :]).abs()
    at_borders = torch.cat([dx[..., [c // pool - 1 for c in columns]].flatten(),
                            dy[..., [r // pool - 1 for r in rows], :].flatten()])
    return (at_borders.mean() / torch.cat([dx.flatten(), dy.flatten()]).mean()).item()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().byte().numpy()


def amplified(difference: torch.Tensor, gain: float) -> np.ndarray:
    """|difference| (largest over the channels) times `gain`, as a grey picture of the image's range."""
    grey = (difference[0].abs().amax(0) / 2 * gain * 255).clamp(0, 255).byte().numpy()
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.mark.parametrize("config", [TWO_LEVELS, THREE_LEVELS], ids=["2-levels", "3-levels"])
def test_tiled_decode_is_the_untiled_image_without_seams(config, tmp_path):
    vae = random_vae(config)
    f = config.downsample_factor
    latents = picture_latents(vae, 96 * f, 64 * f)  # 4 x 64 x 96 latents
    tile = 32
    with torch.no_grad():
        whole = vae.decode(latents)
        tiled = decode_tiled(vae, latents, tile=tile)
    naive = naive_decode(vae, latents, tile)
    difference = (tiled - whole).abs()
    # images span [-1, 1]: 1/255 of the range is 2/255
    assert difference.mean().item() < 2 / 255 / 100 and difference.max().item() < 1e-4
    assert np.abs(to_uint8(tiled).astype(int) - to_uint8(whole).astype(int)).max() <= 1
    cores = tile_grid(64, 96, tile)
    columns = sorted({box.left * f for box in cores} - {0})
    rows = sorted({box.top * f for box in cores} - {0})
    ratios = {name: seam_ratio(images, columns, rows, pool=4 * f)
              for name, images in (("whole", whole), ("tiled", tiled), ("naive", naive))}
    assert ratios["tiled"] == pytest.approx(ratios["whole"], rel=1e-3)
    assert ratios["tiled"] < 1  # no larger steps at the tile borders than elsewhere
    assert ratios["naive"] > 1.3  # the measure sees naive tiling's seams
    panel = np.concatenate([to_uint8(whole), to_uint8(tiled), to_uint8(naive),
                            amplified(naive - whole, 4), amplified(tiled - whole, 10_000)], axis=1)
    Image.fromarray(panel).save(tmp_path / f"tiled-decode-{len(config.ch_mult)}-levels.png")


def test_a_batch_keeps_each_image_its_own_statistics():
    vae = random_vae(TWO_LEVELS)
    latents = torch.cat([picture_latents(vae, 64, 48), 3 * torch.randn(1, 4, 24, 32)])
    with torch.no_grad():
        torch.testing.assert_close(decode_tiled(vae, latents, tile=8), vae.decode(latents), rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", [TWO_LEVELS, THREE_LEVELS], ids=["2-levels", "3-levels"])
def test_tiled_encode_is_the_untiled_posterior(config):
    vae = random_vae(config)
    f = config.downsample_factor
    images = torch.rand(2, 3, 40 * f, 24 * f) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(images)
        tiled = encode_tiled(vae, images, tile=8)
    torch.testing.assert_close(tiled.mean, whole.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(tiled.logvar, whole.logvar, rtol=0, atol=1e-5)


def test_tiles_run_the_vae_s_own_blocks(monkeypatch):
    """A change to ResnetBlock.forward reaches the tiled VAE: it runs the blocks, it does not restate them."""
    vae = random_vae(TWO_LEVELS)
    latents = picture_latents(vae, 64, 48)
    images = torch.rand(1, 3, 48, 64) * 2 - 1
    forward, calls = ResnetBlock.forward, []

    def brighter(block, x):
        calls.append(block)
        return forward(block, x) + 0.5

    monkeypatch.setattr(ResnetBlock, "forward", brighter)
    with torch.no_grad():
        whole, whole_latents = vae.decode(latents), vae.encode(images).mean
        calls.clear()
        tiled, tiled_latents = decode_tiled(vae, latents, tile=8), encode_tiled(vae, images, tile=8).mean
        monkeypatch.undo()
        plain = vae.decode(latents)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)
    torch.testing.assert_close(tiled_latents, whole_latents, rtol=0, atol=1e-5)
    assert (tiled - plain).abs().max() > 0.1  # the patch changed the image
    blocks = {m for m in vae.modules() if isinstance(m, ResnetBlock)}
    assert set(calls) == blocks  # every block, the mid blocks included, through its own forward


def test_tiles_cover_the_image_once():
    cores = tile_grid(50, 33, 16)
    covered = torch.zeros(50, 33, dtype=torch.int)
    for box in cores:
        assert 0 < box.bottom - box.top <= 16 and 0 < box.right - box.left <= 16
        covered[box.top:box.bottom, box.left:box.right] += 1
    assert torch.equal(covered, torch.ones_like(covered))
    assert Box(2, 6, 0, 4).grown(3, 7, 100) == Box(0, 7, 0, 7)


# -- memory -----------------------------------------------------------------------------------------


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage alive at once, at most, while the mode is on: every op's outputs are
    counted from their creation until the last tensor on their storage is garbage."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _release(self, key):
        self.live[key][1] -= 1
        if self.live[key][1] == 0:
            self.current -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.live[key][1] += 1
                weakref.finalize(tensor, self._release, key)
        return out


@contextlib.contextmanager
def peak_memory():
    """PeakMemory, with attention run as the fused kernel it is outside a Python mode (inside one, torch
    falls back to the math path and materialises the full attention matrix)."""
    fused = F.scaled_dot_product_attention
    mode = PeakMemory()

    def attention(*args, **kwargs):
        with _disable_current_modes():
            out = fused(*args, **kwargs)
        return out.clone()  # a copy the mode sees, so the output is counted

    F.scaled_dot_product_attention = attention
    try:
        with mode:
            yield mode
    finally:
        F.scaled_dot_product_attention = fused


@pytest.mark.parametrize("config, size", [(THREE_LEVELS, (256, 384)),
                                          pytest.param(SD_SHAPED, (512, 768), marks=pytest.mark.slow)],
                         ids=["3-levels", "sd-shaped"])
def test_tiles_need_about_half_the_memory(config, size):
    """Measured peaks (CPU, fp32, tile 32; U = one activation of the first level at full resolution):
    3 levels, 256x384: decode 6.0 U untiled, 2.9 U tiled; encode 5.0 U -> 2.4 U.
    SD-shaped, 512x768: decode 6.0 U (288 MiB) -> 2.75 U (132 MiB); encode 5.0 U (240 MiB) -> 2.3 U (110 MiB)."""
    vae = random_vae(config)
    f = config.downsample_factor
    height, width = size
    latents = torch.randn(1, 4, height // f, width // f)
    images = torch.rand(1, 3, height, width) * 2 - 1
    peaks = {}
    with torch.no_grad():
        for name, run in {"decode": lambda: vae.decode(latents), "decode_tiled": lambda: decode_tiled(vae, latents, 32),
                          "encode": lambda: vae.encode(images).mean,
                          "encode_tiled": lambda: encode_tiled(vae, images, 32).mean}.items():
            with peak_memory() as memory:
                run()
            peaks[name] = memory.peak
    assert peaks["decode"] == pytest.approx(vae_decode_bytes(config, height, width), rel=0.1)
    assert peaks["decode_tiled"] < 0.55 * peaks["decode"]
    assert peaks["encode_tiled"] < 0.55 * peaks["encode"]


# -- the wrapper ------------------------------------------------------------------------------------


def test_the_wrapper_tiles_as_told_and_gives_the_same_images(monkeypatch):
    vae = random_vae(TWO_LEVELS)
    latents = picture_latents(vae, 48, 32)
    images = torch.rand(1, 3, 32, 48) * 2 - 1
    calls = []
    monkeypatch.setattr(tiling, "decode_tiled", lambda *args: calls.append("decode") or vae.decode(args[1]))
    monkeypatch.setattr(tiling, "encode_tiled", lambda *args: calls.append("encode") or vae.encode(args[1]))
    with torch.no_grad():
        TiledVAE(vae, tiled=False).decode(latents)
        TiledVAE(vae, tiled=None).encode(images)
        assert calls == []
        TiledVAE(vae, tiled=True).decode(latents)
        TiledVAE(vae, tiled=True).encode(images)
        assert calls == ["decode", "encode"]
        monkeypatch.setattr(devices, "AUTO_TILE_PIXELS", 32 * 32)
        TiledVAE(vae).decode(latents)
        assert calls[-1] == "decode"
    assert next(TiledVAE(vae).parameters()) is next(vae.parameters())  # the pipeline reads the dtype from it


@pytest.mark.parametrize("tile", [0, -3, 2.5, True])
def test_tile_sizes_must_be_positive_integers(tile):
    with pytest.raises(InputError, match="tile must be a positive number of latent pixels"):
        decode_tiled(random_vae(TWO_LEVELS), torch.randn(1, 4, 8, 8), tile=tile)


def test_tiled_encoding_needs_sides_on_the_latent_grid():
    with pytest.raises(InputError, match="multiples of 2, got 33x32"):
        encode_tiled(random_vae(TWO_LEVELS), torch.zeros(1, 3, 32, 33))
