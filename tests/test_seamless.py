"""Seamless tiling makes the UNet and the VAE work on a torus.

The specification is shift equivariance: rolling the input round by k pixels rolls the output round by
k (scaled by the network's resolution change), exactly, which holds only if no layer sees an edge.
Without seamless the zero padding breaks it. The web UI's way (padding_mode "circular" on every conv)
is the oracle for the convs; the VAE encoder's hand-padded downsampling is what it misses.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sdlab

from sdlab.config import VAEConfig
from sdlab.errors import InputError
from sdlab.models.seamless import apply_seamless, seamless
from sdlab.models.vae import AutoencoderKL
from test_unet import TINY_SD1, random_unet

# 3 levels: latents must be rolled by multiples of 4, the UNet's total downsampling
UNET_STEP = 2 ** (len(TINY_SD1.channel_mult) - 1)
# 4 levels, so one latent pixel is 8 image pixels as in SD
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
EXACT = 1e-5


def random_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(TINY_VAE).eval()
    with torch.no_grad():  # random norm affines, so the norms are exercised too
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return vae


@pytest.fixture(scope="module")
def unet():
    return random_unet(TINY_SD1)


@pytest.fixture(scope="module")
def vae():
    return random_vae()


def unet_inputs(height: int = 16, width: int = 24):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, TINY_SD1.in_channels, height, width, generator=generator)
    context = torch.randn(2, 7, TINY_SD1.context_dim, generator=generator)
    return latents, torch.tensor([10.0, 700.0]), context


def roll_error(f, x: torch.Tensor, shift: int, dim: int, out_shift: int | None = None) -> float:
    """max |f(roll(x, shift)) - roll(f(x), out_shift)|: zero for a function equivariant to circular
    shifts; out_shift is shift scaled by the function's change of resolution."""
    out_shift = shift if out_shift is None else out_shift
    with torch.no_grad():
        return (f(x.roll(shift, dim)) - f(x).roll(out_shift, dim)).abs().max().item()


def layers_untouched(*modules: nn.Module) -> bool:
    return all("_conv_forward" not in m.__dict__ for module in modules for m in module.modules())


@pytest.mark.parametrize("dim", [-1, -2], ids=["x", "y"])
def test_the_unet_commutes_with_circular_shifts_only_when_seamless(unet, dim):
    latents, timesteps, context = unet_inputs()

    def denoise(x):
        return unet(x, timesteps, context)

    assert roll_error(denoise, latents, UNET_STEP, dim) > 1e-2
    with seamless(unet):
        assert roll_error(denoise, latents, UNET_STEP, dim) < EXACT
        assert roll_error(denoise, latents, 3 * UNET_STEP, dim) < EXACT


def test_one_axis_wraps_and_the_other_keeps_its_edges(unet):
    latents, timesteps, context = unet_inputs()

    def denoise(x):
        return unet(x, timesteps, context)

    with seamless(unet, axes="x"):
        assert roll_error(denoise, latents, UNET_STEP, -1) < EXACT
        assert roll_error(denoise, latents, UNET_STEP, -2) > 1e-2
    with seamless(unet, axes="y"):
        assert roll_error(denoise, latents, UNET_STEP, -2) < EXACT
        assert roll_error(denoise, latents, UNET_STEP, -1) > 1e-2


def test_both_axes_equal_the_web_ui_s_circular_padding_mode(unet, vae):
    latents, timesteps, context = unet_inputs()
    small = torch.randn(1, TINY_VAE.z_channels, 5, 6, generator=torch.Generator().manual_seed(2))
    circular_unet, circular_vae = copy.deepcopy(unet), copy.deepcopy(vae)
    for module in (*circular_unet.modules(), *circular_vae.modules()):
        if isinstance(module, nn.Conv2d):
            module.padding_mode = "circular"
    with torch.no_grad(), seamless(unet, vae):
        torch.testing.assert_close(unet(latents, timesteps, context), circular_unet(latents, timesteps, context),
                                   rtol=0, atol=EXACT)
        torch.testing.assert_close(vae.decode(small), circular_vae.decode(small), rtol=0, atol=EXACT)


def test_vae_decoding_of_a_rolled_latent_is_the_rolled_image(vae):
    latents = torch.randn(1, TINY_VAE.z_channels, 5, 6, generator=torch.Generator().manual_seed(3))
    f = TINY_VAE.downsample_factor
    assert f == 8
    for dim in (-1, -2):
        assert roll_error(vae.decode, latents, 2, dim, 2 * f) > 1e-2
        with seamless(vae):
            assert roll_error(vae.decode, latents, 2, dim, 2 * f) < EXACT
            assert roll_error(vae.decode, latents, 1, dim, f) < EXACT


