"""The UNet's spatial transformer: image tokens attend to themselves and to the text embeddings.

Module names follow CompVis `ldm/modules/attention.py`, so the checkpoint keys under
`input_blocks.N.1.` read `norm`, `proj_in`, `transformer_blocks.K.{attn1,attn2,ff,norm1..3}`,
`proj_out`. Every attention product goes through `attention()` and every projection is an
`nn.Linear` named `to_q/to_k/to_v/to_out.0`: the places where low-rank adapters attach (LoRA).

Attention hooks: `attention_hooks(unet, hook)` sets one function on the attention layers it names;
while set, each of those layers computes its probabilities explicitly and passes them to
`hook(site, probabilities)`, which reads them (returns None) or returns the probabilities to use
instead. Attention maps (`recorded_cross_attention`, `sdlab attention`, the grounding loss) read them,
prompt-to-prompt replaces them. A layer without a hook runs the fused kernel: one `is None` test.

Text projections: the prompt is the same at every sampling step, so its keys and values are too.
Inside `text_projections_cached(unet)` (the pipelines enter it for a sampling run), each layer that
attends to the text computes `to_k(context)`, `to_v(context)` once per distinct context and reuses
them: the same numbers, ~5 GFLOP less per SD 1.5 step with CFG. Adapters on to_k/to_v (dynamic LoRA's
forward hooks) are in those calls; with gradients on (training) and in torch.compile'd code the cache
is bypassed.

Self-attention scale: inside `sharpened_self_attention(unet, S)` the self-attention layers multiply
their logits by S (`--self-attention-scale`); outside it, `logit_scale` is None and nothing changes.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              logit_scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017, eq. 1); the logits times `logit_scale`
    when one is given (None: the network as trained, the fused kernel's own scale).

    q: (B, Lq, heads * d), k and v: (B, Lk, heads * d) -> (B, Lq, heads * d).
    The head split is a view; scaled_dot_product_attention takes the strided tensors as they are.
    """
    b, lq, inner = q.shape
    d = inner // heads
    q = q.view(b, lq, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    v = v.view(b, -1, heads, d).transpose(1, 2)
    scale = None if logit_scale is None else logit_scale * d ** -0.5
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, heads, Lq, d)
    return out.transpose(1, 2).reshape(b, lq, inner)


