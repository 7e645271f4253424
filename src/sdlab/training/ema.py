"""The exponential moving average of the trained weights, which validation and the saved file use.

Under `shard_model` each rank keeps its shards of it instead (sharding.ShardedEMA, the same methods).
"""

from __future__ import annotations

import copy

import torch


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)), as TensorFlow's
    ExponentialMovingAverage with num_updates: early averages forget the random initialisation fast."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for averaged, current in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(current.detach().to(averaged.dtype), 1 - decay)
    for averaged, current in zip(ema.buffers(), model.buffers()):
        averaged.copy_(current)


class EMA:
    """A frozen copy of `model` (`module`) that follows its weights; buffers are copied as they are."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def update(self, decay: float) -> None:
        update_ema(self.module, self.model, decay)

    def full_state_dict(self) -> dict:
        return self.module.state_dict()

    def load_full_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
