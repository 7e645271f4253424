"""The shared training loop: exact resume, atomic checkpoints, accumulation, refusals.

The helpers at the top are shared by the other test_training_*.py files."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdlab.checkpoint.save import save_single_file
from sdlab.shapes import dataset as shapes
from sdlab.errors import ConfigError
from sdlab.models import build_text_encoder, build_unet, build_vae
from sdlab.training import loop
from sdlab.training.config import load_config, resolve_model_config

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "tiny.toml")
TINY = resolve_model_config(load_config("vae", RECIPE).model)  # UNet 32 ch (1, 2), VAE 32 ch, text 64 wide x 2


@pytest.fixture(autouse=True)
def one_thread():
    """One thread per process, like each torchrun child: on a shared 2-core machine a second thread
    mostly waits for the other jobs, and steps get several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shapes_folder(root: Path, count: int = 4, size: int = 32) -> Path:
    """`count` captioned shapes scenes as PNG + .txt files: a fixed small training set."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        _, caption, image = shapes.training_example(0, i, size)
        image.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


def tiny_config(trainer: str, out: Path, **overrides):
    values = {"out": str(out), "validate_every": 0, "checkpoint_every": 1000, **overrides}
    return load_config(trainer, RECIPE, values)


def tiny_base(path: Path, seed: int = 0) -> Path:
    """A tiny model file with random weights, as --base for the UNet trainer."""
    torch.manual_seed(seed)
    save_single_file(path, TINY, build_unet(TINY.unet), build_vae(TINY.vae), build_text_encoder(TINY.text))
    return path


def run(config, resume: bool = False, stop_at: int | None = None) -> list[dict]:
    """Train quietly; `stop_at`: raise KeyboardInterrupt after that step, as Ctrl-C would. Returns the logs."""
    logs = []

    def callback(info):
        logs.append(info["logs"])
        if info["step"] == stop_at:
            raise KeyboardInterrupt

    loop.train(config, resume=resume, callback=callback, quiet=True)
    return logs


def trained_state(out: Path) -> dict:
    return torch.load(out / loop.STATE_FILE, weights_only=True)["trained"]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> str:
    """`torchrun --standalone --nproc_per_node N -m sdlab.training ARGS` on CPU (gloo) as a subprocess;
    its stderr. The whole process group is ended if it overruns, so no worker outlives the test."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "sdlab.training", *args]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stderr


# -- the tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", ["vae", "text", "unet"])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, trainer):
    data = shapes_folder(tmp_path / "data", count=6)
    extra = {"unet": {"base": str(tiny_base(tmp_path / "base.safetensors")), "ema_decay": 0.5},
             "vae": {"vae": {"disc_start": 2}, "ema_decay": 0.5},  # the critic joins mid-run; EMA is state too
             "text": {"crop": "random"}}[trainer]
    common = {"data": str(data), "steps": 4, "batch_size": 4, "checkpoint_every": 2, **extra}
    straight = run(tiny_config(trainer, tmp_path / "straight", **common))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(trainer, tmp_path / "resumed", **common), stop_at=3)
    assert torch.load(tmp_path / "resumed" / loop.STATE_FILE, weights_only=True)["step"] == 2
    resumed = run(tiny_config(trainer, tmp_path / "resumed", **common), resume=True)

    assert [logs["loss"] for logs in resumed] == [logs["loss"] for logs in straight[2:]]
    a, b = trained_state(tmp_path / "straight"), trained_state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state_a = torch.load(tmp_path / "straight" / loop.STATE_FILE, weights_only=True)
    state_b = torch.load(tmp_path / "resumed" / loop.STATE_FILE, weights_only=True)
    assert all(torch.equal(state_a["ema"][k], state_b["ema"][k]) for k in state_a["ema"])
    assert state_a["history"] == state_b["history"]


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    config = tiny_config("vae", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=4,
                         batch_size=2, checkpoint_every=2)
    real_save = torch.save

    def interrupted_save(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            Path(path).write_bytes(b"half a checkpoint")  # the bytes written before Ctrl-C arrives
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []
    assert torch.load(tmp_path / "run" / loop.STATE_FILE, weights_only=True)["step"] == 2


def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tmp_path):
    data = str(shapes_folder(tmp_path / "data"))
    # Adam's eps, large against the gradients' rounding noise, keeps the comparison about the gradients
    common = {"data": data, "steps": 2, "batch_size": 4, "adam_eps": 1e-3, "vae": {"kl_weight": 1e-3}}
    run(tiny_config("vae", tmp_path / "whole", **common))
    run(tiny_config("vae", tmp_path / "accumulated", grad_accum=2, **common))
    a, b = trained_state(tmp_path / "whole"), trained_state(tmp_path / "accumulated")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_gradient_checkpointing_recomputes_without_changing_the_step(tmp_path):
    common = {"data": str(shapes_folder(tmp_path / "data")), "steps": 2, "batch_size": 2,
              "base": str(tiny_base(tmp_path / "base.safetensors")), "adam_eps": 1e-3}
    run(tiny_config("unet", tmp_path / "plain", **common))
    run(tiny_config("unet", tmp_path / "recomputed", gradient_checkpointing=True, **common))
    a, b = trained_state(tmp_path / "plain"), trained_state(tmp_path / "recomputed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_a_run_leaves_loss_curves_validation_grids_and_the_model_file(tmp_path):
    config = tiny_config("vae", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=2,
                         batch_size=2, validate_every=1)
    logs = run(config)
    out = tmp_path / "run"
    assert len(logs) == 2 and set(logs[0]) == {"loss", "rec", "kl"}
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000001.png", "step-000002.png"]
    assert {"loss.png", "last.safetensors", loop.STATE_FILE} <= {p.name for p in out.iterdir()}


def test_a_finished_run_is_not_overwritten_and_resume_needs_a_checkpoint(tmp_path):
    data = str(shapes_folder(tmp_path / "data"))
    config = tiny_config("vae", tmp_path / "run", data=data, steps=1, batch_size=2)
    run(config)
    with pytest.raises(ConfigError, match="already holds a run .* --resume"):
        run(config)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run(tiny_config("vae", tmp_path / "other", data=data, steps=1, batch_size=2), resume=True)


def test_resuming_with_a_different_recipe_is_refused_but_more_steps_are_fine(tmp_path):
    data = str(shapes_folder(tmp_path / "data"))
    run(tiny_config("vae", tmp_path / "run", data=data, steps=1, batch_size=2))
    with pytest.raises(ConfigError, match=r"different recipe \(lr: 0.001 -> 0.01\)"):
        run(tiny_config("vae", tmp_path / "run", data=data, steps=2, batch_size=2, lr=1e-2), resume=True)
    logs = run(tiny_config("vae", tmp_path / "run", data=data, steps=2, batch_size=2), resume=True)
    assert len(logs) == 1  # only step 2 ran


def test_fp16_autocast_needs_a_gpu_and_bf16_autocast_trains_on_cpu(tmp_path):
    data = str(shapes_folder(tmp_path / "data"))
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a CUDA GPU"):
        run(tiny_config("vae", tmp_path / "fp16", data=data, steps=1, batch_size=2, precision="fp16"))
    logs = run(tiny_config("text", tmp_path / "bf16", data=data, steps=2, batch_size=4, precision="bf16"))
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
