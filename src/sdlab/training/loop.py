"""The training loop every trainer shares, top to bottom: data, mixed precision, gradient accumulation,
gradient averaging over ranks (or FSDP sharding), clipping, EMA, validation, checkpoints. How the ranks
share the work is one object with a few methods (distributed.Replicated or sharding.Sharded).

A trainer (vae.py, text.py, unet.py) is an nn.Module built by `build(config, device)` with:
    trained: nn.ModuleDict       the modules the optimizer updates (their state is checkpointed)
    model: nn.Module             what EMA averages and the final file holds (part of `trained`)
    default_ema_decay: float     EMA decay when the recipe leaves `ema_decay` unset (0: no EMA)
    resolution: int              training image side when the recipe leaves `resolution` unset
    loss(batch) -> (loss, logs)  the scalar to minimise for one micro-batch, and values to log (the
                                 loss itself unless logs has a "loss" entry)
    validate(model, examples, step, out_dir)   write a picture of how `model` does (rank 0, no grad)
    save(out_dir, model, data) -> path         write the result (rank 0), e.g. OUT/last.safetensors
    training_data(size) (optional)             its own data source instead of the recipe's `data` (dpo:
                                               pairs of pictures it drew while being built)
Frozen networks (the UNet trainer's VAE and text encoder) live on the trainer outside `trained`.

A run prints its resolved settings as it starts and keeps them in OUT/config.toml (recipe_file.py).
Resumable state, OUT/train_state.pt: trained weights, EMA, optimizer, grad scaler, step, RNG states and
loss history. The data position is the step itself (data.py). Files are written to a temporary name
and renamed over the old one, so a kill or Ctrl-C leaves the previous checkpoint intact and costs at
most the steps since it.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import ConfigError
from ..progress import ProgressBar
from . import distributed
from .parallel import parallelism
from .buckets import size_multiple
from .config import RESUMABLE_CHANGES, TrainConfig, trainer_module
from .data import batches, training_data
from .ema import ema_decay_at
from .plots import loss_plot
from .recipe_file import recipe_toml, settings_summary

STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.toml"  # the run's resolved settings, a recipe that `--config` reads back


def build_trainer(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """`build(config, device)` of the trainer's module (config.trainer_module): sdlab.training's own, or
    one a package registered."""
    return importlib.import_module(trainer_module(config)).build(config, device)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `precision` on `device`; None: plain fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None  # CPU bf16 is only fast with native bf16 instructions; ask for it with --precision bf16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 mixed precision needs a CUDA GPU; on CPU use --precision bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16; use --precision fp16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant or a half cosine down to 0 at `steps` (or at
    `lr_schedule_steps`, for a run that is the start of a longer schedule)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        end = config.lr_schedule_steps or config.steps
        progress = (step - config.warmup_steps) / max(1, end - config.warmup_steps)
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr


def rng_states(device: torch.device) -> dict:
    """Every global generator, so a resumed run draws what the uninterrupted one would have. On a GPU,
    only this process's device: touching the others would open a CUDA context on each."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [name, keys.tolist(), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename tmp over `path`: readers see the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def param_groups(trainer, params: list) -> list:
    """The optimizer's parameter groups: one, or the trainer's own (each may carry an `lr_scale`, a
    factor on the scheduled learning rate)."""
    groups = trainer.param_groups() if hasattr(trainer, "param_groups") else [{"params": params}]
    grouped = [p for group in groups for p in group["params"]]
    if len(grouped) != len(params) or {id(p) for p in grouped} != {id(p) for p in params}:
        raise RuntimeError(f"{type(trainer).__name__}.param_groups() must hold each trained weight once")
    return groups


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    current = config.to_dict()
    changed = sorted(k for k in current.keys() | saved.keys()
                     if k not in RESUMABLE_CHANGES and current.get(k) != saved.get(k))
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume {path} with a different recipe ({details}); use the same settings "
                          f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change) or a new --out")


def check_run_folder(state_path: Path, resume: bool, config: TrainConfig) -> None:
    """A resumed run needs its checkpoint and the same recipe; a new one needs a folder without a run."""
    if resume and not state_path.exists():
        raise ConfigError(f"nothing to resume: {state_path} does not exist; start without --resume")
    if not resume and state_path.exists():
        raise ConfigError(f"{state_path.parent} already holds a run ({STATE_FILE}); continue it with --resume or "
                          "choose another --out")
    if resume:  # class images and preference pairs a trainer writes while being built stay untouched if refused
        check_resumable(torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)["config"],
                        config, state_path)


def train(config: TrainConfig, resume: bool = False, callback: Optional[Callable[[dict], None]] = None,
          quiet: bool = False) -> Path:
    """Run `config` (in this process, or as one rank of a torchrun job); returns the saved file's path.

    callback(info) runs after every optimizer step (and its checkpoint) with
    {"step", "steps", "logs", "lr"}; an exception from it stops the run like Ctrl-C would.
    """
    ctx = distributed.setup(config.device)
    try:
        return _train(config, ctx, resume, callback, quiet)
    finally:
        distributed.cleanup()