def _split_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
    b, lq, inner = q.shape
    d = inner // heads
    return (q.view(b, lq, heads, d).transpose(1, 2), k.view(b, -1, heads, d).transpose(1, 2),
            v.view(b, -1, heads, d).transpose(1, 2))


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int,
                            logit_scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, (B, heads, Lq, Lk): where each query position looks; the logits
    times `logit_scale` when one is given, as in attention()."""
    q, k, _ = _split_heads(q, k, k, heads)
    scale = q.shape[-1] ** -0.5 if logit_scale is None else logit_scale * q.shape[-1] ** -0.5
    return (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)


def attend(probabilities: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The values mixed by (B, heads, Lq, Lk) probabilities: v (B, Lk, heads * d) -> (B, Lq, heads * d)."""
    b, heads, lq, _ = probabilities.shape
    v = v.view(b, -1, heads, v.shape[-1] // heads).transpose(1, 2)
    return (probabilities @ v).transpose(1, 2).reshape(b, lq, -1)


def attention_with_probabilities(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention()` computed step by step, also returning the attention probabilities averaged over the
    heads, (B, Lq, Lk). Differentiable, for losses on the maps."""
    probabilities = attention_probabilities(q, k, heads)
    return attend(probabilities, v), probabilities.mean(dim=1)


@dataclass(frozen=True)
class AttentionSite:
    """Which attention layer a hook is called from.

    name: the layer's module path ("input_blocks.1.1.transformer_blocks.0.attn2"); place: "down", "mid"
    or "up" (input, middle or output blocks); cross: attending to the text (attn2, or attn1 of a block
    without self-attention) rather than to the image itself.
    """

    name: str
    place: str
    cross: bool


# hook(site, probabilities (B, heads, Lq, Lk)) -> None to leave them, or the probabilities to use instead
AttentionHook = Callable[[AttentionSite, torch.Tensor], Optional[torch.Tensor]]


class TextProjections:
    """The text's keys and values per attention layer, for the contexts of one sampling run.

    A context is known by its content: classifier-free guidance concatenates (uncond, cond) into a new
    tensor at every step. The first layer of a UNet call compares it with the contexts seen (a few
    hundred thousand numbers, nothing beside the projections it saves); the later layers of that call
    are handed the same tensor object and find it at once. Prompt editing (`[from:to:when]`) brings
    a new context at its switching step; more than `limit` distinct ones start the store afresh.
    """

    def __init__(self, limit: int = 8):
        self.limit = limit
        self.contexts: list[torch.Tensor] = []
        self.last: Optional[tuple[torch.Tensor, int, int]] = None  # (context object, its _version, index)
        # (id(layer), context index) -> (projection_state(layer), keys, values)
        self.projections: dict[tuple[int, int], tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        # a server may run two generations on one UNet at once: both then use the first one's store
        self.lock = threading.Lock()

    def context_index(self, context: torch.Tensor) -> int:
        if self.last is not None and self.last[0] is context and self.last[1] == context._version:
            return self.last[2]
        for index, known in enumerate(self.contexts):
            if known.shape == context.shape and known.dtype == context.dtype and torch.equal(known, context):
                break
        else:
            if len(self.contexts) == self.limit:
                self.contexts.clear()
                self.projections.clear()
            self.contexts.append(context.clone())
            index = len(self.contexts) - 1
        self.last = (context, context._version, index)
        return index

    def key_value(self, layer: "CrossAttention", context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer.to_k(context), layer.to_v(context)), computed on the first call for this context and
        again only if the layer's weights or adapters changed since."""
        with self.lock:
            slot, state = (id(layer), self.context_index(context)), projection_state(layer)
            found = self.projections.get(slot)
            if found is None or found[0] != state:
                found = self.projections[slot] = (state, layer.to_k(context), layer.to_v(context))
            return found[1], found[2]


def projection_state(layer: "CrossAttention") -> tuple:
    """What to_k's and to_v's outputs depend on besides their input: the weight tensors, their in-place
    versions (a merged LoRA bumps them) and the forward hooks (a dynamic LoRA adds them)."""
    return tuple((id(p.weight), p.weight._version, tuple(p._forward_hooks)) for p in (layer.to_k, layer.to_v))


class CrossAttention(nn.Module):
    """Multi-head attention of `x` to `context` (to itself when context is None).

    The query, key and value projections have no bias, the output projection has one (ldm).
    While `hook` is set (see `attention_hooks`), the probabilities are computed explicitly and go
    through it.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: Optional[int] = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        # index 1 is ldm's dropout slot (p = 0 in every SD config); it keeps the key `to_out.0`
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())
        self.hook: Optional[AttentionHook] = None  # set by attention_hooks, with self.site
        self.site: Optional[AttentionSite] = None
        self.text_projections: Optional[TextProjections] = None  # set by text_projections_cached
        self.logit_scale: Optional[float] = None  # set by sharpened_self_attention

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = self.to_q(x)
        k, v = (self.to_k(x), self.to_v(x)) if context is None else self.text_keys_values(context)
        if self.hook is None:
            return self.to_out(attention(q, k, v, self.heads, self.logit_scale))
        probabilities = attention_probabilities(q, k, self.heads, self.logit_scale)
        replaced = self.hook(self.site, probabilities)
        return self.to_out(attend(probabilities if replaced is None else replaced, v))

    def text_keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """to_k(context), to_v(context): from the run's store when one is set (text_projections_cached),
        except while training and in torch.compile'd code, which cannot hold the lookup by content."""
        store = self.text_projections
        if torch.compiler.is_compiling() or store is None or torch.is_grad_enabled():
            return self.to_k(context), self.to_v(context)
        return store.key_value(self, context)


class GEGLU(nn.Module):
    """x * GELU(gate), both halves from one projection (Shazeer 2020, "GLU Variants")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return x * F.gelu(gate)
        # the product into GELU's fresh output: one (B, L, 4 * dim) tensor less to allocate and fill
        return F.gelu(gate).mul_(x)


class FeedForward(nn.Module):
    """GEGLU to 4x the width and back; `net.1` is ldm's dropout slot so the keys read `net.0`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, feed-forward; each with a residual.

    `disable_self_attention` (the x4 upscaler's high-resolution levels) makes attn1 attend to the
    context as well, so the block has two cross-attentions and no self-attention.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, disable_self_attention: bool = False):
        super().__init__()
        self.disable_self_attention = disable_self_attention
        self.attn1 = CrossAttention(dim, heads, head_dim, context_dim if disable_self_attention else None)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim)
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.token_merge = None  # ToMe's x -> (merge, unmerge) around the self-attention; set by fast/tome.py

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # each residual is added in place into the branch's output, a Linear's fresh tensor that autograd
        # does not keep (its backward needs its input): no new (B, L, dim) tensor per add
        if self.token_merge is not None:
            merge, unmerge = self.token_merge(x)
            h = unmerge(self.attn1(merge(self.norm1(x))))
        else:
            h = self.attn1(self.norm1(x), context if self.disable_self_attention else None)
        h += x
        x = self.attn2(self.norm2(h), context)
        x += h
        h = self.ff(self.norm3(x))
        h += x
        return h


class SpatialTransformer(nn.Module):
    """Transformer over the h*w positions of a feature map, added back to its input.

    SD1 projects in and out with 1x1 convolutions on the map, SD2 (`use_linear_projection`) with
    Linear layers on the tokens; the arithmetic is the same, the weight shapes differ.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 use_linear_projection: bool = False, disable_self_attention: bool = False, groups: int = 32):
        super().__init__()
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        # eps 1e-6 here (ldm attention.Normalize), unlike the ResBlocks' 1e-5
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, disable_self_attention) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear_projection:
            tokens = self.proj_in(tokens)
        # one copy into token-major memory: strided tokens would make every LayerNorm and residual
        # add in the blocks copy again
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, inner)
        if self.use_linear_projection:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear_projection:
            tokens = self.proj_out(tokens)
        tokens = tokens.transpose(1, 2).reshape(b, -1, h, w)  # a strided view, no copy
        if not self.use_linear_projection:
            tokens = self.proj_out(tokens)
        # x first: the sum takes x's contiguous layout, the residual add doubling as the copy back
        return x + tokens


def map_shape(positions: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of a recorded attention map over `positions` latent positions, for an image height x width:
    every UNet level keeps the image's aspect ratio."""
    h = round((positions * height / width) ** 0.5)
    return h, positions // h


PLACES = {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}


def attention_sites(unet: nn.Module) -> list[tuple[CrossAttention, AttentionSite]]:
    """Every attention layer of `unet` with its site, in the order a forward pass calls them."""
    found = []
    for name, block in unet.named_modules():
        if isinstance(block, BasicTransformerBlock):
            place = PLACES.get(name.split(".")[0], "mid")
            found.append((block.attn1, AttentionSite(f"{name}.attn1", place, block.disable_self_attention)))
            found.append((block.attn2, AttentionSite(f"{name}.attn2", place, True)))
    return found


@contextmanager
def attention_hooks(unet: nn.Module, hook: AttentionHook, cross: bool = True, self_attention: bool = False,
                    places: tuple[str, ...] = ("down", "mid", "up")) -> Iterator[list[AttentionSite]]:
    """While inside, `hook` sees (and may replace) the probabilities of `unet`'s attention layers: the
    text cross-attentions when `cross`, the self-attentions when `self_attention`, in the UNet `places`
    given. Yields the hooked sites. One hook per layer: hooking a hooked layer is a mistake, not a chain."""
    chosen = [(layer, site) for layer, site in attention_sites(unet)
              if (cross if site.cross else self_attention) and site.place in places]
    if any(layer.hook is not None for layer, _ in chosen):
        raise RuntimeError("an attention hook is already set on these layers; leave its `with` block first")
    for layer, site in chosen:
        layer.hook, layer.site = hook, site
    try:
        yield [site for _, site in chosen]
    finally:
        for layer, _ in chosen:
            layer.hook, layer.site = None, None


@contextmanager
def sharpened_self_attention(unet: nn.Module, scale: float) -> Iterator[int]:
    """While inside, `unet`'s self-attention layers multiply their logits by `scale` (1: as trained);
    the cross-attention to the text is left alone. Yields how many layers it changed.

    Above 1 each image position attends to fewer others. On a canvas larger than the model was trained
    on, a position then copies less of what is drawn elsewhere: the repeated objects of a model used
    off its size are fewer (Jin et al. 2023, "Training-free Diffusion Model Adaptation for Variable-Sized
    Text-to-Image Synthesis", scale the logits by sqrt(log N / log N_train) for N tokens against the
    trained N_train; the bundled model wants a stronger scale, MODEL_CARD.md). Only an attribute
    changes, and leaving restores it, after an exception too."""
    layers = [layer for layer, site in attention_sites(unet) if not site.cross]
    for layer in layers:
        layer.logit_scale = float(scale)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.logit_scale = None


@contextmanager
def text_projections_cached(unet: nn.Module) -> Iterator[Optional[TextProjections]]:
    """While inside, `unet`'s attention layers compute the text's keys and values once per distinct
    context (TextProjections) instead of at every call: for one generation, the LoRAs it merges or
    hooks in included. Inside an enclosing one it changes nothing (yields None)."""
    layers = [module for module in unet.modules() if isinstance(module, CrossAttention)]
    if any(layer.text_projections is not None for layer in layers):
        yield None
        return
    store = TextProjections()
    for layer in layers:
        layer.text_projections = store
    try:
        yield store
    finally:
        for layer in layers:
            layer.text_projections = None


@contextmanager
def recorded_cross_attention(unet: nn.Module, sink=None) -> Iterator:
    """While inside, every text cross-attention of `unet` appends its head-averaged (B, h*w, tokens)
    attention probabilities, in call order, to `sink` (anything with an `append`; default a new list),
    which this yields. Differentiable: the grounding loss trains on them."""
    maps = [] if sink is None else sink

    def record(site: AttentionSite, probabilities: torch.Tensor) -> None:
        maps.append(probabilities.mean(dim=1))

    with attention_hooks(unet, record):
        yield maps
