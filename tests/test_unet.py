"""The UNet's keys are the original checkpoint's, and its numbers are diffusers' UNet2DConditionModel's.

The oracle: our random weights, prefixed `model.diffusion_model.` as in an SD single-file checkpoint,
go through diffusers' own `convert_ldm_unet_checkpoint` into a UNet2DConditionModel built from the
ldm-style config with `create_unet_diffusers_config_from_ldm`; both models then see the same
(latents, timesteps, text_embeddings) and must agree to 1e-4 relative error in fp32.
"""

import gc
import math
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.models.embeddings import get_timestep_embedding

from sdlab.config import SD1, SD2, UNetConfig
from sdlab.errors import ConfigError, InputError
from sdlab.models import build_unet
from sdlab.models.unet import UNetModel, timestep_embedding

TOLERANCE = 1e-4

# SD1's shape in miniature: attention on all levels but the last, a fixed number of heads, conv projections
TINY_SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(0, 1), num_res_blocks=2,
                      num_heads=8, context_dim=32)
# SD2's: linear projections, a fixed head width, two transformer blocks per level
TINY_SD2 = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), num_res_blocks=1,
                      head_channels=16, transformer_depth=2, context_dim=48, use_linear_projection=True)
# the x4 upscaler's: 7 input channels, noise-level classes, cross-attention only on the first levels
TINY_UPSCALER = UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 2), attention_levels=(1, 2),
                           num_res_blocks=1, num_heads=8, context_dim=32, use_linear_projection=True,
                           num_classes=350, disable_self_attention=(True, True, False))


def ldm_original_config(config: UNetConfig) -> dict:
    """The `model.params.unet_config.params` an SD yaml would hold for this UNet (ldm's names)."""
    params = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "model_channels": config.model_channels,
        "attention_resolutions": [2**level for level in config.attention_levels],
        "num_res_blocks": config.num_res_blocks,
        "channel_mult": list(config.channel_mult),
        "transformer_depth": config.transformer_depth,
        "context_dim": config.context_dim,
        "use_linear_in_transformer": config.use_linear_projection,
    }
    if config.head_channels is None:
        params["num_heads"] = config.num_heads
    else:
        params["num_head_channels"] = config.head_channels
    if config.num_classes is not None:
        params["num_classes"] = config.num_classes
    if config.disable_self_attention:
        params["disable_self_attentions"] = list(config.disable_self_attention)
    vae = {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}
    return {"model": {"params": {"unet_config": {"params": params}, "first_stage_config": vae}}}


def random_unet(config: UNetConfig, seed: int = 0) -> UNetModel:
    """Every parameter random (norms and zero-initialised convs too), so a swapped key cannot hide."""
    with torch.device("meta"):
        unet = UNetModel(config)
    unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim > 1:  # std 1/sqrt(fan_in) keeps activations near unit scale
                bound = math.sqrt(3 / p[0].numel())
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):
                p.uniform_(0.8, 1.2, generator=generator)
            else:
                p.uniform_(-0.2, 0.2, generator=generator)
    return unet.eval()


