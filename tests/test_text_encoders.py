"""SD's text encoders: the original checkpoint keys, and the numbers of transformers' CLIPTextModel.

SD1 (CLIP ViT-L/14): the SD1 file stores transformers' CLIP text model under
`cond_stage_model.transformer.`, so a randomly filled transformers model loads into ours 1:1.
SD2 (OpenCLIP ViT-H/14): our random weights, prefixed `cond_stage_model.model.` as in an SD2 file,
go through diffusers' own `convert_open_clip_checkpoint` into a transformers CLIP text model.
transformers runs with eager attention (an explicit causal mask and softmax), so the oracle shares
nothing with our scaled_dot_product_attention(is_causal=True). Everything in float32.

transformers 5 keeps a bare CLIPTextModel's weights at the top level; the `text_model.` prefix of the
SD1/diffusers layout is CLIPTextModelWithProjection's, so that is the oracle class throughout.
"""

from dataclasses import replace

import pytest
import torch
from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sdlab.config import OPEN_CLIP_H, SD1, TextConfig
from sdlab.errors import ConfigError, InputError
from sdlab.models import build_text_encoder
from sdlab.models.clip import CLIPTextModel
from sdlab.models.open_clip import OpenCLIPTextModel

TOLERANCE = 1e-4  # max |ours - reference| in float32; the outputs are LayerNorm-scaled, O(1)
START, END = 49406, 49407
SD2_PREFIX = "cond_stage_model.model."

CLIP_L = SD1.text  # 768 wide, 12 layers, 12 heads, quick_gelu, read at the last layer
TINY_CLIP = TextConfig(width=64, layers=3, heads=4, projection_dim=32)
TINY_OPEN_CLIP = replace(OPEN_CLIP_H, width=64, layers=4, heads=4, projection_dim=48)


# -- helpers ---------------------------------------------------------------------------------------

def random_fill(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: matrices ~ N(0, 1/fan_in), LayerNorm weights near 1, biases near 0,
    so no default-initialised value (unit norms, zero biases) hides a wrong key."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                param.copy_(noise * param.shape[-1] ** -0.5)
            elif name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return module.eval()


def random_encoder(config: TextConfig, seed: int = 0) -> torch.nn.Module:
    """Ours, built on the meta device as the checkpoint loader does, then filled."""
    with torch.device("meta"):
        encoder = build_text_encoder(config)
    return random_fill(encoder.to_empty(device="cpu"), seed)


def reference_config(config: TextConfig, layers: int) -> CLIPTextConfig:
    """transformers' config for `config`'s sizes with `layers` layers (what diffusers' SD configs hold)."""
    return CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=layers, num_attention_heads=config.heads, max_position_embeddings=config.context_length,
        hidden_act=config.activation, projection_dim=config.projection_dim or config.width,
        layer_norm_eps=1e-5, bos_token_id=START, eos_token_id=END, pad_token_id=config.pad_token_id,
        attn_implementation="eager",
    )


def empty_reference(config: TextConfig, layers: int) -> CLIPTextModelWithProjection:
    """transformers' model with memory uninitialised (its own random init of 354M parameters would
    cost more than the comparison)."""
    with torch.device("meta"):
        reference = CLIPTextModelWithProjection(reference_config(config, layers))
    reference.to_empty(device="cpu")
    with torch.no_grad():
        reference.text_model.embeddings.position_ids.copy_(torch.arange(config.context_length)[None])
    return reference.eval()


def openclip_reference(encoder: OpenCLIPTextModel, layers: int) -> CLIPTextModelWithProjection:
    """transformers' model holding our OpenCLIP weights, converted by diffusers' single-file code.

    diffusers drops the 24th block of ViT-H (SD2 never reads it) and the text projection, so a
    `layers`-deep model loads strictly only if it is as deep as what the conversion kept.
    """
    checkpoint = {SD2_PREFIX + key: value for key, value in encoder.state_dict().items()}
    reference = empty_reference(encoder.config, layers)
    converted = convert_open_clip_checkpoint(reference.text_model, checkpoint, prefix=SD2_PREFIX)
    # OpenCLIP applies x @ text_projection, nn.Linear x @ weight.T
    converted["text_projection.weight"] = encoder.text_projection.detach().T
    reference.load_state_dict(converted, strict=True)
    return reference


