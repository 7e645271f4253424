"""Data parallelism: `torchrun --nproc_per_node 2` (gloo on CPU), each process taking half of the same
global batch, trains the same weights as one process with that batch."""

import pytest
import torch

from test_training_loop import RECIPE, one_thread, run, shapes_folder, tiny_base, tiny_config, torchrun, trained_state  # noqa: F401

# Adam divides by sqrt(v) + eps: where a gradient is ~0, the rounding of a differently ordered sum
# (two halves added, not one batch) can flip the sign of a whole lr-sized step. An eps large against
# those gradients keeps the comparison about the gradients themselves.
ADAM_EPS = 1e-3
TOLERANCE = 1e-6

# case -> (trainer, global batch, recipe keys beyond the tiny recipe)
SETTINGS = {
    "vae": ("vae", 4, {"vae.disc_start": 1}),  # the GAN's adaptive weight needs gradients averaged over ranks
    "text": ("text", 8, {}),  # the contrast runs over both processes' pairs
    "text-hard-negatives": ("text", 8, {"shapes.hard_negatives": True}),  # and over both processes' mirrors
    "unet": ("unet", 4, {"unet.caption_dropout": 0.5, "ema_decay": 0.5}),
    "unet-and-text": ("unet", 4, {"ema_decay": 0.5, "unet.train_text_encoder": True, "unet.text_encoder_lr": 5e-5}),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(tmp_path, case):
    data = str(shapes_folder(tmp_path / "data", count=8))
    trainer, batch_size, settings = SETTINGS[case]
    if trainer == "unet":
        settings = {**settings, "base": str(tiny_base(tmp_path / "base.safetensors"))}
    run(tiny_config(trainer, tmp_path / "one", data=data, steps=3, batch_size=batch_size, adam_eps=ADAM_EPS, **settings))

    args = [trainer, "--config", RECIPE, "--data", data, "--out", str(tmp_path / "two"), "--steps", "3",
            "--batch-size", str(batch_size), "--validate-every", "0", "--checkpoint-every", "1000", "--quiet",
            "--set", f"adam_eps={ADAM_EPS}"]
    for key, value in settings.items():
        text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        args += ["--set", f"{key}={text}"]
    torchrun(args)

    one, two = trained_state(tmp_path / "one"), trained_state(tmp_path / "two")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < TOLERANCE, f"largest weight difference {worst:.3g}"
    history = [torch.load(tmp_path / out / "train_state.pt", weights_only=True)["history"]["loss"] for out in ("one", "two")]
    assert [step for step, _ in history[0]] == [step for step, _ in history[1]] == [1, 2, 3]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(*history))


def test_sharded_optimizer_state_trains_the_same_weights_and_resumes(tmp_path):
    """ZeRO-1: each of 2 processes keeps half of AdamW's moments; the weights are those of 1 process, and
    the checkpoint (gathered on rank 0) resumes, sharded or not, into the uninterrupted run."""
    data = str(shapes_folder(tmp_path / "data", count=8))
    common = dict(data=data, batch_size=4, adam_eps=ADAM_EPS, warmup_steps=2)
    run(tiny_config("vae", tmp_path / "one", steps=4, **common))

    def two(out, steps, *extra):
        return torchrun(["vae", "--config", RECIPE, "--data", data, "--out", str(tmp_path / out), "--steps", str(steps),
                         "--batch-size", "4", "--validate-every", "0", "--checkpoint-every", "2", "--quiet",
                         "--set", f"adam_eps={ADAM_EPS}", "--set", "warmup_steps=2", *extra])

    assert "AdamW state sharded over 2 processes" in two("sharded", 4, "--shard-optimizer")
    two("resumed", 2, "--shard-optimizer")
    run(tiny_config("vae", tmp_path / "resumed", steps=4, **common), resume=True)  # one process, unsharded

    one = trained_state(tmp_path / "one")
    for out in ("sharded", "resumed"):
        other = trained_state(tmp_path / out)
        worst = max((one[k] - other[k]).abs().max().item() for k in one)
        assert worst < TOLERANCE, f"{out}: largest weight difference {worst:.3g}"
    state = torch.load(tmp_path / "sharded" / "train_state.pt", weights_only=True)
    moments = state["optimizer"]["state"]
    assert len(moments) == len(one) and all("exp_avg" in m for m in moments.values())  # every share gathered


