"""The opt-in fast modes (sdlab/fast/): each changes the image, none is on by default, DeepCache with
N = 1 is the exact network, and a bad spec is refused in one line. How much quality each costs is
measured by benchmarks/fast_modes.py, not asserted here."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.cli import main
from sdlab.config import UNetConfig
from sdlab.errors import InputError
from sdlab.fast.deepcache import DeepCacheUNet
from sdlab.fast.modes import FastModes, parse_fast
from sdlab.fast.tome import bipartite_soft_matching, token_merging
from sdlab.guidance import CFGDenoiser
from sdlab.infotext import parse_infotext
from sdlab.models.unet import DeepFeatures, UNetModel
from sdlab.outputs import read_parameters

# attention at full resolution (where ToMe merges), two res blocks a level so depth 1 stays in level 0
TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), num_res_blocks=2,
                  num_heads=4, context_dim=32)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNetModel(TINY).eval()
    with torch.no_grad():  # ldm starts the residual branches and conv_out at zero: the output would be 0
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


def inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 12, generator=generator), torch.tensor([500.0, 500.0]),
            torch.randn(2, 7, 32, generator=generator))


@torch.no_grad()
def test_a_whole_pass_keeps_the_deep_features_and_a_shallow_pass_on_them_gives_the_same_output(unet):
    x, t, context = inputs(0)
    exact = unet(x, t, context)
    cache = DeepFeatures(depth=1)
    assert torch.equal(unet(x, t, context, deep_cache=cache), exact)
    assert cache.features is not None
    # the shallow branch at the same inputs, on the deep features it would compute itself: the same output
    assert torch.allclose(unet(x, t, context, deep_cache=cache), exact, atol=1e-5)
    # at other inputs it reuses stale deep features: an approximation, not the exact output
    x2, t2, context2 = inputs(1)
    assert not torch.allclose(unet(x2, t2, context2, deep_cache=cache), unet(x2, t2, context2), atol=1e-3)


@torch.no_grad()
def test_deepcache_every_call_is_the_exact_network_and_every_third_call_is_not(unet):
    every, third = DeepCacheUNet(unet, 1), DeepCacheUNet(unet, 3)
    outputs = []
    for seed in range(3):
        x, t, context = inputs(seed)
        exact = unet(x, t, context)
        assert torch.equal(every(x, t, context=context), exact)
        outputs.append(torch.equal(third(x, t, context=context), exact))
    assert outputs == [True, False, False]
    x, t, context = inputs(0)  # another batch size (not CFG's halving) starts the count again with a whole pass
    x, t, context = torch.cat([x, x[:1]]), torch.cat([t, t[:1]]), torch.cat([context, context[:1]])
    assert torch.equal(third(x, t, context=context), unet(x, t, context))


@torch.no_grad()
def test_when_cfg_truncation_halves_the_batch_the_count_goes_on_with_the_conditional_half(unet):
    """CFGDenoiser stacks (uncond, cond): the first conditional-only call after a whole one runs shallow on
    the second half of the cached deep features, not whole."""
    model = DeepCacheUNet(unet, 3)
    x, t, context = inputs(0)
    model(x, t, context=context)  # whole, batch 2: keeps the deep features of both halves
    cached = model.cache.features.clone()
    x2, t2, context2 = inputs(1)
    halved = model(x2[1:], t2[1:], context=context2[1:])
    on_the_conditional_half = unet(x2[1:], t2[1:], context2[1:], deep_cache=DeepFeatures(1, cached[1:]))
    on_the_unconditional_half = unet(x2[1:], t2[1:], context2[1:], deep_cache=DeepFeatures(1, cached[:1]))
    assert torch.equal(halved, on_the_conditional_half)
    assert not torch.allclose(halved, on_the_unconditional_half, atol=1e-3)
    assert not torch.allclose(halved, unet(x2[1:], t2[1:], context2[1:]), atol=1e-3)
    assert torch.equal(model(x2[1:], t2[1:], context=context2[1:]), halved)  # the next shallow call, same inputs
    assert torch.equal(model(x2[1:], t2[1:], context=context2[1:]), unet(x2[1:], t2[1:], context2[1:]))  # whole


@torch.no_grad()
def test_the_halved_batch_runs_whole_where_the_count_says_whole(unet):
    model = DeepCacheUNet(unet, 2)
    x, t, context = inputs(0)
    model(x, t, context=context)  # whole
    model(x, t, context=context)  # shallow
    x2, t2, context2 = inputs(1)
    assert torch.equal(model(x2[1:], t2[1:], context=context2[1:]), unet(x2[1:], t2[1:], context2[1:]))


@torch.no_grad()
def test_deepcache_runs_whole_above_the_warm_up_timestep_then_counts_from_the_last_whole_call(unet):
    """deepcache:3 with the first steps whole: calls at t > 500 whole, then two shallow, one whole, ..."""
    model = DeepCacheUNet(unet, 3, whole_above=500.0)
    whole = []
    for timestep in (900.0, 700.0, 400.0, 300.0, 200.0, 100.0, 50.0):
        x, _, context = inputs(int(timestep))
        t = torch.tensor([timestep, timestep])
        whole.append(torch.equal(model(x, t, context=context), unet(x, t, context)))
    assert whole == [True, True, False, False, True, False, False]


def test_deepcache_refuses_a_depth_beyond_the_skip_connections(unet):
    with pytest.raises(InputError, match="beyond this UNet's skip connections"):
        DeepCacheUNet(unet, 3, depth=len(unet.input_blocks))


def test_merging_then_unmerging_tokens_that_repeat_in_their_cells_gives_them_back():
    h, w, c = 8, 6, 16
    cells = torch.randn(1, h // 2, w // 2, c)
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, h * w, c)  # equal in each 2x2 cell
    merge, unmerge = bipartite_soft_matching(x, h, w, 0.5, torch.Generator().manual_seed(0))
    merged = merge(x)
    assert merged.shape == (1, h * w - h * w // 2, c)
    assert torch.allclose(unmerge(merged), x)


@torch.no_grad()
def test_token_merging_changes_the_output_only_while_on(unet):
    x, t, context = inputs(0)
    exact = unet(x, t, context)
    with token_merging(unet, 0.5, (16, 12)):
        merged = unet(x, t, context)
    assert merged.shape == exact.shape and not torch.allclose(merged, exact, atol=1e-3)
    assert torch.equal(unet(x, t, context), exact)


class Recorder(torch.nn.Module):
    """A denoiser that records the batch of each call and returns the text embedding's mean per row."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, sigma, crossattn):
        self.batches.append(x.shape[0])
        return x * 0 + crossattn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_cfg_truncation_drops_the_unconditional_pass_from_its_fraction_of_the_steps_on():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    recorder = Recorder()
    cond, uncond = torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    model = CFGDenoiser(recorder, cond, uncond, 7.0, sigmas=sigmas, truncation=0.5)
    x = torch.zeros(1, 4, 2, 2)
    outputs = [model(x, sigma) for sigma in sigmas[:-1]]
    assert recorder.batches == [2, 2, 1, 1]
    assert [float(out.flatten()[0]) for out in outputs] == [7.0, 7.0, 1.0, 1.0]  # guided, then the cond alone


