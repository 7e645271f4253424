"""Which way the processes of a run share the work: replicated (distributed.Replicated: DDP, ZeRO-1)
or sharded (sharding.Sharded: FSDP). The FSDP module is imported only when a run shards the model."""

from __future__ import annotations

import torch

from .distributed import Context, Replicated, note


def parallelism(config, ctx: Context, trained: torch.nn.Module, model: torch.nn.Module):
    """sharding.Sharded under `shard_model` with several processes, else Replicated."""
    if config.shard_model and ctx.world_size > 1:
        # imported only here: FSDP and DTensor take seconds to import, which every torchrun worker paid
        from .sharding import Sharded

        return Sharded(ctx, trained, model)
    if config.shard_model:
        note("shard_model has nothing to split in a single process; training unsharded")
    return Replicated(ctx, trained, model)
