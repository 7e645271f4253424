"""The exact fast path: work that repeats from step to step done once, with the same numbers.

The text's keys and values (models/attention.py, text_projections_cached) are computed once per
distinct context of a run: the UNet's output is bit for bit the uncached one, LoRAs on to_k/to_v
(merged or as forward hooks) still count, and with gradients on nothing is cached.
"""

from contextlib import nullcontext

import pytest
import torch

import sdlab
from sdlab.config import UNetConfig
from sdlab.models.attention import CrossAttention, TextProjections, text_projections_cached
from sdlab.models.unet import UNetModel

TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_res_blocks=1, num_heads=4,
                  context_dim=64)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNetModel(TINY).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)  # ldm zeroes the residual branches; these must be live
    return model


def test_the_text_keys_and_values_are_computed_once_and_the_output_is_unchanged(unet):
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    layers = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    with torch.no_grad():
        expected = [unet(x, torch.full((2,), t), context.clone()) for t in (900.0, 500.0, 100.0)]
        tokens_seen = []  # by every to_k, per call: 77 for the text, 64 for the 8x8 image's self-attention
        handles = [layer.to_k.register_forward_hook(lambda module, args, out: tokens_seen.append(args[0].shape[1]))
                   for layer in layers]
        try:
            with text_projections_cached(unet):
                # a new but equal context tensor at every call, as classifier-free guidance concatenates one
                got = [unet(x, torch.full((2,), t), context.clone()) for t in (900.0, 500.0, 100.0)]
        finally:
            for handle in handles:
                handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert tokens_seen.count(77) == 4  # the four transformers' text keys, once each instead of once per call
    assert tokens_seen.count(64) == 4 * 3
    assert all(layer.text_projections is None for layer in layers)


def test_a_new_context_and_changed_weights_are_computed_again(unet):
    layer = next(m for m in unet.modules() if isinstance(m, CrossAttention) and m.to_k.in_features == 64)
    store = TextProjections()
    a, b = torch.randn(2, 77, 64), torch.randn(2, 77, 64)
    with torch.no_grad():
        k_a, _ = store.key_value(layer, a)
        assert store.key_value(layer, a.clone())[0] is k_a
        assert torch.equal(store.key_value(layer, b)[0], layer.to_k(b))  # prompt editing's next prompt
        layer.to_k.weight.add_(1.0)  # a LoRA merged in place
        try:
            assert torch.equal(store.key_value(layer, a)[0], layer.to_k(a))
            handle = layer.to_v.register_forward_hook(lambda module, args, out: out * 2)  # a dynamic LoRA
            assert torch.equal(store.key_value(layer, a)[1], 2 * torch.nn.functional.linear(a, layer.to_v.weight))
            handle.remove()
        finally:
            layer.to_k.weight.sub_(1.0)


def test_with_gradients_on_nothing_is_cached(unet):
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 64, requires_grad=True)
    with text_projections_cached(unet) as store:
        for _ in range(2):  # a second backward through cached keys would fail: their graph is freed
            unet(x, torch.tensor([500.0]), context).square().mean().backward()
    assert not store.projections and context.grad is not None


def test_a_generation_gives_the_same_image_with_the_cache(monkeypatch):
    import sdlab.pipelines.run as run

    pipe = sdlab.load("demo")
    settings = dict(steps=3, seed=2, width=32, height=32, batch_size=2, prompt="a red [circle:square:0.5]")
    cached = pipe.txt2img(**settings).latents
    monkeypatch.setattr(run, "text_projections_cached", lambda unet: nullcontext())
    assert torch.equal(cached, pipe.txt2img(**settings).latents)
