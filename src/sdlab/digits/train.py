"""Training the digits denoiser from scratch: the noise-prediction MSE of Ho et al. 2020 (Algorithm 1),
on SD's own noise schedule, with class dropout for classifier-free guidance and an EMA of the weights.

One flat loop: draw a batch of real digits, a timestep and noise per digit, noise them
(x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps), predict the noise, step AdamW on the MSE.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from ..schedules import alphas_cumprod
from ..training.diffusion import noised, prediction_errors
from ..training.ema import EMA, ema_decay_at
from . import DEFAULT_TRAINING_STEPS
from .data import real_digits
from .draw import SCHEDULE
from .model import NULL_LABEL, DigitsConfig, DigitsNet



def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_digits(steps: int = DEFAULT_TRAINING_STEPS, batch_size: int = 128, lr: float = 2e-3, label_dropout: float = 0.1,
                 ema_decay: float = 0.999, seed: int = 0, config: DigitsConfig = DigitsConfig(),
                 log: Optional[Callable[[int, float], None]] = None, log_every: int = 250) -> tuple[DigitsNet, dict]:
    """Train a DigitsNet on scikit-learn's digits; returns (its EMA copy, info: steps, seconds, losses).

    `log(step, mean loss since the last report)` is called every `log_every` steps and at the end."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = real_digits()  # (N, 1, 8, 8) in [-1, 1], (N,)
    net = DigitsNet(config)
    ema = EMA(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    a = alphas_cumprod(SCHEDULE)  # (1000,)
    losses, running, started = [], [], time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x0, y = images[index], labels[index]
        # class dropout: the "no digit" label teaches the unconditional half of CFG (Ho & Salimans 2022, Alg. 1)
        y = torch.where(torch.rand(batch_size, generator=generator) < label_dropout, NULL_LABEL, y)
        t = torch.randint(len(a), (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy, target = noised(x0, noise, a[t].reshape(-1, 1, 1, 1), "epsilon")
        loss = prediction_errors(net(noisy, t.float(), y), target).mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(ema_decay_at(step, ema_decay))
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            losses.append(sum(running) / len(running))
            running = []
            if log is not None:
                log(step + 1, losses[-1])
    info = {"steps": steps, "batch_size": batch_size, "seconds": round(time.perf_counter() - started, 1),
            "losses": [round(v, 5) for v in losses], "seed": seed}
    return ema.module, info
