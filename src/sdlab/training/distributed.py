"""Data parallelism over `torchrun` processes, written out: what PyTorch's DDP does, in plain sight.

Every rank holds the whole model, computes the loss on its slice of the global batch, and before the
optimizer step the gradients are averaged over ranks with all-reduce (Li et al. 2020, "PyTorch
Distributed", section 3). With per-sample losses that are means over the local slice, the average is
the gradient of the mean over the global batch, so N processes take the step one process would.
sdlab calls the all-reduce itself, once per optimizer step after the last accumulation micro-batch
(DDP's `no_sync`), instead of wrapping modules in `DistributedDataParallel`: the VAE's GAN step, the
adaptive weight and the contrastive loss then need no special cases. Gradients travel in flat
buckets of about 25 MB, DDP's default bucket size.

Backends: NCCL between GPUs, gloo between CPU processes. `shard_optimizer` splits the AdamW state over
the ranks (ZeRO stage 1, Replicated.optimizer); `shard_model` splits the weights, gradients, AdamW
state and EMA too (FSDP, sharding.py), and FSDP then averages the gradients itself. The loop sees
either through the same small interface: `Replicated` here, `sharding.Sharded` (parallel.py picks one).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ..errors import InputError
from .ema import EMA

BUCKET_BYTES = 25 * 1024 * 1024


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: Optional[str] = None) -> Context:
    """Join the process group when started by torchrun (WORLD_SIZE > 1) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise InputError(f"unknown device '{device}': use cpu, cuda or cuda:N") from exc
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise InputError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
            if dev.index is None:
                dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Context(rank, world_size, local_rank, dev)


def note(message: str) -> None:
    """One line on stderr from rank 0 only, so N processes do not say it N times."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"sdlab: {message}", file=sys.stderr)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def average_gradients(parameters: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """grad <- mean over ranks of grad, for every parameter that has one, in flat buckets.

    Every rank must hold gradients for the same parameters (true here: all ranks run the same code on
    equal-sized slices)."""
    if world_size == 1:
        return
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for grad in (p.grad for p in parameters if p.grad is not None):
        nbytes = grad.numel() * grad.element_size()
        if not buckets or size + nbytes > BUCKET_BYTES or grad.dtype != buckets[-1][0].dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += nbytes
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)  # a sum: gloo has no AVG
        flat /= world_size
        for grad, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            grad.copy_(part.view_as(grad))


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a (small) tensor over ranks, for logging and for the VAE's adaptive weight."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our rows and keeps them, so a loss
    computed from the gathered tensor on each rank back-propagates into every rank's own rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows = local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """(world_size * b, ...) rows of every rank in rank order; gradients flow back to their owners."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    return _GatherWithGrad.apply(local)


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (the ranks build identical models from one seed;
    this makes sure of it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


# -- the loop's view of it -----------------------------------------------------------------------------


def adamw_options(config) -> dict:
    """The recipe's AdamW settings (the learning rate is set again every step, loop.learning_rate)."""
    return dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                weight_decay=config.weight_decay)


class Replicated:
    """How the loop trains when every rank holds the whole model: one process, or data parallelism
    over torchrun's (gradients averaged before each step, above). sharding.Sharded is the other way,
    with the same methods; parallel.parallelism picks one.

    With `shard_optimizer` under torchrun the AdamW state is split (ZeRO stage 1, Rajbhandari et al.
    2020): the gradients are averaged either way, so every rank can update any share, and
    ZeroRedundancyOptimizer then broadcasts each share from its owner."""

    def __init__(self, ctx: Context, trained: torch.nn.Module, model: torch.nn.Module):
        self.ctx, self.trained, self.model = ctx, trained, model
        self.validates_here = ctx.is_main  # validation runs on rank 0 alone

    def optimizer(self, param_groups: list, config) -> torch.optim.Optimizer:
        if config.shard_optimizer and self.ctx.world_size > 1:
            # imported here: torch.distributed.optim costs seconds at start-up in every torchrun worker
            from torch.distributed.optim import ZeroRedundancyOptimizer

            note(f"AdamW state sharded over {self.ctx.world_size} processes (ZeRO stage 1)")
            return ZeroRedundancyOptimizer(param_groups, optimizer_class=torch.optim.AdamW, **adamw_options(config))
        if config.shard_optimizer:
            note("shard_optimizer has nothing to split in a single process; training unsharded")
        return torch.optim.AdamW(param_groups, **adamw_options(config))

    def ema(self) -> EMA:
        return EMA(self.model)

    def sync_gradients(self, parameters: list) -> None:
        """After the last micro-batch's backward: every rank's gradients become their mean."""
        average_gradients(parameters, self.ctx.world_size)

    def state_dicts(self, optimizer: torch.optim.Optimizer, ema: Optional[EMA]) -> tuple[dict, dict, dict]:
        """Collective. (trained weights, optimizer, EMA) state for the checkpoint, on rank 0; {} elsewhere."""
        if hasattr(optimizer, "consolidate_state_dict"):  # ZeroRedundancyOptimizer
            optimizer.consolidate_state_dict(to=0)  # collective: every rank sends its shard to rank 0
        if not self.ctx.is_main:
            return {}, {}, {}
        return (self.trained.state_dict(), optimizer.state_dict(),
                ema.full_state_dict() if ema is not None else {})

    def load_state_dicts(self, state: dict, optimizer: torch.optim.Optimizer, ema: Optional[EMA]) -> None:
        """Every rank loads the whole checkpoint (`state_dicts`' layout)."""
        self.trained.load_state_dict(state["trained"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_full_state_dict(state["ema"])

    def published(self, ema: Optional[EMA]) -> Optional[torch.nn.Module]:
        """What validation and the final file use: the EMA if kept, else the trained weights."""
        return ema.module if ema is not None else self.model

    def after_validation(self) -> None:
        pass

