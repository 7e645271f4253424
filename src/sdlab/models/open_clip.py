"""OpenCLIP ViT-H/14's text transformer, the text encoder of SD 2.x.

The same architecture as CLIP's text tower (Radford et al. 2021, section 2.4), trained by LAION
(Cherti et al. 2023, "Reproducible scaling laws for contrastive language-image learning"): 24
pre-LN blocks of width 1024 and 16 heads, exact GELU, causal attention. SD 2.x conditions on the
*penultimate* block (Stability's `FrozenOpenCLIPEmbedder`, layer="penultimate"): the last block
runs only for `pooled()`, yet its weights stay in every SD2 file and load here.

Attribute names are OpenCLIP's, as SD2 single files store them under `cond_stage_model.model.`
(the visual tower deleted): `token_embedding`, `positional_embedding`, `transformer.resblocks.N.
{ln_1, attn.in_proj_weight/in_proj_bias/out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, and the
contrastive head `text_projection` (width, projection_dim), applied as x @ text_projection, and
`logit_scale`. The attention keeps torch.nn.MultiheadAttention's packed q/k/v layout.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .clip import (
    LAYER_NORM_EPS,
    MLP_RATIO,
    Activation,
    causal_self_attention,
    check_config,
    check_input_ids,
    gather_end_tokens,
    layers_to_run,
    run_layers,
)

# OpenCLIP's initial temperature: logits = exp(logit_scale) * cosine similarity, 1 / 0.07 at the start
# (Radford et al. 2021, section 2.5)
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)


class MultiheadSelfAttention(nn.Module):
    """Causal self-attention whose q, k, v projections are stacked in one (3 * width, width) matrix."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width**-0.5)  # OpenCLIP's attention init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(causal_self_attention(q, k, v, self.heads))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, activation: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, width * MLP_RATIO),
            gelu=Activation(activation),  # OpenCLIP's name for the slot, whatever the function
            c_proj=nn.Linear(width * MLP_RATIO, width),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(config.width, config.heads, config.activation) for _ in range(config.layers)
        )


class OpenCLIPTextModel(nn.Module):
    """`encoder(input_ids, clip_skip=1) -> text_embeddings` (B, T, width), T <= context_length.

    `config.projection_dim` set (as in every SD2 file) adds `text_projection` and `logit_scale`.
    `gradient_checkpointing = True` recomputes each block in backward while training.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.gradient_checkpointing = False
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(config)
        self.ln_final = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        # OpenCLIP's initial scales; a checkpoint overwrites them
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if config.projection_dim is not None:
            self.text_projection = nn.Parameter(torch.empty(width, config.projection_dim))
            self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))  # a scalar, shape ()
            nn.init.normal_(self.text_projection, std=width**-0.5)

    def _hidden_states(self, input_ids: torch.Tensor, count: int) -> torch.Tensor:
        check_input_ids(input_ids, self.config)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
        x = run_layers(self.transformer.resblocks, x, count, recompute)
        return self.ln_final(x)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """input_ids: (B, T) token ids -> (B, T, width); ln_final applied to the chosen layer
        (the penultimate one for clip_skip=1 in SD2)."""
        return self._hidden_states(input_ids, layers_to_run(self.config, clip_skip))

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, projection_dim or width): the last block's state at the end token, after
        ln_final, times text_projection (OpenCLIP's `encode_text`)."""
        pooled = gather_end_tokens(self._hidden_states(input_ids, self.config.layers), input_ids)
        if self.config.projection_dim is not None:
            pooled = pooled @ self.text_projection
        return pooled
