"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion").

Self-attention costs the square of the image tokens, and neighbouring tokens are often nearly equal.
Before a full-resolution self-attention, a share `ratio` of the tokens is merged into similar ones
(averaged); after it, every merged token takes the output of the token it was merged into.

The matching is ToMe's bipartite soft matching with SD's 2D twist (their sec. 3-4): the map is cut into
2x2 cells, one random position of each cell is a destination, all others are sources; each source finds
its most similar destination (cosine similarity of the block's input tokens), and the `ratio * N`
sources with the best matches move. Only the self-attention is merged (ToMe for SD's default: merging
cross-attention and the MLP saves little more and costs more quality), and only at the UNet's full
latent resolution, where the tokens are most numerous.

BasicTransformerBlock (models/attention.py) calls its `token_merge(x) -> (merge, unmerge)` when one is
set; `token_merging(unet, ratio, latent_size)` sets and removes them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ..models.attention import BasicTransformerBlock

Merge = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def destination_positions(h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """One random position of each 2x2 cell of an h x w map, as flat (row-major) token indices.
    Leftover rows and columns of an odd side hold sources only."""
    offsets = torch.randint(4, (h // 2, w // 2), generator=generator)
    rows = torch.arange(h // 2)[:, None] * 2 + offsets // 2
    cols = torch.arange(w // 2)[None, :] * 2 + offsets % 2
    return (rows * w + cols).flatten()


def bipartite_soft_matching(metric: torch.Tensor, h: int, w: int, ratio: float,
                            generator: torch.Generator) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens (B, h*w, C) whose similarity is read off `metric` (B, h*w, C'):
    merge (B, N, C) -> (B, N - r, C) with r = int(ratio * N), unmerge back to (B, N, C)."""
    b, n, _ = metric.shape
    dst_positions = destination_positions(h, w, generator).to(metric.device)
    is_dst = torch.zeros(n, dtype=torch.bool, device=metric.device)
    is_dst[dst_positions] = True
    src_positions = (~is_dst).nonzero().squeeze(1)
    r = min(int(ratio * n), len(src_positions))
    if r == 0:
        return _identity, _identity

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, src_positions] @ metric[:, dst_positions].transpose(1, 2)  # (B, sources, destinations)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)[..., None]  # (B, sources, 1), best matches first
        kept_idx, moved_idx = order[:, r:], order[:, :r]
        into_idx = best_dst[..., None].gather(1, moved_idx)  # (B, r, 1): the destination of each moved source

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_positions], x[:, dst_positions]
        kept = src.gather(1, kept_idx.expand(-1, -1, c))
        moved = src.gather(1, moved_idx.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, into_idx.expand(-1, -1, c), moved, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        kept, dst = x[:, :kept_idx.shape[1]], x[:, kept_idx.shape[1]:]
        src = x.new_empty(b, len(src_positions), c)
        src.scatter_(1, kept_idx.expand(-1, -1, c), kept)
        src.scatter_(1, moved_idx.expand(-1, -1, c), dst.gather(1, into_idx.expand(-1, -1, c)))
        out = x.new_empty(b, n, c)
        out[:, dst_positions] = dst
        out[:, src_positions] = src
        return out

    return merge, unmerge


class TokenMerge:
    """A BasicTransformerBlock's `token_merge`: merges at the full latent size (h, w), nowhere else.
    Destinations are drawn from `generator`, so a run draws the same ones each time."""

    def __init__(self, ratio: float, latent_size: tuple[int, int], generator: torch.Generator):
        self.ratio, self.latent_size, self.generator = ratio, latent_size, generator

    def __call__(self, x: torch.Tensor) -> tuple[Merge, Merge]:
        h, w = self.latent_size
        if x.shape[1] != h * w:
            return _identity, _identity
        return bipartite_soft_matching(x, h, w, self.ratio, self.generator)


@contextmanager
def token_merging(unet: nn.Module, ratio: float, latent_size: tuple[int, int], seed: int = 0) -> Iterator[None]:
    """While inside, `unet`'s self-attentions at the latent size (h, w) merge `ratio` of their tokens."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock) and not m.disable_self_attention]
    if any(block.token_merge is not None for block in blocks):
        raise RuntimeError("token merging is already on for this UNet; leave its `with` block first")
    merge = TokenMerge(ratio, latent_size, torch.Generator().manual_seed(seed))
    for block in blocks:
        block.token_merge = merge
    try:
        yield
    finally:
        for block in blocks:
            block.token_merge = None
