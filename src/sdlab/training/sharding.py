"""Fully sharded data parallelism (`shard_model`): each rank keeps 1/N of the trained weights, their
gradients, AdamW moments and EMA, for models whose training state does not fit one device.

This is ZeRO stage 3 (Rajbhandari et al. 2020) as PyTorch's FSDP2 implements it (`fully_shard`): every
block of a network (each element of its ModuleLists: a UNet level's ResNet and attention, a
transformer layer) is gathered from all ranks just before its forward, freed after it, gathered again
for its backward, and its gradients are averaged and split back over the ranks (reduce-scatter)
as soon as they are computed. The optimizer then steps each rank's shards only. Arithmetic is that of
unsharded training, so N sharded processes take the steps one process would.

Everything that leaves the run is whole: train_state.pt holds the gathered weights, EMA and optimizer
state in the unsharded layout (a sharded run resumes unsharded, or with another number of processes,
and the other way round), and validation and the final file use a full copy gathered on rank 0.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .distributed import Context, Replicated, adamw_options, note

FULL = StateDictOptions(full_state_dict=True)
FULL_ON_RANK0_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def networks(trained: nn.Module) -> list[nn.Module]:
    """The networks in a trainer's `trained` dict, looking inside nested ModuleDicts (DreamBooth's)."""
    if isinstance(trained, nn.ModuleDict):
        return [network for child in trained.values() for network in networks(child)]
    return [trained]


def block_names(module: nn.Module) -> list[str]:
    """The outermost modules with a forward of their own found in `module`'s ModuleLists (a UNet
    level's ResBlock and SpatialTransformer, a text encoder's layers): the units FSDP gathers one at a time."""
    containers = (nn.ModuleList, nn.ModuleDict)
    candidates = [f"{name}.{key}" if name else key
                  for name, child in module.named_modules() if isinstance(child, nn.ModuleList)
                  for key, block in child.named_children()
                  if not isinstance(block, containers) and any(True for _ in block.parameters())]
    return [name for name in candidates if not any(name.startswith(other + ".") for other in candidates)]


def shard(trained: nn.Module, device: torch.device, world_size: int) -> None:
    """fully_shard every block of every trained network, then each network as a whole (the weights
    outside blocks: embeddings, first and last layers, the UNet's middle block)."""
    mesh = init_device_mesh(device.type, (world_size,))
    for network in networks(trained):
        for name in block_names(network):
            fully_shard(network.get_submodule(name), mesh=mesh)
        fully_shard(network, mesh=mesh)


def held_fraction(module: nn.Module) -> tuple[float, int]:
    """(share of `module`'s weights stored on this rank, their total number)."""
    total = sum(p.numel() for p in module.parameters())  # a DTensor's numel is the whole tensor's
    return sum(local(p).numel() for p in module.parameters()) / max(total, 1), total


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedEMA:
    """The EMA of a sharded network, kept as this rank's shards (the same 1/N as the weights)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.shards = [local(p).detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for averaged, current in zip(self.shards, self.model.parameters()):
            averaged.lerp_(local(current).detach().to(averaged.dtype), 1 - decay)

    def full_state_dict(self) -> dict:
        """Collective. The EMA in the unsharded layout (the network's state_dict keys; buffers are the
        network's own, as ema.update_ema copies them), on rank 0's CPU; {} elsewhere."""
        shards = {name: (p, shard_) for (name, p), shard_ in zip(self.model.named_parameters(), self.shards)}
        on_rank0 = dist.get_rank() == 0
        state = {}
        for name, value in self.model.state_dict().items():  # the same order on every rank
            if name in shards:
                p, shard_ = shards[name]
                value = DTensor.from_local(shard_, p.device_mesh, p.placements, shape=p.shape,
                                           stride=p.stride()).full_tensor()
            if on_rank0:
                state[name] = value.detach().cpu()
        return state

    def load_full_state_dict(self, state: dict) -> None:
        """Every rank passes the whole EMA; each keeps its shards."""
        for i, (name, p) in enumerate(self.model.named_parameters()):
            whole = state[name].to(device=p.device, dtype=self.shards[i].dtype)
            self.shards[i] = distribute_tensor(whole, p.device_mesh, p.placements).to_local().clone()


def full_model_state(module: nn.Module) -> dict:
    """Collective. The whole state_dict of a sharded module on rank 0's CPU; {} elsewhere."""
    return get_model_state_dict(module, options=FULL_ON_RANK0_CPU)


def load_full_model_state(module: nn.Module, state: dict) -> None:
    """Every rank passes the whole state_dict; each keeps its shards."""
    set_model_state_dict(module, state, options=FULL)


def _parameter_names(trained: nn.Module) -> list[str]:
    return [name for name, p in trained.named_parameters() if p.requires_grad]


def full_optimizer_state(trained: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective. The optimizer's state in torch.optim's unsharded layout (parameters numbered in the
    order of trained.parameters()), on rank 0's CPU; {} elsewhere."""
    by_name = get_optimizer_state_dict(trained, optimizer, options=FULL_ON_RANK0_CPU)
    if not by_name:
        return {}
    number = {name: i for i, name in enumerate(_parameter_names(trained))}
    return {"state": {number[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_full_optimizer_state(trained: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Every rank passes the unsharded optimizer state (as optimizer.state_dict() or full_optimizer_state
    wrote it); each keeps the moments of its shards."""
    names = _parameter_names(trained)
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(trained, optimizer, by_name, options=FULL)


# -- the loop's view of it -----------------------------------------------------------------------------


class Sharded:
    """How the loop trains under `shard_model` with several processes: distributed.Replicated's methods,
    for sharded networks. FSDP averages and splits the gradients in backward; what leaves the run
    (checkpoint, validation, the final file) is gathered whole, into a copy rank 0 keeps on its CPU."""

    def __init__(self, ctx: Context, trained: nn.Module, model: nn.Module):
        self.ctx, self.trained, self.model = ctx, trained, model
        self.validates_here = True  # gathering the weights is collective: every rank takes part
        self.whole = copy.deepcopy(model).cpu().eval().requires_grad_(False) if ctx.is_main else None
        shard(trained, ctx.device, ctx.world_size)
        held, total = held_fraction(trained)
        note(f"weights, gradients, AdamW state and EMA sharded over {ctx.world_size} processes (FSDP): "
             f"rank 0 holds {held:.0%} of {total / 1e6:.2f} M trained weights")

    def optimizer(self, param_groups: list, config) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups, **adamw_options(config))  # it steps this rank's shards

    def ema(self) -> "ShardedEMA":
        return ShardedEMA(self.model)

    def sync_gradients(self, parameters: list) -> None:
        """Nothing left to do: FSDP averaged and split them in backward (reduce-scatter)."""

    def state_dicts(self, optimizer: torch.optim.Optimizer, ema) -> tuple[dict, dict, dict]:
        """Collective: every rank sends its shards to rank 0, in the unsharded layout; {} elsewhere."""
        return (full_model_state(self.trained), full_optimizer_state(self.trained, optimizer),
                ema.full_state_dict() if ema is not None else {})

    def load_state_dicts(self, state: dict, optimizer: torch.optim.Optimizer, ema) -> None:
        """Every rank passes the whole checkpoint; each keeps its shards."""
        load_full_model_state(self.trained, state["trained"])
        load_full_optimizer_state(self.trained, optimizer, state["optimizer"])
        if ema is not None:
            ema.load_full_state_dict(state["ema"])

    def published(self, ema) -> Optional[nn.Module]:
        """Collective. The EMA if kept, else the trained weights, gathered into rank 0's whole copy on its
        device (None on the other ranks)."""
        state = ema.full_state_dict() if ema is not None else full_model_state(self.model)
        if not self.ctx.is_main:
            return None
        self.whole.load_state_dict(state)
        return self.whole.to(self.ctx.device)

    def after_validation(self) -> None:
        if self.whole is not None:
            self.whole.cpu()  # off the GPU again while training runs
