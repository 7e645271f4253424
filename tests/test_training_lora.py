"""`sdlab train lora`: only the low-rank factors learn, the loss falls on a fixed batch, and the saved
kohya and PEFT files give the in-training model's outputs through sdlab's LoRA loader and through
diffusers' reading of LoRA files."""

import itertools
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from sdlab.adapters.lora import apply_lora
from sdlab.checkpoint.load import load_components
from sdlab.errors import ConfigError
from sdlab.tokenizer import get_tokenizer
from sdlab.training import lora as lora_trainer
from sdlab.training.data import Batch
from sdlab.training.loop import STATE_FILE
from test_lora import diffusers_merge_kohya, peft_merge
from test_pipeline_parity import tiny_diffusers_sd
from test_training_loop import run, shapes_folder, tiny_config  # noqa: F401

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family(request, tmp_path_factory):
    """A tiny diffusers SD1- or SD2-shaped model folder: the --base, and diffusers' own copy as the oracle."""
    folder = tmp_path_factory.mktemp(request.param)
    tiny_diffusers_sd(folder, request.param, "epsilon")
    return request.param, folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(shapes_folder(tmp_path_factory.mktemp("data")))


def lora_config(out, base, **overrides):
    values = {"base": str(base), "resolution": 16, "batch_size": 2, "lr": 1e-2,
              "lora.text_encoder": True, "lora.unet_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                "proj_out", "ff.net.0.proj", "ff.net.2"]}
    values.update(overrides)
    return tiny_config("lora", out, **values)


def inputs(components):
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 7, components.config.unet.context_dim, generator=generator)
    ids = get_tokenizer().tokenize(["a photo of a cat"], pad_token_id=components.config.text.pad_token_id)
    return latents, torch.tensor([421.0]), context, ids


@torch.no_grad()
def outputs(unet, text_encoder, components):
    latents, t, context, ids = inputs(components)
    return unet(latents, t, context), text_encoder(ids)


def test_the_loss_falls_on_a_fixed_set_and_only_the_factors_are_saved_for_resume(tmp_path, data):
    folder = tmp_path / "sd1"
    tiny_diffusers_sd(folder, "sd1", "epsilon")
    config = lora_config(tmp_path / "run", folder, data=data, steps=60, batch_size=4, lr=1e-2, **{"lora.rank": 8})
    losses = [logs["loss"] for logs in run(config)]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:4]), losses

    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["trained"]
    assert all(k.startswith("lora.layers.lora_") for k in state)  # the resume state holds the factors only


def test_base_weights_stay_frozen_while_the_factors_move(tmp_path, data):
    folder = tmp_path / "sd1"
    tiny_diffusers_sd(folder, "sd1", "epsilon")
    trainer = lora_trainer.build(lora_config(tmp_path / "run", folder, data=data), torch.device("cpu"))
    trained = {k for k, p in trainer.named_parameters() if p.requires_grad}
    assert trained and all(".lora_down." in k or ".lora_up." in k for k in trained)
    frozen = lambda: {k: v.clone() for k, v in trainer.state_dict().items() if "lora_" not in k}  # noqa: E731
    before, factors = frozen(), {k: v.clone() for k, v in trainer.network.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-2)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for step in range(2):
        batch = Batch(images, ["a red circle", "a blue square"], step, 0, 2, 0, 2, 0, 1, torch.Generator().manual_seed(step))
        trainer.loss(batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    after = frozen()
    assert [k for k, v in before.items() if not torch.equal(after[k], v)] == []
    assert any(not torch.equal(v, factors[k]) for k, v in trainer.network.state_dict().items() if "lora_up" in k)


@pytest.mark.parametrize("file", ["last.safetensors", "pytorch_lora_weights.safetensors"])
def test_the_saved_lora_has_the_in_training_effect_in_sdlab_and_in_diffusers(tmp_path, family, data, file):
    name, folder = family
    config = lora_config(tmp_path / "run", folder, data=data, steps=3)
    run(config)
    # the in-training model: the trainer rebuilt and its factors set to the final ones from the resume state
    trainer = lora_trainer.build(config, torch.device("cpu"))
    trainer.trained.load_state_dict(torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["trained"])
    base = load_components(folder)
    expected = outputs(trainer.unet, trainer.text_encoder, base)
    plain = outputs(base.unet, base.text_encoder, base)
    for e, p in zip(expected, plain):
        assert (e - p).abs().max() > 1e-3  # three steps at lr 1e-2 moved both networks visibly

    saved = tmp_path / "run" / file
    if file == "last.safetensors":
        tensors = load_file(saved)
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in tensors)
        assert any(k.startswith("lora_te_text_model_") and k.endswith(".alpha") for k in tensors)
    applied = apply_lora(base, saved)
    assert len(applied.updates) == len(trainer.network.layers)
    for ours, theirs in zip(outputs(base.unet, base.text_encoder, base), expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=TOLERANCE)

    # diffusers' reading of the file (load_lora_weights needs the peft package, absent here): the kohya
    # file through diffusers' key conversion, the PEFT file with diffusers' metadata, merged as PEFT merges
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    if file == "last.safetensors":
        diffusers_merge_kohya(saved, pipe.unet, pipe.text_encoder)
    else:
        metadata = json.loads(safe_open(str(saved), "pt").metadata()["lora_adapter_metadata"])
        peft_merge(saved, metadata, None, pipe.unet, pipe.text_encoder)
    latents, t, context, ids = inputs(base)
    with torch.no_grad():
        unet_out = pipe.unet(latents, t, encoder_hidden_states=context).sample
        text_out = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(unet_out, expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(text_out, expected[1], rtol=0, atol=1e-4)


def test_a_resumed_lora_run_ends_bit_identical(tmp_path, data):
    folder = tmp_path / "sd1"
    tiny_diffusers_sd(folder, "sd1", "epsilon")
    whole = lora_config(tmp_path / "whole", folder, data=data, steps=4)
    run(whole)
    parts = lora_config(tmp_path / "parts", folder, data=data, steps=4, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(parts, stop_at=2)
    run(parts, resume=True)
    a, b = load_file(tmp_path / "whole" / "last.safetensors"), load_file(tmp_path / "parts" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dropout_leaves_out_whole_rank_components_in_training_only():
    weight = torch.randn(6, 5)
    layer = lora_trainer.LoraLayer(weight, rank=4, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_up.weight.copy_(torch.randn(6, 4))
    down, up = layer.lora_down.weight.detach(), layer.lora_up.weight.detach()
    full = layer.eval()(weight) - weight
    torch.testing.assert_close(full, 0.5 * up @ down)
    layer.train()
    torch.manual_seed(0)
    kept_sets = set()
    for _ in range(20):
        delta = (layer(weight) - weight).detach()
        # the delta is (alpha / rank) * up @ diag(mask) @ down with mask 0 or 1 / (1 - p)
        masks = [m for m in itertools.product((0.0, 2.0), repeat=4)
                 if torch.allclose(delta, 0.5 * (up * torch.tensor(m)) @ down, atol=1e-5)]
        assert len(masks) == 1
        kept_sets.add(masks[0])
    assert len(kept_sets) > 3  # a fresh draw each step
    layer.eval()
    torch.testing.assert_close(layer(weight) - weight, full)


def test_a_dropout_outside_0_to_1_is_refused(tmp_path, data):
    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\), got 1.0"):
        lora_trainer.build(lora_config(tmp_path / "run", "unused", **{"lora.dropout": 1.0}), torch.device("cpu"))