def _train(config: TrainConfig, ctx: distributed.Context, resume: bool, callback, quiet: bool) -> Path:
    device, main = ctx.device, ctx.is_main
    out = Path(config.out_dir)
    state_path = out / STATE_FILE
    check_run_folder(state_path, resume, config)  # before building: a trainer may write into OUT as it is built
    distributed.barrier()  # every rank has looked before rank 0 writes anything
    if main and not quiet:
        print(settings_summary(config), file=sys.stderr, flush=True)
    torch.manual_seed(config.seed)  # the same initial weights on every rank and in every rerun
    trainer = build_trainer(config, device)  # refuses a bad recipe before anything is written
    if main:
        (out / "validation").mkdir(parents=True, exist_ok=True)
        atomic_write(out / CONFIG_FILE, lambda tmp: tmp.write_text(recipe_toml(config), encoding="utf-8"))
    distributed.broadcast_module(trainer.trained)
    for module in trainer.trained.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = config.gradient_checkpointing
    ema_decay = trainer.default_ema_decay if config.ema_decay is None else config.ema_decay
    # how the ranks share the work: whole copies (DDP, optionally ZeRO-1) or shards (FSDP)
    parallel = parallelism(config, ctx, trainer.trained, trainer.model)
    params = [p for p in trainer.trained.parameters() if p.requires_grad]
    optimizer = parallel.optimizer(param_groups(trainer, params), config)
    amp_dtype = autocast_dtype(config.precision, device)
    # fp16 gradients underflow without loss scaling (Micikevicius et al. 2018); bf16 has fp32's range
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = parallel.ema() if ema_decay > 0 else None

    start_step, history = 0, {}
    if resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        parallel.load_state_dicts(state, optimizer, ema)
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"], device)
        start_step, history = state["step"], state["history"]
        del state

    size = config.resolution or trainer.resolution
    data = (trainer.training_data(size) if hasattr(trainer, "training_data")
            else training_data(config, size, main, size_multiple(getattr(trainer, "model_config", None))))
    validation_examples = data.validation_examples(config.validation_images)
    micro_batches = batches(data, start_step, config.steps, config.batch_size, config.grad_accum, ctx.rank,
                            ctx.world_size, config.num_workers, config.seed, device)

    def save_checkpoint(step: int) -> None:
        trained, optimizer_state, ema_state = parallel.state_dicts(optimizer, ema)  # collective
        if main:
            state = {"step": step, "trained": trained, "ema": ema_state, "optimizer": optimizer_state,
                     "scaler": scaler.state_dict(), "rng": rng_states(device), "history": history,
                     "config": config.to_dict()}
            atomic_write(state_path, lambda tmp: torch.save(state, tmp))
            atomic_write(out / "loss.png", lambda tmp: loss_plot(history, f"sdlab train {config.trainer}").save(tmp, "PNG"))

    def validate(step: int) -> None:
        model = parallel.published(ema)  # the EMA if kept, else the trained weights (None off rank 0)
        if main:
            model.eval()
            trainer.validate(model, validation_examples, step, out / "validation")
        parallel.after_validation()
        trainer.trained.train()

    desc = f"train {config.trainer} " + (f"(steps {start_step + 1}-{config.steps}) " if start_step else "")
    bar = ProgressBar(config.steps - start_step, desc) if main and not quiet else None
    trainer.trained.train()
    started = time.perf_counter()
    for step in range(start_step, config.steps):
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

        logs: dict[str, torch.Tensor] = {}
        for _ in range(config.grad_accum):
            batch = next(micro_batches)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, parts = trainer.loss(batch)
            scaler.scale(loss / config.grad_accum).backward()
            parts.setdefault("loss", loss)
            for name, value in parts.items():
                logs[name] = logs.get(name, 0) + value.detach().float() / config.grad_accum

        parallel.sync_gradients(params)
        scaler.unscale_(optimizer)
        if config.max_grad_norm > 0:
            for module in trainer.trained.values():  # each network by itself: a GAN's critic cannot shrink the generator's step
                torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(ema_decay_at(step, ema_decay))

        done = step + 1
        values = distributed.mean_over_ranks(torch.stack(list(logs.values()))).tolist()
        logs_now = dict(zip(logs, values))
        for name, value in logs_now.items():
            history.setdefault(name, []).append((done, value))
        if bar is not None:
            bar.update(1, **logs_now)
            if not bar.enabled and (done % config.log_every == 0):  # a log file gets a line now and then
                rate = (done - start_step) / (time.perf_counter() - started)
                values_text = ", ".join(f"{k}={v:.4g}" for k, v in logs_now.items())
                print(f"sdlab: step {done}/{config.steps}: {values_text}, {rate:.2f} steps/s", file=sys.stderr, flush=True)
        if parallel.validates_here and (done == config.steps or (config.validate_every and done % config.validate_every == 0)):
            validate(done)
        if done == config.steps or done % config.checkpoint_every == 0:
            save_checkpoint(done)
        if callback is not None:
            callback({"step": done, "steps": config.steps, "logs": logs_now, "lr": lr})

    elapsed = time.perf_counter() - started
    if bar is not None:
        bar.close()
    path = out / "last.safetensors"
    model = parallel.published(ema)  # collective under shard_model
    if main:
        path = trainer.save(out, model, data)
        steps_run = config.steps - start_step
        if not quiet:
            print(f"sdlab: {steps_run} steps in {elapsed:.1f}s ({steps_run / max(elapsed, 1e-9):.2f} steps/s); "
                  f"wrote {path}", file=sys.stderr)
    distributed.barrier()
    return path