def prompt_ids(lengths: list[int], pad_token_id: int, context_length: int = 77, seed: int = 0) -> torch.Tensor:
    """(len(lengths), context_length) ids as the tokenizer lays them out: start, words, end, padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), context_length), pad_token_id)
    for row, length in enumerate(lengths):
        ids[row, 0] = START
        ids[row, 1:length + 1] = torch.randint(0, START, (length,), generator=generator)
        ids[row, length + 1] = END
    return ids


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- key layouts -----------------------------------------------------------------------------------

def test_clip_l_keys_and_shapes_are_the_sd1_files():
    """The keys under `cond_stage_model.transformer.`: transformers' CLIPTextModel names, no buffers."""
    with torch.device("meta"):
        ours = CLIPTextModel(replace(CLIP_L, projection_dim=768))
        reference = CLIPTextModelWithProjection(reference_config(replace(CLIP_L, projection_dim=768), layers=12))
    ours_shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert ours_shapes == {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert ours_shapes["text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert ours_shapes["text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert "text_model.embeddings.position_ids" not in ours_shapes

    with torch.device("meta"):
        sd1 = CLIPTextModel(CLIP_L)
    assert set(sd1.state_dict()) == set(ours_shapes) - {"text_projection.weight"}
    assert len(sd1.state_dict()) == 196  # 2 embeddings + 12 layers * 16 + final norm 2


def sd2_file_layout(layers: int = 24, width: int = 1024, projection_dim: int = 1024) -> dict[str, tuple]:
    """Shapes under `cond_stage_model.model.` in Stability's v2-1_768-ema-pruned: OpenCLIP's text
    tower after FrozenOpenCLIPEmbedder deleted `visual` (its attention mask is not persistent)."""
    layout = {
        "positional_embedding": (77, width),
        "text_projection": (width, projection_dim),
        "logit_scale": (),
        "token_embedding.weight": (49408, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
    }
    for n in range(layers):
        block = f"transformer.resblocks.{n}."
        layout.update({
            block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
            block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
            block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,),
        })
    return layout


def test_open_clip_h_keys_and_shapes_are_the_sd2_files():
    with torch.device("meta"):
        ours = OpenCLIPTextModel(OPEN_CLIP_H)
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == sd2_file_layout()
    # what diffusers knows an SD2 file to hold and drops (block 23, the projection) is all there
    assert {key.removeprefix(SD2_PREFIX) for key in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE} <= set(ours.state_dict())


@pytest.mark.parametrize("config", [TINY_CLIP, TINY_OPEN_CLIP], ids=["clip", "open_clip"])
def test_built_on_meta_it_has_no_buffers_and_loads_by_assignment(config):
    source = random_encoder(config, seed=3)
    with torch.device("meta"):
        encoder = build_text_encoder(config)
    assert list(encoder.buffers()) == []
    encoder.load_state_dict(source.state_dict(), strict=True, assign=True)
    ids = prompt_ids([4, 9], config.pad_token_id)
    with torch.no_grad():
        assert torch.equal(encoder.eval()(ids), source(ids))


def test_the_factory_picks_the_layout_by_kind():
    assert type(build_text_encoder(TINY_CLIP)) is CLIPTextModel
    assert type(build_text_encoder(TINY_OPEN_CLIP)) is OpenCLIPTextModel
    assert build_text_encoder(TINY_OPEN_CLIP).config is TINY_OPEN_CLIP


# -- SD1: CLIP against transformers ---------------------------------------------------------------

def sd1_pair(config: TextConfig, seed: int = 0):
    """(ours, reference) holding the same random weights: the reference's state dict loads into ours
    strictly (less the projection when ours has none)."""
    reference = random_fill(empty_reference(config, config.layers), seed)
    state = reference.state_dict()
    if config.projection_dim is None:
        del state["text_projection.weight"]
    with torch.device("meta"):
        ours = CLIPTextModel(config)
    ours.load_state_dict(state, strict=True, assign=True)
    return ours.eval(), reference


def check_clip_against_transformers(config: TextConfig, ids: torch.Tensor, clip_skips: tuple[int, ...]):
    ours, reference = sd1_pair(config)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        assert max_diff(ours(ids), expected.last_hidden_state) <= TOLERANCE
        for clip_skip in clip_skips:
            # diffusers' encode_prompt(clip_skip=c) == ours(clip_skip=c + 1)
            skipped = reference.text_model.final_layer_norm(expected.hidden_states[-clip_skip])
            assert max_diff(ours(ids, clip_skip=clip_skip), skipped) <= TOLERANCE
        if config.projection_dim is not None:
            assert max_diff(ours.pooled(ids), expected.text_embeds) <= TOLERANCE


def test_tiny_clip_matches_transformers():
    check_clip_against_transformers(TINY_CLIP, prompt_ids([3, 20, 75], END), clip_skips=(2, 3))


def test_tiny_clip_pooled_without_projection_is_the_end_token_state():
    ours, reference = sd1_pair(replace(TINY_CLIP, projection_dim=None))
    ids = prompt_ids([3, 20], END)
    with torch.no_grad():
        assert max_diff(ours.pooled(ids), reference.text_model(ids).pooler_output) <= TOLERANCE
        assert ours.pooled(ids).shape == (2, 64)


@pytest.mark.slow
def test_clip_l_matches_transformers():
    # one prompt: on two CPU cores each CLIP-L pass over 77 tokens takes seconds
    check_clip_against_transformers(CLIP_L, prompt_ids([40], END), clip_skips=(2,))


# -- SD2: OpenCLIP against diffusers' conversion ---------------------------------------------------

def test_tiny_open_clip_matches_transformers():
    encoder = random_encoder(TINY_OPEN_CLIP)
    reference = openclip_reference(encoder, TINY_OPEN_CLIP.layers)
    ids = prompt_ids([3, 20, 75], pad_token_id=0)
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        final_norm = reference.text_model.final_layer_norm
        # clip_skip=1 is SD2's penultimate layer, 2 the one before
        assert max_diff(encoder(ids), final_norm(expected.hidden_states[-2])) <= TOLERANCE
        assert max_diff(encoder(ids, clip_skip=2), final_norm(expected.hidden_states[-3])) <= TOLERANCE
        # OpenCLIP's encode_text: every block, ln_final, end token, @ text_projection
        assert max_diff(encoder.pooled(ids), expected.text_embeds) <= TOLERANCE


@pytest.mark.slow
def test_open_clip_h_penultimate_matches_diffusers_sd2_text_encoder():
    """diffusers' SD2 text encoder is transformers' model with the 23 blocks SD2 reads."""
    encoder = random_encoder(OPEN_CLIP_H)
    reference = openclip_reference(encoder, layers=23)
    ids = prompt_ids([12], pad_token_id=0)
    with torch.no_grad():
        assert max_diff(encoder(ids), reference(ids).last_hidden_state) <= TOLERANCE


# -- behaviour both share --------------------------------------------------------------------------

@pytest.mark.parametrize("config", [TINY_CLIP, TINY_OPEN_CLIP], ids=["clip", "open_clip"])
def test_tokens_after_the_end_token_do_not_change_earlier_positions(config):
    """Attention is causal: SD1's padding (the end token) and SD2's (id 0) give the same states up
    to the end token, and the same pooled feature."""
    encoder = random_encoder(config)
    padded_with_end, padded_with_zero = prompt_ids([7], END), prompt_ids([7], 0)
    with torch.no_grad():
        a, b = encoder(padded_with_end), encoder(padded_with_zero)
        assert max_diff(a[:, :9], b[:, :9]) <= 1e-6  # start, 7 words, end
        assert max_diff(a[:, 9:], b[:, 9:]) > 1e-2
        assert max_diff(encoder.pooled(padded_with_end), encoder.pooled(padded_with_zero)) <= 1e-6


@pytest.mark.parametrize("config", [TINY_CLIP, TINY_OPEN_CLIP], ids=["clip", "open_clip"])
def test_shorter_sequences_are_a_prefix_of_the_full_context(config):
    encoder = random_encoder(config)
    ids = prompt_ids([7], config.pad_token_id)
    with torch.no_grad():
        assert max_diff(encoder(ids[:, :20]), encoder(ids)[:, :20]) <= 1e-5


@pytest.mark.parametrize("config", [TINY_CLIP, TINY_OPEN_CLIP], ids=["clip", "open_clip"])
def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients(config):
    encoder = random_encoder(config).train()
    blocks = encoder.text_model.encoder.layers if config.kind == "clip" else encoder.transformer.resblocks
    calls = []
    # a pre-hook: the recomputation stops as soon as it has what backward needs, before forward hooks
    blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    ids = prompt_ids([5, 11], config.pad_token_id)

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        encoder.zero_grad()
        encoder.gradient_checkpointing = checkpointing
        calls.clear()
        encoder(ids).square().mean().backward()
        return [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    plain = gradients(False)
    assert len(calls) == 1
    recomputed = gradients(True)
    assert len(calls) == 2  # forward, then again in backward
    assert len(plain) == len(recomputed)
    assert all(torch.allclose(p, r, atol=1e-6) for p, r in zip(plain, recomputed))


@pytest.mark.parametrize("config", [TINY_CLIP, TINY_OPEN_CLIP], ids=["clip", "open_clip"])
def test_bad_inputs_raise_input_errors(config):
    encoder = build_text_encoder(config)
    ids = prompt_ids([3], config.pad_token_id)
    usable = config.layers - (config.layer == "penultimate")
    with pytest.raises(InputError, match="clip_skip"):
        encoder(ids, clip_skip=0)
    with pytest.raises(InputError, match="clip_skip"):
        encoder(ids, clip_skip=usable + 1)
    assert encoder(ids, clip_skip=usable).shape == (1, 77, config.width)  # the first block alone
    with pytest.raises(InputError, match="78 tokens"):
        encoder(torch.cat([ids, ids[:, :1]], dim=1))
    with pytest.raises(InputError, match="batch, tokens"):
        encoder(ids[0])


@pytest.mark.parametrize("kind", ["clip", "open_clip"])
def test_heads_must_divide_the_width(kind):
    with pytest.raises(ConfigError, match="heads"):
        build_text_encoder(replace(TINY_CLIP, kind=kind, width=66))
