"""The fine-tuners from the command line: `sdlab train lora|textual-inversion|dreambooth|inpaint|upscale
--base MODEL --data DIR --out DIR ...` each leave OUT/last.safetensors and a resumable state, and take
their own options with --set <trainer>.<key>=<value>."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlab.bundled import BUNDLED_MODEL
from sdlab.checkpoint.load import load_components
from sdlab.checkpoint.save import save_single_file
from sdlab.cli import build_parser, main as sdlab_main
from sdlab.cli.train import config_from_args
from sdlab.models import build_text_encoder, build_unet, build_vae
from sdlab.training.config import load_config
from sdlab.training.loop import STATE_FILE
from test_training_loop import one_thread, shapes_folder, tiny_base  # noqa: F401
from test_training_upscale import X4_TINY


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tiny_base(tmp_path_factory.mktemp("base") / "base.safetensors"))


@pytest.fixture(scope="module")
def x4_base(tmp_path_factory):
    """A tiny base whose VAE has a factor of 4, as the upscaler needs."""
    path = tmp_path_factory.mktemp("x4") / "base.safetensors"
    torch.manual_seed(0)
    save_single_file(path, X4_TINY, build_unet(X4_TINY.unet), build_vae(X4_TINY.vae), build_text_encoder(X4_TINY.text))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(shapes_folder(tmp_path_factory.mktemp("data"), count=2))


def train(trainer, base, data, out, *extra):
    return sdlab_main(["train", trainer, "--base", base, "--data", data, "--out", str(out), "--steps", "2",
                       "--batch-size", "2", "--lr", "1e-3", "--seed", "3", "--resolution", "16",
                       "--checkpoint-every", "1", "--validate-every", "0", "--quiet", *extra])


@pytest.mark.parametrize("trainer, extra, check", [
    ("lora", ["--set", "lora.rank=2", "--set", "lora.text_encoder=true"],
     lambda out: {t.shape[0] for k, t in load_file(out / "last.safetensors").items() if k.endswith("lora_down.weight")} == {2}
     and (out / "pytorch_lora_weights.safetensors").exists()),
    ("textual-inversion", ["--set", "textual_inversion.token=shape-thing", "--set", "textual_inversion.vectors=2"],
     lambda out: load_file(out / "last.safetensors")["emb_params"].shape == (2, 64) and (out / "shape-thing.pt").exists()),
    ("dreambooth", ["--set", "dreambooth.class_prompt=a shape", "--set", "dreambooth.class_images=2",
                    "--set", "dreambooth.class_steps=1"],
     lambda out: len(list((out / "class_images").glob("*.png"))) == 2
     and load_components(out / "last.safetensors").config.unet.in_channels == 4),
    ("inpaint", [], lambda out: load_components(out / "last.safetensors").config.unet.in_channels == 9),
    ("upscale", [], lambda out: load_components(out / "last.safetensors").config.unet.num_classes == 1000),
])
def test_each_fine_tuner_runs_from_the_command_line_and_resumes(tmp_path, base, x4_base, data, trainer, extra, check):
    base = x4_base if trainer == "upscale" else base
    out = tmp_path / "run"
    assert train(trainer, base, data, out, *extra) == 0
    assert check(out) and (out / STATE_FILE).exists()
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 2
    steps = ["--steps", "3"]
    assert sdlab_main(["train", trainer, "--base", base, "--data", data, "--out", str(out), "--batch-size", "2",
                       "--lr", "1e-3", "--seed", "3", "--resolution", "16", "--checkpoint-every", "1",
                       "--validate-every", "0", "--quiet", "--resume", *steps, *extra]) == 0
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 3


def test_a_fine_tuner_without_base_says_what_to_pass(tmp_path, base, data, capsys, monkeypatch):
    import sdlab.bundled

    monkeypatch.setattr(sdlab.bundled, "BUNDLED_MODEL", str(tmp_path / "absent.safetensors"))  # none installed
    assert sdlab_main(["train", "lora", "--data", data, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "needs --base" in capsys.readouterr().err
    assert sdlab_main(["train", "upscale", "--base", base, "--data", data, "--out", str(tmp_path / "up"), "--quiet"]) == 2
    assert "needs a VAE with a factor of 4" in capsys.readouterr().err


def test_without_base_a_fine_tuner_trains_on_the_bundled_model_and_keeps_its_settings(tmp_path, data, capsys):
    out = tmp_path / "run"
    argv = ["train", "textual-inversion", "--data", data, "--out", str(out), "--steps", "1", "--batch-size", "2",
            "--resolution", "16", "--validate-every", "0", "--token", "shape-thing", "--vectors", "2",
            "--init-word", "circle", "--set", "textual_inversion.validation_steps=1"]
    assert sdlab_main(argv) == 0
    err = capsys.readouterr().err
    settings = err.split("sdlab: train textual_inversion with these settings:\n")[1]
    assert f'base="{BUNDLED_MODEL}"' in settings.replace("\n      ", " ")
    assert '[textual_inversion] token="shape-thing", init_word="circle", vectors=2' in settings
    config = config_from_args(build_parser().parse_args(argv))
    assert config.base == BUNDLED_MODEL
    assert load_config("textual-inversion", str(out / "config.toml")) == config  # the run's settings, read back
    assert load_file(out / "last.safetensors")["emb_params"].shape == (2, 64)
    assert torch.load(out / "shape-thing.pt", weights_only=True)["sd_checkpoint_name"] == "sdlab-shapes"


def test_lora_takes_its_rank_alpha_and_dropout_as_flags(tmp_path, base, data):
    out = tmp_path / "run"
    assert train("lora", base, data, out, "--rank", "2", "--alpha", "1", "--dropout", "0.5") == 0
    downs = {t.shape[0] for k, t in load_file(out / "last.safetensors").items() if k.endswith("lora_down.weight")}
    alphas = {t.item() for k, t in load_file(out / "last.safetensors").items() if k.endswith(".alpha")}
    assert downs == {2} and alphas == {1.0}
    with safe_open(out / "last.safetensors", "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"]) == {"rank_dropout": "0.5"}
    assert load_config("lora", str(out / "config.toml")).options.dropout == 0.5