def test_vae_encoding_wraps_through_the_hand_padded_downsampling(vae):
    """ldm's Downsample zero-pads right and bottom itself; seamless wraps that padding as well,
    which setting padding_mode (the web UI) does not."""
    f = TINY_VAE.downsample_factor
    images = torch.rand(1, 3, 5 * f, 6 * f, generator=torch.Generator().manual_seed(4)) * 2 - 1

    def encode(x):
        return vae.encode(x).mean

    circular = copy.deepcopy(vae)
    for module in circular.modules():
        if isinstance(module, nn.Conv2d):
            module.padding_mode = "circular"
    assert roll_error(lambda x: circular.encode(x).mean, images, 2 * f, -1, 2) > 1e-3
    for dim in (-1, -2):
        with seamless(vae):
            assert roll_error(encode, images, 2 * f, dim, 2) < EXACT
        with seamless(vae, axes="x" if dim == -2 else "y"):
            assert roll_error(encode, images, 2 * f, dim, 2) > 1e-3


def test_modes_are_restored_on_exit_and_after_an_exception(unet, vae):
    latents, timesteps, context = unet_inputs()
    keys = list(unet.state_dict()) + list(vae.state_dict())
    with torch.no_grad():
        before = unet(latents, timesteps, context)
    with seamless(unet, vae):
        assert list(unet.state_dict()) + list(vae.state_dict()) == keys  # checkpoint keys untouched
        assert not layers_untouched(unet) and not layers_untouched(vae)
    assert layers_untouched(unet, vae)
    with pytest.raises(RuntimeError, match="interrupted"):
        with seamless(unet, vae, axes="x"):
            raise RuntimeError("interrupted")
    assert layers_untouched(unet, vae)
    assert all(m.padding_mode == "zeros" for m in unet.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        assert torch.equal(unet(latents, timesteps, context), before)


def test_nested_and_repeated_modules_restore_the_enclosing_state(unet):
    latents, timesteps, context = unet_inputs()

    def denoise(x):
        return unet(x, timesteps, context)

    with seamless(unet, unet):  # a module given twice (pipe.vae wrapping a vae, say) is wrapped once
        assert roll_error(denoise, latents, UNET_STEP, -2) < EXACT
        with seamless(unet, axes="x"):
            assert roll_error(denoise, latents, UNET_STEP, -2) > 1e-2
        assert roll_error(denoise, latents, UNET_STEP, -2) < EXACT
    assert layers_untouched(unet)


def test_the_undo_function_restores_and_bad_axes_are_a_typed_error(unet):
    restore = apply_seamless(unet, axes="y")
    assert not layers_untouched(unet)
    restore()
    assert layers_untouched(unet)
    with pytest.raises(InputError, match="xy, x, y"):
        apply_seamless(unet, axes="z")
    assert layers_untouched(unet)


def junction_and_interior(image: np.ndarray, axis: int) -> tuple[float, np.ndarray]:
    """Mean |difference| across the wrap (last line to first) and between each pair of neighbouring
    lines inside, along `axis` (1: columns, 0: rows) of an (H, W, 3) image."""
    others = tuple(i for i in range(3) if i != axis)
    interior = np.abs(np.diff(image, axis=axis)).mean(axis=others)
    junction = np.abs(np.take(image, 0, axis) - np.take(image, -1, axis)).mean()
    return float(junction), interior


def test_the_bundled_model_draws_a_torus_with_its_unet_and_vae_seamless(tmp_path):
    """The whole generation (sampler, guidance, UNet, VAE) commutes with rolling the initial noise, so
    no column is an edge. The bundled model draws shapes on flat backgrounds inside the frame, so
    without seamless the edges match too; there the rolled noise still draws the shape where the
    caption says, which is the difference."""
    pipe = sdlab.load()
    f = pipe.config.vae.downsample_factor
    shift = 2 ** (len(pipe.config.unet.channel_mult) - 1)  # latent pixels; the UNet's downsampling
    noise = torch.randn(1, 4, 64 // f, 64 // f, generator=torch.Generator().manual_seed(0))
    # a deterministic sampler: an ancestral one's fresh noise at each step would not be rolled
    options = dict(steps=12, sampler="Euler", width=64, height=64)

    def generate(latents):
        image = pipe.txt2img("a large red circle on the left", latents=latents, **options).images[0]
        return np.asarray(image, dtype=np.float32)

    plain, plain_rolled = generate(noise), generate(noise.roll(shift, -1))
    with seamless(pipe.unet, pipe.vae):
        image, rolled = generate(noise), generate(noise.roll(shift, -1))
    assert layers_untouched(pipe.unet, pipe.vae)

    assert np.abs(rolled - np.roll(image, f * shift, axis=1)).max() <= 1  # uint8 rounding
    assert np.abs(plain_rolled - np.roll(plain, f * shift, axis=1)).max() > 100
    for axis in (0, 1):  # the seam is no sharper than the sharpest step inside (the circle's outline)
        junction, interior = junction_and_interior(image, axis)
        assert junction <= 1.25 * interior.max()

    tiled = Image.fromarray(np.tile(image, (2, 2, 1)).astype(np.uint8))
    tiled.resize((4 * tiled.width, 4 * tiled.height), Image.NEAREST).save(tmp_path / "seamless-2x2.png")
