"""CLIP ViT-L/14's text transformer, the text encoder of SD 1.x.

Radford et al. 2021 ("Learning Transferable Visual Models From Natural Language Supervision",
section 2.4): a GPT-2-style transformer over at most 77 BPE tokens, pre-LayerNorm blocks, causal
("masked") self-attention, a final LayerNorm; the text's feature is the state at the end token.
SD 1.x conditions its UNet on all 77 final states, `text_embeddings` (B, 77, 768).

Attribute names are those of Hugging Face transformers' `CLIPTextModel`, because the SD1 single
files (CompVis `FrozenCLIPEmbedder`) store that model under `cond_stage_model.transformer.`:
`text_model.embeddings.{token,position}_embedding`, `text_model.encoder.layers.N.{self_attn,
layer_norm1, mlp, layer_norm2}`, `text_model.final_layer_norm`. Those files also carry a
`position_ids` buffer; positions are computed here instead, and the checkpoint loader drops that key.

The pieces SD2's OpenCLIP encoder shares (activations, causal attention, clip-skip arithmetic, the
checkpointed layer loop) live here too; models/open_clip.py imports them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig
from ..errors import ConfigError, InputError

LAYER_NORM_EPS = 1e-5  # OpenAI CLIP and OpenCLIP: torch's LayerNorm default
MLP_RATIO = 4  # hidden width of every block's MLP: 3072 for ViT-L/14, 4096 for ViT-H/14


# -- shared with models/open_clip.py -------------------------------------------------------------

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), the sigmoid approximation of GELU (Hendrycks & Gimpel 2016, section 2)
    that OpenAI trained CLIP with; checkpoints trained with it need it, not exact GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Activation(nn.Module):
    """`ACTIVATIONS[name]` as a parameterless module, for layouts that keep it in an nn.Sequential."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def check_config(config: TextConfig) -> None:
    if config.activation not in ACTIVATIONS:
        raise ConfigError(f"text activation {config.activation!r} is not one of {sorted(ACTIVATIONS)}")
    if config.width % config.heads:
        raise ConfigError(f"text width {config.width} does not split into {config.heads} heads; pick a divisor")
    if config.layer not in ("last", "penultimate"):
        raise ConfigError(f"text layer {config.layer!r} must be 'last' or 'penultimate'")
    if config.layer == "penultimate" and config.layers < 2:
        raise ConfigError("a text encoder read at its penultimate layer needs at least 2 layers")


def check_input_ids(input_ids: torch.Tensor, config: TextConfig) -> None:
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > config.context_length:
        raise InputError(
            f"{input_ids.shape[1]} tokens exceed the text encoder's context of {config.context_length}; "
            "split the prompt into chunks (sdlab.prompts) or shorten it"
        )


def layers_to_run(config: TextConfig, clip_skip: int) -> int:
    """How many transformer layers produce the embeddings for `clip_skip`.

    clip_skip=1 is the model's own layer (the last, or SD2's penultimate); each step back drops
    one more layer. This is the web UI's "Clip skip" and diffusers' `clip_skip + 1`.
    """
    normal = config.layers - (1 if config.layer == "penultimate" else 0)
    if not 1 <= clip_skip <= normal:
        raise InputError(f"clip_skip must be between 1 and {normal} for this text encoder, got {clip_skip}")
    return normal - clip_skip + 1


def run_layers(layers: nn.ModuleList, x: torch.Tensor, count: int, recompute: bool) -> torch.Tensor:
    """The first `count` blocks in order; `recompute` keeps only block inputs for backward
    (gradient checkpointing, Chen et al. 2016)."""
    for block in layers[:count]:
        x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
    return x


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention in which token t sees tokens 0..t only (CLIP's text mask).

    q, k, v: (B, T, heads * d) -> (B, T, heads * d).
    """
    b, t, inner = q.shape
    q, k, v = (x.view(b, t, heads, inner // heads).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, d)
    return out.transpose(1, 2).reshape(b, t, inner)


def gather_end_tokens(hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, C): each row's state at its end token, the largest id in CLIP's vocabulary
    (49407); argmax finds its first occurrence, so padding with the end token (SD1) is fine."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]


# -- the HF-layout modules -----------------------------------------------------------------------

class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(width, width * MLP_RATIO)
        self.fc2 = nn.Linear(width * MLP_RATIO, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int, activation: str):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(width, activation)
        self.layer_norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(config.width, config.heads, config.activation) for _ in range(config.layers)
        )


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.context_length, config.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=LAYER_NORM_EPS)


class CLIPTextModel(nn.Module):
    """`encoder(input_ids, clip_skip=1) -> text_embeddings` (B, T, width), T <= context_length.

    With `config.projection_dim` set, `text_projection` (no bias, HF's CLIPTextModelWithProjection
    name) maps `pooled()` into CLIP's joint text-image space for contrastive training.
    `gradient_checkpointing = True` recomputes each block in backward while training.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.gradient_checkpointing = False
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The (vocab_size, width) table that textual-inversion embeddings extend."""
        return self.text_model.embeddings.token_embedding

    def _hidden_states(self, input_ids: torch.Tensor, count: int) -> torch.Tensor:
        check_input_ids(input_ids, self.config)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.text_model.embeddings(input_ids)
        x = run_layers(self.text_model.encoder.layers, x, count, recompute)
        return self.text_model.final_layer_norm(x)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """input_ids: (B, T) token ids -> (B, T, width), final LayerNorm applied to the chosen layer."""
        return self._hidden_states(input_ids, layers_to_run(self.config, clip_skip))

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, projection_dim or width): the last layer's state at the end token, projected
        when the model has a projection."""
        pooled = gather_end_tokens(self._hidden_states(input_ids, self.config.layers), input_ids)
        if self.config.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return pooled
