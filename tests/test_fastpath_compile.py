"""`--compile` / `compile=True`: the UNet through torch.compile (Inductor, frozen weights) gives the eager
image within the parity bound, is compiled once per set of weights, and stays eager where a run needs
the layers' Python code (attention hooks)."""

import numpy as np
import pytest
import torch

import sdlab
from sdlab import compile as compiling
from sdlab.cli import build_parser
from sdlab.cli.generate import generation_kwargs
from sdlab.models.attention import attention_hooks
from sdlab.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from sdlab.pipelines.api import StableDiffusion
from checkpoint_fixtures import random_modules
from test_pipeline_parity import psnr


@pytest.fixture(scope="module")
def demo():
    return sdlab.load("demo")


def test_compile_is_asked_for_on_the_command_line():
    args = build_parser().parse_args(["generate", "a cat", "--model", "demo", "--compile"])
    assert generation_kwargs(args)["compile"] is True
    assert generation_kwargs(build_parser().parse_args(["generate", "a cat"]))["compile"] is False


def test_the_compiled_unet_is_kept_until_the_weights_change(demo, monkeypatch, capsys):
    unet = demo.unet
    vars(unet).pop("_compiled_for_inference", None)
    first = compiling.compiled_unet(unet)  # torch.compile is lazy: nothing is compiled before a call
    assert "compiling the UNet" in capsys.readouterr().err
    assert compiling.compiled_unet(unet) is first and compiling.sampling_unet(unet, True) is first
    assert compiling.sampling_unet(unet, False) is unet
    weight = unet.input_blocks[0][0].weight
    with torch.no_grad():
        weight.add_(0)  # in place, as a merged LoRA: the frozen copy would be stale
    assert compiling.compiled_unet(unet) is not first
    assert "compiling" not in capsys.readouterr().err  # said once per UNet
    assert "_compiled_for_inference" not in unet.state_dict() and all(
        "compiled" not in name for name, _ in unet.named_modules())
    with attention_hooks(unet, lambda site, probabilities: None):
        assert compiling.sampling_unet(unet, True) is unet  # hooks are Python the compiled code would not call
    vars(unet).pop("_compiled_for_inference")


def test_the_cache_folder_is_sdlabs_unless_the_user_chose_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert compiling.inductor_cache_dir() == str(tmp_path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing torch._dynamo writes
    assert compiling.inductor_cache_dir().endswith("/.cache/sdlab/inductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert compiling.inductor_cache_dir().endswith("/.cache/sdlab/inductor")


@pytest.fixture(scope="module")
def one_level():
    """The smallest SD-shaped pipeline (one UNet level: a ResBlock, a transformer, the middle block), so
    that Inductor's first compile takes about a minute on a 2-core CPU instead of several."""
    config = ModelConfig(name="sd1", unet=UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1,
                                                     attention_levels=(0,), context_dim=64),
                         vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1), text=TextConfig(width=64, layers=2, heads=1))
    unet, vae, text = random_modules(config)
    return StableDiffusion(config, unet.eval(), vae.eval(), text.eval())


@pytest.mark.slow  # Inductor compiles the UNet's C++: about a minute on a 2-core CPU (still run in CI)
def test_compile_gives_the_eager_image(one_level, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    settings = dict(prompt="a red circle", steps=3, seed=4, width=64, height=64, batch_size=2)
    eager = one_level.txt2img(**settings)
    compiled = one_level.txt2img(**settings, compile=True)
    again = one_level.txt2img(**{**settings, "seed": 5}, compile=True)  # no second compile: same shapes, same weights
    assert torch.allclose(compiled.latents, eager.latents, atol=1e-4)
    for ours, theirs in zip(compiled.images, eager.images):
        assert psnr(np.asarray(ours), np.asarray(theirs)) >= 40
    assert not torch.equal(again.latents, compiled.latents)
    assert (tmp_path / "inductor").is_dir()