def test_fully_sharded_unet_trains_the_same_weights_and_resumes_either_way(tmp_path):
    """FSDP (shard_model): each of 2 processes holds half of the UNet's weights, gradients, AdamW moments
    and EMA. The steps are those of 1 process; checkpoints and the final file are whole, so a sharded
    run resumes unsharded and an unsharded one resumes sharded, into the uninterrupted run."""
    data = str(shapes_folder(tmp_path / "data", count=8))
    base = str(tiny_base(tmp_path / "base.safetensors"))
    common = dict(data=data, base=base, batch_size=4, adam_eps=ADAM_EPS, warmup_steps=2, ema_decay=0.5,
                  checkpoint_every=2)
    run(tiny_config("unet", tmp_path / "one", steps=4, **common))
    run(tiny_config("unet", tmp_path / "half", steps=2, **common))

    def two(out, steps, *extra):
        return torchrun(["unet", "--config", RECIPE, "--data", data, "--base", base, "--out", str(tmp_path / out),
                         "--steps", str(steps), "--batch-size", "4", "--checkpoint-every", "2", "--quiet",
                         "--ema-decay", "0.5", "--set", f"adam_eps={ADAM_EPS}", "--set", "warmup_steps=2",
                         "--shard-model", *extra])

    log = two("sharded", 4, "--validate-every", "2")
    assert "sharded over 2 processes (FSDP): rank 0 holds 50% of" in log
    two("resumed", 2, "--validate-every", "0")
    run(tiny_config("unet", tmp_path / "resumed", steps=4, **common), resume=True)  # one process, unsharded
    two("half", 4, "--validate-every", "0", "--resume")  # an unsharded checkpoint, continued sharded

    expected = torch.load(tmp_path / "one" / "train_state.pt", weights_only=True)
    for out in ("sharded", "resumed", "half"):
        state = torch.load(tmp_path / out / "train_state.pt", weights_only=True)
        for part in ("trained", "ema"):
            assert state[part].keys() == expected[part].keys()
            worst = max((expected[part][k].float() - state[part][k].float()).abs().max().item() for k in expected[part])
            assert worst < TOLERANCE, f"{out} {part}: largest difference {worst:.3g}"
        moments = state["optimizer"]["state"]
        assert len(moments) == len(expected["optimizer"]["state"])
        worst = max((expected["optimizer"]["state"][i]["exp_avg_sq"] - m["exp_avg_sq"]).abs().max().item()
                    for i, m in moments.items())
        assert worst < TOLERANCE, f"{out}: AdamW moments differ by {worst:.3g}"
    # the final file holds the whole EMA weights, as the one-process run's does
    from safetensors.torch import load_file
    one, sharded = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "sharded" / "last.safetensors")
    assert one.keys() == sharded.keys()
    assert max((one[k].float() - sharded[k].float()).abs().max().item() for k in one) < TOLERANCE
    assert (tmp_path / "sharded" / "validation" / "step-000002.png").exists()


@pytest.mark.parametrize("settings, message", [
    ({"data": "shapes"}, "shard_model shards the UNet trainers"),  # the VAE trainer
    ({"shard_optimizer": True}, "shard_model already splits the optimizer state"),
    ({"precision": "fp16"}, "shard_model trains in fp32 or bf16"),
])
def test_shard_model_refuses_what_it_cannot_shard(tmp_path, settings, message):
    from sdlab.errors import ConfigError

    trainer = "vae" if "data" in settings else "unet"
    with pytest.raises(ConfigError, match=message):
        tiny_config(trainer, tmp_path, shard_model=True, **settings)


def test_fully_sharded_dreambooth_trains_unet_and_text_encoder_as_one_process_does(tmp_path):
    """DreamBooth's two networks (a ModuleDict of UNet and text encoder) are sharded one by one, with
    prior preservation's second pass through both every step."""
    data = str(shapes_folder(tmp_path / "data", count=4))
    base = str(tiny_base(tmp_path / "base.safetensors"))
    settings = {"dreambooth.class_prompt": "a shape", "dreambooth.class_images": 2,
                "dreambooth.train_text_encoder": True}
    run(tiny_config("dreambooth", tmp_path / "one", data=data, base=base, steps=2, batch_size=4,
                    adam_eps=ADAM_EPS, **settings))
    args = ["dreambooth", "--config", RECIPE, "--data", data, "--base", base, "--out", str(tmp_path / "two"),
            "--steps", "2", "--batch-size", "4", "--validate-every", "0", "--quiet", "--shard-model",
            "--set", f"adam_eps={ADAM_EPS}"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value!r}" if isinstance(value, str) else f"{key}={str(value).lower()}"]
    assert "rank 0 holds 50% of" in torchrun(args)

    one, two = trained_state(tmp_path / "one"), trained_state(tmp_path / "two")
    assert one.keys() == two.keys() and any(".text_encoder." in k for k in one)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < TOLERANCE, f"largest weight difference {worst:.3g}"