def diffusers_twin(unet: UNetModel) -> UNet2DConditionModel:
    """diffusers' model holding the same tensors, through diffusers' conversion of the ldm keys."""
    checkpoint = {"model.diffusion_model." + key: value for key, value in unet.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(ldm_original_config(unet.config), checkpoint)
    config["norm_num_groups"] = unet.config.norm_groups  # ldm's yaml cannot say it; diffusers' config can
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    # every one of our tensors lands on exactly one diffusers key (with strict loading: a bijection)
    assert len({id(tensor) for tensor in converted.values()}) == len(checkpoint)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference.eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def inputs(config: UNetConfig, batch: int = 2, height: int = 8, width: int = 8, tokens: int = 77, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_channels, height, width, generator=generator)
    timesteps = torch.tensor([999.0, 1.5][:batch])
    text_embeddings = torch.randn(batch, tokens, config.context_dim, generator=generator)
    return latents, timesteps, text_embeddings


CASES = {
    "sd1": (TINY_SD1, {}),
    "sd2": (TINY_SD2, {}),
    "long-prompt": (TINY_SD1, {"tokens": 154}),
    "non-square": (TINY_SD1, {"height": 8, "width": 16}),
    "inpainting": (replace(TINY_SD1, in_channels=9), {}),
    "upscaler": (TINY_UPSCALER, {"height": 16, "width": 8}),
    "16-groups": (replace(TINY_SD1, norm_groups=16), {}),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_diffusers_after_its_own_conversion(case):
    config, shape = CASES[case]
    unet = random_unet(config)
    reference = diffusers_twin(unet)
    latents, timesteps, text_embeddings = inputs(config, **shape)
    labels = torch.tensor([20, 349]) if config.num_classes else None
    with torch.no_grad():
        noise_pred = unet(latents, timesteps, text_embeddings, y=labels)
        expected = reference(latents, timesteps, text_embeddings, class_labels=labels).sample
    assert noise_pred.shape == (latents.shape[0], config.out_channels, *latents.shape[2:])
    assert relative_error(noise_pred, expected) <= TOLERANCE


def test_normalisation_epsilons_match_on_nearly_constant_features():
    """GroupNorm eps 1e-5 in ResBlocks, 1e-6 before a transformer, LayerNorm 1e-5: only visible when the
    features' variance is as small as eps, which whole-model random inputs never reach."""
    unet = random_unet(TINY_SD1)
    reference = diffusers_twin(unet)
    generator = torch.Generator().manual_seed(2)
    features = 1e-3 * torch.randn(2, 32, 8, 8, generator=generator)
    emb = torch.randn(2, 128, generator=generator)
    text_embeddings = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        resblock = unet.input_blocks[1][0](features, emb)
        expected_resblock = reference.down_blocks[0].resnets[0](features, emb)
        transformer = unet.input_blocks[1][1](features, text_embeddings) - features
        expected_transformer = reference.down_blocks[0].attentions[0](features, text_embeddings).sample - features
    assert relative_error(resblock, expected_resblock) <= TOLERANCE
    assert relative_error(transformer, expected_transformer) <= TOLERANCE


def test_inpainting_concat_is_appended_to_the_latents():
    unet = random_unet(replace(TINY_SD1, in_channels=9))
    latents, timesteps, text_embeddings = inputs(unet.config)
    with torch.no_grad():
        whole = unet(latents, timesteps, text_embeddings)
        split = unet(latents[:, :4], timesteps, crossattn=text_embeddings, concat=latents[:, 4:])
    torch.testing.assert_close(split, whole, rtol=0, atol=0)


@pytest.mark.slow
def test_full_size_sd15_matches_diffusers():
    unet = random_unet(SD1.unet)
    reference = diffusers_twin(unet)
    latents, timesteps, text_embeddings = inputs(SD1.unet, batch=1, tokens=77)
    with torch.no_grad():
        noise_pred = unet(latents, timesteps, text_embeddings)
        expected = reference(latents, timesteps, text_embeddings).sample
    del unet, reference
    gc.collect()
    assert relative_error(noise_pred, expected) <= TOLERANCE


def test_released_checkpoint_layouts():
    """Key and parameter counts of the UNets in sd-v1-5 and sd-v2-1 (686 tensors each)."""
    with torch.device("meta"):
        sd1, sd2 = build_unet(SD1.unet), build_unet(SD2.unet)
    for unet, count in ((sd1, 859_520_964), (sd2, 865_910_724)):
        state = unet.state_dict()
        assert len(state) == 686
        assert sum(tensor.numel() for tensor in state.values()) == count
        assert list(unet.buffers()) == []
    keys = sd1.state_dict()
    assert keys["input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert keys["input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    assert keys["input_blocks.4.0.skip_connection.weight"].shape == (640, 320, 1, 1)
    assert keys["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert keys["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert keys["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)
    assert keys["input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"].shape == (320, 1280)
    assert keys["middle_block.1.transformer_blocks.0.attn1.to_out.0.bias"].shape == (1280,)
    assert keys["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert keys["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert keys["out.2.weight"].shape == (4, 320, 3, 3)
    assert sd2.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (320, 320)


def test_upscaler_layout_has_class_embedding_and_cross_only_attn1():
    with torch.device("meta"):
        keys = UNetModel(TINY_UPSCALER).state_dict()
    assert keys["label_emb.weight"].shape == (350, 128)
    assert not any(key.startswith("input_blocks.1.1.") for key in keys)  # level 0: no transformer
    assert keys["input_blocks.3.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 32)  # reads the context
    assert keys["input_blocks.5.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 64)  # self-attention
    assert keys["middle_block.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 64)


def test_timestep_embedding_is_cos_then_sin():
    timesteps = torch.tensor([0.0, 1.0, 499.5, 999.0])
    expected = get_timestep_embedding(timesteps, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(timesteps, 320), expected, rtol=0, atol=0)
    assert torch.equal(timestep_embedding(torch.zeros(1), 8), torch.tensor([[1.0] * 4 + [0.0] * 4]))


def test_one_timestep_serves_the_whole_batch():
    unet = random_unet(TINY_SD1)
    latents, _, text_embeddings = inputs(TINY_SD1)
    with torch.no_grad():
        shared = unet(latents, torch.tensor(500), text_embeddings)
        per_item = unet(latents, torch.tensor([500, 500]), text_embeddings)
    torch.testing.assert_close(shared, per_item, rtol=0, atol=0)


def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients(monkeypatch):
    import sdlab.models.unet as unet_module

    unet = random_unet(TINY_SD2).train()
    latents, timesteps, text_embeddings = inputs(TINY_SD2)

    def gradients():
        unet.zero_grad()
        unet(latents, timesteps, text_embeddings).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    plain = gradients()
    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    unet.gradient_checkpointing = True
    recomputed = gradients()
    blocks = [m for m in unet.modules() if type(m).__name__ in ("ResBlock", "SpatialTransformer")]
    assert len(calls) == len(blocks)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    calls.clear()
    with torch.no_grad():
        unet(latents, timesteps, text_embeddings)
    assert calls == []  # inference never recomputes


def test_latent_sides_not_multiple_of_the_downsampling_match_diffusers():
    """Image sides that are multiples of 8 but not 64 (e.g. 520 px -> 65 latents): the up path resizes to
    each skip connection's exact size, as diffusers' `upsample_size` does."""
    unet = random_unet(TINY_SD1)
    latents, timesteps, text_embeddings = inputs(TINY_SD1, height=7, width=10)
    with torch.no_grad():
        ours = unet(latents, timesteps, text_embeddings)
        reference = diffusers_twin(unet)(latents, timesteps, text_embeddings).sample
    assert ours.shape == latents.shape
    assert relative_error(ours, reference) <= 1e-4


def test_user_errors_are_typed_and_say_what_to_do():
    unet = random_unet(TINY_SD1)
    latents, timesteps, text_embeddings = inputs(TINY_SD1)
    with pytest.raises(InputError, match="input channels"):
        unet(latents[:, :3], timesteps, text_embeddings)
    with pytest.raises(InputError, match="text embeddings"):
        unet(latents, timesteps)
    with pytest.raises(InputError, match="num_classes"):
        unet(latents, timesteps, text_embeddings, y=torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="multiple of 32"):
        UNetModel(replace(TINY_SD1, model_channels=48))
    with pytest.raises(ConfigError, match="heads"):
        UNetModel(replace(TINY_SD1, num_heads=5))
    with pytest.raises(ConfigError, match="one entry per level"):
        UNetModel(replace(TINY_SD1, disable_self_attention=(True,)))
