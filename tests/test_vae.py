"""The KL autoencoder: ldm checkpoint layout, and the same numbers as diffusers' AutoencoderKL."""

import itertools

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sdlab.config import VAEConfig
from sdlab.models import build_vae
from sdlab.models.vae import AutoencoderKL, DiagonalGaussian, GroupNorm, norm_statistics

SD_VAE = VAEConfig()  # ch 128, ch_mult (1, 2, 4, 4), 2 ResBlocks per level, 4 latent channels
TINY_CONFIGS = [
    VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2),
    VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),  # the bundled model's narrow norms
]
TOLERANCE = 1e-4  # relative error, max|a - b| / max|b|, in float32


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def random_vae(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """Our model with random weights; norms get random affines so they are tested too."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(config).eval()
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return vae


def diffusers_twin(vae: AutoencoderKL) -> DiffusersAutoencoderKL:
    """diffusers' AutoencoderKL holding our weights, converted by diffusers' own single-file code."""
    checkpoint = {f"first_stage_model.{key}": value for key, value in vae.state_dict().items()}
    c = vae.config
    ldm_config = {"model": {"params": {
        "scale_factor": c.scaling_factor,
        "first_stage_config": {"params": {"embed_dim": c.z_channels, "ddconfig": {
            "double_z": True, "z_channels": c.z_channels, "resolution": 256, "in_channels": c.in_channels,
            "out_ch": c.out_channels, "ch": c.ch, "ch_mult": list(c.ch_mult),
            "num_res_blocks": c.num_res_blocks, "attn_resolutions": [], "dropout": 0.0,
        }}},
    }}}
    config = create_vae_diffusers_config_from_ldm(ldm_config, checkpoint)
    config["norm_num_groups"] = c.norm_groups  # ldm's yaml cannot say it; diffusers' config can
    reference = DiffusersAutoencoderKL(**config).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return reference


def compare_with_diffusers(config: VAEConfig, height: int, width: int) -> None:
    vae = random_vae(config)
    reference = diffusers_twin(vae)
    torch.manual_seed(1)
    images = torch.rand(2, 3, height, width) * 2 - 1
    f = config.downsample_factor
    latents = torch.randn(2, config.z_channels, height // f, width // f)
    with torch.no_grad():
        posterior = vae.encode(images)
        expected = reference.encode(images).latent_dist
        decoded = vae.decode(latents)
        expected_decoded = reference.decode(latents).sample
    assert posterior.mean.shape == (2, config.z_channels, height // f, width // f)
    assert relative_error(posterior.mean, expected.mean) <= TOLERANCE
    assert relative_error(posterior.logvar, expected.logvar) <= TOLERANCE
    assert decoded.shape == (2, config.out_channels, height, width)
    assert relative_error(decoded, expected_decoded) <= TOLERANCE


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=["2-levels", "3-levels", "8-groups"])
def test_tiny_vae_matches_diffusers_on_a_non_square_image(config):
    compare_with_diffusers(config, height=24, width=40)


@pytest.mark.slow
def test_sd_vae_matches_diffusers():
    compare_with_diffusers(SD_VAE, height=64, width=64)


def test_sd_vae_has_the_first_stage_model_keys_of_an_sd_checkpoint():
    with torch.device("meta"):
        vae = AutoencoderKL(SD_VAE)
    state = vae.state_dict()
    # The SD 1.x/2.x autoencoder: 248 tensors, 83,653,863 parameters (no `loss.*` training keys).
    assert len(state) == 248
    assert sum(t.numel() for t in state.values()) == 83_653_863
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.block_2.norm2.bias": (512,),
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # The deepest encoder level keeps its size; decoder level 0 is the full-resolution one.
    assert not any(key.startswith("encoder.down.3.downsample") for key in state)
    assert not any(key.startswith("decoder.up.0.upsample") for key in state)
    assert not any("nin_shortcut" in key for key in state if key.startswith("decoder.up.3"))
    assert list(vae.buffers()) == []


def test_meta_built_vae_loads_a_checkpoint_with_assign():
    source = random_vae(TINY_CONFIGS[1], seed=3)
    with torch.device("meta"):
        vae = build_vae(TINY_CONFIGS[1])
    vae.load_state_dict(source.state_dict(), strict=True, assign=True)
    vae.eval()
    assert vae.config == TINY_CONFIGS[1]
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(images).mean, source.encode(images).mean)


def test_an_odd_sized_image_is_floored_like_ldm():
    vae = random_vae(TINY_CONFIGS[0])
    reference = diffusers_twin(vae)
    images = torch.rand(1, 3, 13, 21) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(images)
        expected = reference.encode(images).latent_dist
    assert posterior.mean.shape == (1, 4, 6, 10)
    assert relative_error(posterior.mean, expected.mean) <= TOLERANCE


# -- the posterior ---------------------------------------------------------------------------------


def test_diagonal_gaussian_matches_diffusers_distribution():
    torch.manual_seed(0)
    moments = torch.randn(2, 8, 3, 5) * 3
    moments[0, 4:, 0, 0] = torch.tensor([-100.0, 100.0, 0.0, 1.0])  # outside the clamp range
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.min() == -30.0 and ours.logvar.max() == 20.0
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=0)
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-6, atol=0)
    assert torch.equal(ours.mode(), theirs.mode())
    sample = ours.sample(torch.Generator().manual_seed(5))
    assert torch.equal(sample, theirs.sample(torch.Generator().manual_seed(5)))
    eps = torch.randn(ours.mean.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sample, ours.mean + ours.std * eps)


def test_kl_of_the_standard_normal_is_zero():
    moments = torch.zeros(3, 8, 4, 4)
    assert torch.equal(DiagonalGaussian(moments).kl(), torch.zeros(3))


# -- training --------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    vae = random_vae(TINY_CONFIGS[0]).train()
    images = torch.rand(1, 3, 16, 16) * 2 - 1

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        vae.gradient_checkpointing = checkpointing
        vae.zero_grad()
        reconstruction = vae(images, generator=torch.Generator().manual_seed(0))
        loss = (reconstruction - images).square().mean() + 1e-6 * vae.encode(images).kl().sum()
        loss.backward()
        return [p.grad.clone() for p in vae.parameters()]

    plain, checkpointed = gradients(False), gradients(True)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_stages_in_order_are_forward():
    """The tiled VAE runs `stages()`; run whole, they are the encoder and decoder, bit for bit."""
    vae = random_vae(VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2))
    images, latents = torch.rand(2, 3, 48, 40) * 2 - 1, torch.randn(2, 4, 12, 10)
    with torch.no_grad():
        for coder, x in ((vae.encoder, images), (vae.decoder, latents)):
            h = x
            for module in itertools.chain.from_iterable(coder.stages()):
                h = module(h)
            assert torch.equal(h, coder(x))


def test_group_norm_takes_statistics_from_outside_inside_the_block_only():
    norm = GroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 6)
    reference = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
    with norm_statistics(norm, lambda n, h: n.moments(h)):
        torch.testing.assert_close(norm(x), reference)
    with norm_statistics(norm, lambda n, h: (torch.zeros(2, 4), torch.ones(2, 4))):
        expected = x * norm.weight[:, None, None] + norm.bias[:, None, None]
        torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=0)
    assert norm.statistics is None and torch.equal(norm(x), reference)