@pytest.mark.parametrize("spec, modes", [
    ("deepcache:3", FastModes(deepcache=3)),
    ("deepcache:2:0", FastModes(deepcache=2, deepcache_depth=0)),
    ("deepcache:5:1:0.3", FastModes(deepcache=5, deepcache_whole_first=0.3)),
    ("cfg-trunc:0.8", FastModes(cfg_truncation=0.8)),
    ("tome:0.5", FastModes(token_merging=0.5)),
    ("deepcache:3,tome:0.5,cfg-trunc:0.7", FastModes(deepcache=3, cfg_truncation=0.7, token_merging=0.5)),
])
def test_specs_read_as_the_modes_and_are_written_back_in_one_order(spec, modes):
    assert parse_fast(spec) == modes
    assert parse_fast(modes.spec()) == modes


@pytest.mark.parametrize("spec, fragment", [
    ("warp:2", "unknown fast mode 'warp:2'"),
    ("deepcache:0", "needs N >= 1"),
    ("deepcache:x", "needs a whole number"),
    ("deepcache:3:1:1", "share of the first steps run whole"),
    ("deepcache:3:1:-0.2", "share of the first steps run whole"),
    ("cfg-trunc:1.5", "0 to 1"),
    ("tome:0.9", "at most 0.75"),
    ("tome:0.5,tome:0.3", "given twice"),
])
def test_bad_specs_are_refused_saying_what_is_accepted(spec, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_fast(spec)


def test_a_bad_spec_on_the_command_line_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "a red circle", "--fast", "deepcache:0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deepcache:N[:D[:S]] needs N >= 1" in err


@pytest.fixture(scope="module")
def pipe():
    import sdlab
    from sdlab.bundled import BUNDLED_MODEL

    assert os.path.exists(BUNDLED_MODEL), "the bundled model ships in src/sdlab/weights/"
    return sdlab.load(BUNDLED_MODEL)


RUN = dict(steps=4, guidance_scale=5.0, seed=3, sampler="DPM++ 2M")


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(int)


def test_each_mode_changes_the_image_and_says_so_and_the_default_is_the_exact_one(pipe):
    exact = pipe.txt2img("a large red circle on the left", **RUN)
    assert "Fast" not in parse_infotext(exact.infotexts[0])
    same = pipe.txt2img("a large red circle on the left", fast="deepcache:1", **RUN)
    assert np.array_equal(pixels(same), pixels(exact))
    for spec in ("deepcache:2", "cfg-trunc:0.5", "tome:0.5"):
        fast = pipe.txt2img("a large red circle on the left", fast=spec, **RUN)
        assert not np.array_equal(pixels(fast), pixels(exact)), spec
        assert parse_infotext(fast.infotexts[0])["Fast"] == spec


def test_deepcache_with_the_first_half_whole_follows_the_exact_run_for_those_steps_only(pipe):
    def steps(fast):
        denoised = []
        pipe.txt2img("a large red circle on the left", fast=fast, callback=lambda info: denoised.append(info["denoised"]),
                     **RUN)
        return denoised

    exact, warmed, cached = steps(None), steps("deepcache:2:1:0.5"), steps("deepcache:2")
    # 4 steps: 0 and 1 whole, 2 shallow, 3 whole; plain deepcache:2 is shallow from step 1 on
    assert [torch.equal(a, b) for a, b in zip(warmed, exact)] == [True, True, False, False]
    assert [torch.equal(a, b) for a, b in zip(cached, exact)] == [True, False, False, False]
    result = pipe.txt2img("a large red circle on the left", fast="deepcache:2:1:0.5", **RUN)
    assert parse_infotext(result.infotexts[0])["Fast"] == "deepcache:2:1:0.5"


def test_prompt_to_prompt_refuses_the_fast_modes(pipe):
    with pytest.raises(InputError, match="leave out the fast modes"):
        pipe.edit("a red circle", "a blue circle", fast="deepcache:2", steps=2, sampler="DPM++ 2M")


@pytest.mark.parametrize("spec", ["deepcache:2", "tome:0.5"])
def test_attention_maps_refuse_the_modes_that_skip_or_merge_attention(tmp_path, capsys, spec):
    out, maps = tmp_path / "out.png", tmp_path / "maps.png"
    code = main(["generate", "a blue square", "--fast", spec, "--attention-maps", str(maps), "--steps", "2",
                 "--quiet", "-o", str(out)])
    assert code == 2 and "leave out --fast deepcache/tome" in capsys.readouterr().err
    assert not out.exists() and not maps.exists()


def test_an_image_made_fast_is_made_again_from_its_parameters(tmp_path):
    made, again = tmp_path / "made.png", tmp_path / "again.png"
    common = ["--size", "64x64", "--steps", "3", "--sampler", "DPM++ 2M", "--quiet"]
    assert main(["generate", "a blue square", "--seed", "5", "--fast", "tome:0.5,deepcache:2", *common,
                 "-o", str(made)]) == 0
    assert parse_infotext(read_parameters(str(made)))["Fast"] == "deepcache:2,tome:0.5"
    assert main(["generate", "--params-from", str(made), "--quiet", "-o", str(again)]) == 0
    assert read_parameters(str(again)) == read_parameters(str(made))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))


class NoLoras:
    """The model folder a job request needs here: no LoRAs."""

    def lora_folders(self):
        return []


def test_the_native_api_takes_a_fast_field_checked_like_the_command_lines():
    from sdlab.server.native_models import JobRequest
    from sdlab.server.native_requests import job_work
    from sdlab.server.settings import ServerSettings

    work = job_work(JobRequest(prompt="a red circle", fast="tome:0.5, deepcache:3"), ServerSettings(), NoLoras())
    assert work.settings["fast"] == "deepcache:3,tome:0.5"
    assert "fast" not in job_work(JobRequest(prompt="a red circle"), ServerSettings(), NoLoras()).settings
    with pytest.raises(InputError, match="unknown fast mode"):
        job_work(JobRequest(prompt="a red circle", fast="warp:2"), ServerSettings(), NoLoras())
