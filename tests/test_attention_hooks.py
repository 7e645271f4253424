"""The UNet's one attention-hook mechanism: a hook reads every attention layer's probabilities or
replaces them; without one the layers run the fused kernel and nothing else."""

import pytest
import torch

import sdlab
from sdlab.models import attention as attention_module
from sdlab.models.attention import AttentionSite, attention_hooks, attention_sites, recorded_cross_attention


@pytest.fixture(scope="module")
def unet():
    return sdlab.load().unet  # the bundled model: trained weights, so attention matters to its output


def inputs(batch=2):
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 16, 16, generator=generator), torch.tensor([500]),
            torch.randn(batch, 77, 64, generator=generator))


def test_a_reading_hook_sees_each_layers_probabilities_and_changes_nothing(unet):
    x, t, context = inputs()
    with torch.no_grad():
        plain = unet(x, t, context)
        seen = []
        with attention_hooks(unet, lambda site, p: seen.append((site, p.shape, p.sum(-1))),
                             self_attention=True) as sites:
            hooked = unet(x, t, context)
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)
    assert [site for site, _, _ in seen] == sites == [site for _, site in attention_sites(unet)]
    for site, shape, sums in seen:
        assert shape[:2] == (2, 4) and shape[-1] == (77 if site.cross else shape[2])
        torch.testing.assert_close(sums, torch.ones_like(sums))  # probabilities over the keys
    assert {site.place for site, _, _ in seen} == {"down", "mid", "up"}
    assert all(layer.hook is None and layer.site is None for layer, _ in attention_sites(unet))


def test_the_hook_chooses_cross_or_self_attention_and_places(unet):
    x, t, context = inputs()
    seen = []
    with torch.no_grad(), attention_hooks(unet, lambda site, p: seen.append(site), places=("up",)):
        unet(x, t, context)
    assert seen and all(site.cross and site.place == "up" and site.name.startswith("output_blocks") for site in seen)
    seen.clear()
    with torch.no_grad(), attention_hooks(unet, lambda site, p: seen.append(site), cross=False, self_attention=True):
        unet(x, t, context)
    assert seen and not any(site.cross for site in seen) and all(site.name.endswith("attn1") for site in seen)


def test_a_replacing_hook_changes_the_output_and_returning_the_same_probabilities_does_not(unet):
    x, t, context = inputs()
    with torch.no_grad():
        plain = unet(x, t, context)
        with attention_hooks(unet, lambda site, p: p):
            same = unet(x, t, context)
        with attention_hooks(unet, lambda site, p: torch.full_like(p, 1 / p.shape[-1])):
            uniform = unet(x, t, context)
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-5)
    assert (uniform - plain).abs().max() > 1e-3


def test_without_a_hook_no_probabilities_are_computed(unet, monkeypatch):
    """Zero cost when off: the layers take the fused scaled_dot_product_attention path, never the
    explicit one (measured: the bundled UNet's forward time is unchanged; see the report in the PR)."""
    def explicit(*args):
        raise AssertionError("probabilities computed without a hook")

    monkeypatch.setattr(attention_module, "attention_probabilities", explicit)
    x, t, context = inputs()
    with torch.no_grad():
        unet(x, t, context)


def test_one_hook_per_layer_and_the_recording_channel_is_a_hook(unet):
    x, t, context = inputs()
    with recorded_cross_attention(unet) as maps:
        with pytest.raises(RuntimeError, match="already set"):
            with attention_hooks(unet, lambda site, p: None):
                pass
        with torch.no_grad():
            unet(x, t, context)
    crosses = [site for _, site in attention_sites(unet) if site.cross]
    assert len(maps) == len(crosses) and maps[0].shape[0] == 2 and maps[0].shape[-1] == 77
    assert isinstance(crosses[0], AttentionSite)
