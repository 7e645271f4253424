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

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

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
        network's own, as loop.update_ema copies them), on rank 0's CPU; {} elsewhere."""
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
