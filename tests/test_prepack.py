"""`--prepack` / `prepack=True` (models/prepack.py): the UNet's layers on weights reordered once for oneDNN
give the plain layers' outputs within fp32 rounding, keep their packed weights until the weights change,
step aside for autograd and seamless tiling, and are refused where they cannot fit or help."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import sdlab
from sdlab.cli import build_parser, main
from sdlab.cli.generate import generation_kwargs
from sdlab.errors import InputError, TooLargeError
from sdlab.models import prepack
from sdlab.models.conv import Conv2d
from sdlab.models.prepack import prepacked, release_prepacked, unpacked_bytes
from sdlab.models.seamless import seamless
from sdlab.pipelines.options import GenerationOptions
from test_pipeline_parity import psnr



def test_this_torch_runs_prepacked_weights():
    """The x86 CPU builds of torch that CI and the install script use come with oneDNN: every test here runs."""
    assert prepack.available()


def layers():
    torch.manual_seed(0)
    return nn.ModuleDict({
        "linear": nn.Linear(64, 96),
        "linear_no_bias": nn.Linear(64, 32, bias=False),
        "conv3x3": Conv2d(16, 24, 3, padding=1),  # sdlab's, which runs small maps as one matrix product
        "conv1x1": nn.Conv2d(16, 8, 1),
        "down": nn.Conv2d(16, 16, 3, stride=2, padding=1),
    }).eval()


def inputs():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 10, 64, generator=generator)
    return {"linear": tokens, "linear_no_bias": tokens,
            **{name: torch.randn(2, 16, 12, 10, generator=generator) for name in ("conv3x3", "conv1x1", "down")}}


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def test_each_layer_gives_the_plain_output_within_fp32_rounding_and_is_plain_again_after():
    model, x = layers(), inputs()
    plain = {name: layer(x[name]) for name, layer in model.items()}
    with prepacked(model):
        packed = {name: layer(x[name]) for name, layer in model.items()}
        assert all(vars(layer).get("_sdlab_prepacked") for layer in model.values())  # the packed path ran
    for name in model:
        assert packed[name].shape == plain[name].shape
        assert relative_error(packed[name], plain[name]) < 1e-5, name
    assert not any("forward" in vars(layer) for layer in model.values())
    assert all(torch.equal(layer(x[name]), plain[name]) for name, layer in model.items())


@torch.no_grad()
def test_packed_weights_are_kept_between_runs_and_made_again_when_the_weight_changes_in_place():
    model, x = layers(), inputs()
    linear = model["linear"]
    with prepacked(model):
        linear(x["linear"])
    kept = vars(linear)["_sdlab_prepacked"][("linear",)]
    with prepacked(model):
        linear(x["linear"])
        assert vars(linear)["_sdlab_prepacked"][("linear",)] is kept  # not packed again
        linear.weight.mul_(2)  # in place, as a merged LoRA
        doubled = linear(x["linear"])
    assert vars(linear)["_sdlab_prepacked"][("linear",)] is not kept
    assert relative_error(doubled, linear(x["linear"])) < 1e-5
    assert unpacked_bytes(model) > 0  # the layers not called hold nothing yet
    assert release_prepacked(model) == 1 and unpacked_bytes(model) == sum(
        layer.weight.numel() * 4 for layer in model.values())


@torch.no_grad()
def test_a_convolution_keeps_one_packed_weight_per_input_size():
    conv = Conv2d(16, 24, 3, padding=1).eval()
    small, large = torch.randn(1, 16, 4, 4), torch.randn(2, 16, 20, 18)
    with prepacked(conv):
        outputs = [conv(small), conv(large), conv(small[:, :, :, :3])]
    assert len(vars(conv)["_sdlab_prepacked"]) == 3
    for x, out in zip((small, large, small[:, :, :, :3]), outputs):
        assert relative_error(out, conv(x)) < 1e-5


def test_with_gradients_the_plain_layers_run_and_nothing_is_packed():
    model, x = layers(), inputs()
    with prepacked(model):
        out = model["linear"](x["linear"]).sum() + model["conv3x3"](x["conv3x3"]).sum()
    out.backward()
    assert model["linear"].weight.grad is not None and model["conv3x3"].weight.grad is not None
    assert not any(vars(layer).get("_sdlab_prepacked") for layer in model.values())


@torch.no_grad()
def test_forward_hooks_still_run_on_a_packed_layer():
    """A LoRA applied dynamically adds its branch with a forward hook."""
    model, x = layers(), inputs()
    linear = model["linear"]
    handle = linear.register_forward_hook(lambda module, args, output: output + 1)
    try:
        with prepacked(model):
            hooked = linear(x["linear"])
    finally:
        handle.remove()
    assert relative_error(hooked - 1, linear(x["linear"])) < 1e-5


@torch.no_grad()
def test_seamless_tiling_pads_circularly_inside_prepacked():
    conv = Conv2d(4, 4, 3, padding=1).eval()
    x = torch.randn(1, 4, 8, 8)
    with seamless(conv):
        wrapped = conv(x)
        with prepacked(conv):
            assert torch.equal(conv(x), wrapped)
    assert not torch.allclose(wrapped, conv(x), atol=1e-4)  # circular padding is another image at the edges


@pytest.fixture(scope="module")
def demo():
    return sdlab.load("demo")


def test_a_prepacked_generation_gives_the_plain_image(demo):
    settings = dict(steps=4, seed=3, width=64, height=64, sampler="DPM++ 2M")
    plain = demo.txt2img("a red circle", **settings)
    packed = demo.txt2img("a red circle", **settings, prepack=True)
    again = demo.txt2img("a red circle", **settings, prepack=True)  # the kept packed weights
    assert psnr(np.asarray(packed.images[0]), np.asarray(plain.images[0])) >= 40
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(packed.images[0]))
    assert not any("forward" in vars(layer) for layer in demo.unet.modules())
    release_prepacked(demo.unet)


def test_prepack_is_asked_for_on_the_command_line():
    assert generation_kwargs(build_parser().parse_args(["generate", "a cat", "--prepack"]))["prepack"] is True
    assert generation_kwargs(build_parser().parse_args(["generate", "a cat"]))["prepack"] is False


def test_prepack_with_compile_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "a cat", "--model", "demo", "--steps", "2", "--size", "64x64", "--prepack", "--compile",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "--prepack and --compile" in err and not out.exists()


def test_prepack_is_refused_where_the_packed_weights_cannot_fit(demo, monkeypatch):
    from sdlab.pipelines import run
    free = {"bytes": None}
    monkeypatch.setattr(run, "available_memory_bytes", lambda device: free["bytes"])
    release_prepacked(demo.unet)
    free["bytes"] = unpacked_bytes(demo.unet) // 2
    with pytest.raises(TooLargeError, match="--prepack needs about .* more for the UNet's packed weights"):
        run.check_prepack_fits(demo, GenerationOptions(prepack=True), work=0)
    free["bytes"] = None  # unknown: not refused
    run.check_prepack_fits(demo, GenerationOptions(prepack=True), work=0)
    monkeypatch.setattr(run, "prepack_available", lambda: False)
    with pytest.raises(InputError, match="needs a torch built with oneDNN"):
        run.check_prepack_fits(demo, GenerationOptions(prepack=True), work=0)
    monkeypatch.setattr(run, "prepack_available", lambda: True)
    with pytest.raises(InputError, match="for fp32 on a CPU"):
        run.check_prepack_fits(SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16, unet=demo.unet),
                               GenerationOptions(prepack=True), work=0)


def test_hires_fix_takes_prepack_too(demo):
    settings = dict(steps=3, seed=2, width=64, height=64, hires_scale=1.5, hires_steps=2)
    plain = demo.hires_fix("a red circle", **settings)
    packed = demo.hires_fix("a red circle", **settings, prepack=True)
    assert psnr(np.asarray(packed.images[0]), np.asarray(plain.images[0])) >= 40
    release_prepacked(demo.unet)


def test_sdlab_serve_prepack_runs_every_job_on_packed_weights():
    import requests

    from sdlab.cli.serve import settings_from_args
    from server_fixtures import LiveServer

    settings = settings_from_args(build_parser("serve").parse_args(["serve", "--prepack", "--max-size", "64"]))
    assert settings.prepack and not settings_from_args(build_parser("serve").parse_args(["serve"])).prepack
    with LiveServer(settings) as server:
        answer = requests.post(server.url + "/sdapi/v1/txt2img", timeout=120, json={
            "prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "seed": 1})
        assert answer.status_code == 200 and len(answer.json()["images"]) == 1
        pipe = server.app.state.server.engine.pipe
        assert any(vars(layer).get("_sdlab_prepacked") for layer in pipe.unet.modules())
        assert requests.get(server.url + "/sdapi/v1/cmd-flags", timeout=10).json()["prepack"] is True
