"""`--self-attention-scale S` (models/attention.py, sharpened_self_attention): the UNet's self-attention
logits times S for a run, the text cross-attention untouched; the exact network when S is 1 or the option
is left out; written into the parameters and read back from them; bad values refused in one line."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.bundled import DEMO
from sdlab.cli import main
from sdlab.errors import InputError
from sdlab.infotext import parse_infotext
from sdlab.models import build_unet
from sdlab.models.attention import CrossAttention, attention_hooks, attention_sites, sharpened_self_attention
from sdlab.outputs import read_parameters
from sdlab.pipelines.from_params import options_from_infotext
from test_cli import assert_one_line_error, run_main
from test_fast_modes import NoLoras


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = build_unet(DEMO.unet).eval()
    with torch.no_grad():  # the zero-initialised output layer would hide every difference
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


def unet_inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([500, 500]),
            torch.randn(2, 77, DEMO.unet.context_dim, generator=generator))


def test_a_scaled_layer_computes_softmax_of_the_scaled_logits():
    torch.manual_seed(2)
    layer = CrossAttention(32, heads=4, head_dim=8).eval()
    x = torch.randn(2, 10, 32)
    layer.logit_scale = 2.5
    with torch.no_grad():
        got = layer(x)
        q, k, v = (t.view(2, 10, 4, 8).transpose(1, 2) for t in (layer.to_q(x), layer.to_k(x), layer.to_v(x)))
        weights = (2.5 * q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
        expected = layer.to_out((weights @ v).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_only_the_self_attention_layers_change_and_leaving_restores_them(unet):
    sites = attention_sites(unet)
    selves = [layer for layer, site in sites if not site.cross]
    assert selves and len(selves) < len(sites)
    x, t, context = unet_inputs()
    with torch.no_grad():
        plain = unet(x, t, context)
        with sharpened_self_attention(unet, 2.0) as changed:
            assert changed == len(selves)
            assert all(layer.logit_scale == 2.0 for layer in selves)
            assert all(layer.logit_scale is None for layer, site in sites if site.cross)
            sharpened = unet(x, t, context)
        assert not torch.allclose(plain, sharpened, atol=1e-4)  # the option does something
        assert torch.equal(unet(x, t, context), plain)  # and leaving it gives the trained network back
        with pytest.raises(RuntimeError, match="inside"):
            with sharpened_self_attention(unet, 3.0):
                raise RuntimeError("inside")
    assert all(layer.logit_scale is None for layer, _ in sites)


def test_hooked_layers_see_the_same_scaled_attention(unet):
    """A layer with a hook computes its probabilities by hand; the scale is in them as in the fused kernel."""
    x, t, context = unet_inputs()
    seen = []
    with torch.no_grad(), sharpened_self_attention(unet, 2.0):
        fused = unet(x, t, context)
        with attention_hooks(unet, lambda site, p: seen.append(p) and None, cross=False, self_attention=True):
            hooked = unet(x, t, context)
    assert seen
    torch.testing.assert_close(hooked, fused, rtol=1e-4, atol=1e-5)


def test_the_pipeline_records_the_scale_and_the_parameters_remake_the_image():
    pipe = sdlab.load(None)  # the bundled model (the demo's zero output layer draws the same either way)
    settings = dict(steps=3, seed=4, width=96, height=64)
    exact = pipe.txt2img("a red circle", **settings)
    assert "Self-attention scale" not in parse_infotext(exact.infotexts[0])
    assert np.array_equal(np.asarray(pipe.txt2img("a red circle", self_attention_scale=1.0, **settings).images[0]),
                          np.asarray(exact.images[0]))
    sharpened = pipe.txt2img("a red circle", self_attention_scale=2.0, **settings)
    assert parse_infotext(sharpened.infotexts[0])["Self-attention scale"] == "2"
    assert not np.array_equal(np.asarray(sharpened.images[0]), np.asarray(exact.images[0]))
    options = options_from_infotext(sharpened.infotexts[0])
    assert options.settings["self_attention_scale"] == 2.0
    assert not options.notes
    assert all(layer.logit_scale is None for layer, _ in attention_sites(pipe.unet))


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_the_pipeline_refuses_a_scale_that_is_not_a_positive_number(value):
    with pytest.raises(InputError, match="self-attention scale"):
        sdlab.load("demo").txt2img("a red circle", steps=1, self_attention_scale=value)


@pytest.mark.parametrize("value", ["0", "-2", "nan", "sharp"])
def test_the_command_line_refuses_a_bad_scale_in_one_line(tmp_path, value):
    code, _, stderr = run_main("generate", "a red circle", "--self-attention-scale", value,
                               "-o", str(tmp_path / "out.png"))
    assert_one_line_error(code, stderr, "--self-attention-scale")
    assert list(tmp_path.iterdir()) == []


def test_generate_writes_the_scale_and_params_from_reads_it_back(tmp_path):
    made, again = tmp_path / "made.png", tmp_path / "again.png"
    assert main(["generate", "a small red triangle on the left", "--size", "96x64", "--steps", "3", "--seed", "2",
                 "--self-attention-scale", "2", "--quiet", "-o", str(made)]) == 0
    assert parse_infotext(read_parameters(str(made)))["Self-attention scale"] == "2"
    assert main(["generate", "--params-from", str(made), "--quiet", "-o", str(again)]) == 0
    assert read_parameters(str(again)) == read_parameters(str(made))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))


def test_the_native_api_takes_the_scale_within_its_bounds():
    from sdlab.server.native_models import JobRequest
    from sdlab.server.native_requests import job_work
    from sdlab.server.settings import ServerSettings

    work = job_work(JobRequest(prompt="a red circle", self_attention_scale=2), ServerSettings(), NoLoras())
    assert work.settings["self_attention_scale"] == 2.0
    with pytest.raises(InputError, match="self_attention_scale"):
        job_work(JobRequest(prompt="a red circle", self_attention_scale=0), ServerSettings(), NoLoras())


def test_the_evaluations_pass_the_scale_on(monkeypatch, capsys):
    """`sdlab eval shapes|outpaint --self-attention-scale S` reach the pipelines with S (the figures in
    MODEL_CARD.md come from these commands)."""
    from sdlab.shapes import edit_eval, evaluation
    from test_eval_shapes import OutpaintingPipe

    pipe = OutpaintingPipe(2, 0)
    seen = []
    answer = pipe.outpaint
    pipe.outpaint = lambda *args, **kwargs: seen.append(kwargs["self_attention_scale"]) or answer(*args, **kwargs)
    edit_eval.evaluate_outpainting(pipe, n=2, seed=0, self_attention_scale=2.0)
    assert seen == [2.0, 2.0]

    asked = {}
    monkeypatch.setattr(edit_eval, "evaluate_outpainting",
                        lambda pipe, *args, **kwargs: asked.update(outpaint=kwargs) or {"appears": 1.0, "outpaint": 1.0})
    monkeypatch.setattr(evaluation, "evaluate", lambda pipe, *args, **kwargs: asked.update(shapes=kwargs) or [])
    assert main(["eval", "outpaint", "-n", "1", "--quiet", "--self-attention-scale", "2"]) == 0
    assert main(["eval", "shapes", "-n", "1", "--quiet", "--no-paraphrases", "--self-attention-scale", "1.5"]) == 0
    assert asked["outpaint"]["self_attention_scale"] == 2.0 and asked["shapes"]["self_attention_scale"] == 1.5
    assert "self-attention scale 1.5" in capsys.readouterr().out
