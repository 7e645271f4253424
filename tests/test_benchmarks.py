"""The benchmark suite's plumbing on sdlab's tiny demo model: what it runs, how it reads step times, how it
counts FLOPs and groups a profile, what it reports, and the GPU script's code path on the CPU."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import floor  # noqa: E402
import report  # noqa: E402
from random_weights import CONFIGS, build_checkpoint  # noqa: E402
from suite import Run, planned_runs  # noqa: E402
from workers import StepClock, step_times  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    build_checkpoint(folder, CONFIGS["tiny"])
    return folder


def test_planned_runs_pass_sdlab_options_through_and_read_their_dtype():
    runs = planned_runs(["compile=--compile", "deepcache=--fast deepcache:3", "half=--dtype bf16"],
                        ["diffusers", "openvino"], ["fp32"])
    assert [(r.name, r.library, r.dtype, r.options) for r in runs] == [
        ("sdlab", "sdlab", "fp32", []),
        ("sdlab compile", "sdlab", "fp32", ["--compile"]),
        ("sdlab deepcache", "sdlab", "fp32", ["--fast", "deepcache:3"]),
        ("sdlab half", "sdlab", "bf16", ["--dtype", "bf16"]),
        ("diffusers", "diffusers", "fp32", []),
        ("openvino", "openvino", "fp32", []),
    ]
    assert [r.name for r in planned_runs([], ["diffusers"], ["fp32", "bf16"])] == [
        "sdlab", "diffusers", "sdlab bf16", "diffusers bf16"]
    assert Run("x", "sdlab", "fp32", ["--dtype", "bf16"]).dtype == "bf16"


def test_step_clock_notes_loading_and_each_progress_count():
    real = io.StringIO()
    clock = StepClock(real)
    assert clock.isatty()
    clock.write("loading model.safetensors ...\n")
    for count in (0, 0, 1, 2, 3):
        clock.write(f"\rsampling 0{count}/3 |███     | 1.0s, 1.00 s/it")
    clock.write("\n")
    clock.write("sdlab: note: something\n")
    assert clock.loading_at is not None
    assert sorted(clock.count_at) == [0, 1, 2, 3]
    assert clock.count_at[0] <= clock.count_at[1] <= clock.count_at[3]
    assert real.getvalue() == "sdlab: note: something\n"


def test_step_times_leave_out_the_first_step():
    assert step_times([0.0, 5.0, 6.0, 8.0]) == (5.0, 1.5)
    assert step_times([0.0, 2.0]) == (2.0, 2.0)


@pytest.mark.parametrize("name, group", [
    ("aten::mkldnn_convolution", "convs"), ("aten.convolution.default", "convs"), ("aten::addmm", "linear"),
    ("aten.mm.default", "linear"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten.bmm.default", "attention"), ("aten::_softmax", "attention"), ("aten::native_group_norm", "norms"),
    ("aten::native_layer_norm", "norms"), ("aten::silu", "other"), ("aten::add", "other")])
def test_op_category(name, group):
    assert floor.op_category(name) == group


def test_sd15_unet_step_flops_match_the_issue():
    """One CFG step of SD 1.5's UNet at 256 px: ~0.36 TFLOP, convs ~60 %, linear ~34 %, attention ~5 %
    (issue #24 measured 343 GFLOP with the same shares)."""
    flops = floor.unet_step_flops(CONFIGS["sd15"], 32)
    assert 330e9 < flops["total"] < 380e9
    assert flops["convs"] + flops["linear"] + flops["attention"] == pytest.approx(flops["total"], rel=1e-6)
    assert 0.5 < flops["convs"] / flops["total"] < 0.7
    assert 0.25 < flops["linear"] / flops["total"] < 0.4
    assert floor.matmul_rate(torch.float32, side=128, repeats=2) > 0


def test_profile_groups_a_unet_step(tiny_model):
    import sdlab
    from profile_step import profile_call, step_inputs

    pipe = sdlab.load(str(tiny_model / "model.safetensors"))
    x, t, context = step_inputs(pipe.config.unet.in_channels, pipe.config.unet.context_dim, 8, torch.float32)
    seconds = profile_call(lambda: pipe.unet(x, t, context))
    assert set(seconds) == {*floor.CATEGORIES, "total", "wall"}
    assert seconds["convs"] > 0 and seconds["linear"] > 0 and seconds["norms"] > 0
    assert sum(seconds[group] for group in floor.CATEGORIES) == pytest.approx(seconds["total"])


def test_alternating_walls_are_each_steps_best_call():
    from profile_step import alternating_walls

    calls = []
    walls = alternating_walls({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2)
    assert calls == ["a", "b", "a", "b"] and set(walls) == {"a", "b"} and all(w >= 0 for w in walls.values())


def synthetic_results() -> dict:
    runs = [{"size": 256, "name": name, "library": library, "dtype": "fp32", "options": [], "load_s": load,
             "first_step_s": 4.0, "step_s": step, "command_s": command, "rss_mb": 4000.0, "psnr": psnr}
            for name, library, step, command, load, psnr in [
                ("sdlab", "sdlab", 2.0, 50.0, 0.5, math.inf), ("diffusers", "diffusers", 3.0, 75.0, 1.0, math.inf),
                ("openvino", "openvino", 2.5, 60.0, 5.0, 45.0)]]
    groups = {"convs": 1.0, "linear": 0.5, "attention": 0.1, "norms": 0.2, "other": 0.2}
    return {
        "machine": {"date": "2026-12-07", "cpu": "Test CPU (2 threads, no native bf16)", "flags": "avx2 fma",
                    "platform": "Linux", "torch": "2", "diffusers": "0", "openvino": "1", "python": "3",
                    "load_before": "0.1", "load_after": "0.2"},
        "work": {"model": "sd15", "sizes": [256], "steps": 20, "sampler": "DPM++ 2M Karras", "guidance_scale": 7.0,
                 "seed": 0, "repeats": 2, "matmul_side": 4096, "reference": "diffusers"},
        "openvino_check": {"unet": 2e-6},
        "floor": {"rates": {"fp32": 180e9}, "flops": {"256": {"convs": 220e9, "linear": 120e9, "attention": 20e9,
                                                              "total": 360e9}}},
        "runs": runs,
        "profile": {"256": {library: {**groups, "total": 2.0, "wall": 1.9, "dtype": "fp32"}
                            for library in ("sdlab", "diffusers")}},
    }


def test_report_says_ratios_floor_and_profile():
    data = synthetic_results()
    text = report.markdown(data)
    assert "| sdlab | fp32 | 2.000 | 1.00 |" in text  # 360 GFLOP at 180 GFLOP/s: a 2 s floor
    assert "| sdlab | diffusers | 1.50 | 1.50 | 0.50 | 1.00 |" in text
    assert "| sdlab | openvino | 1.25 | 1.20 | 0.10 | 1.00 |" in text
    assert "| openvino | fp32 | 2.500 | 1.25 |" in text and "| 45.0 |" in text
    assert "| convs | 1000 | 1000 | 50.0 | 50.0 | 220.0 | 220.0 |" in text
    assert "CPU flags: avx2 fma" in text and "Test CPU" in text
    image = report.plot(data)
    assert image.width > 300 and image.height > 100


def test_suite_runs_sdlab_variants_and_diffusers_on_the_tiny_model(tiny_model, tmp_path, capsys):
    import suite

    suite.main(["--model", "tiny", "--peers", "diffusers", "--sizes", "64", "--steps", "2", "--repeats", "1",
                "--matmul-side", "128", "--sdlab", "euler=--sampler Euler", "--work", str(tiny_model),
                "--out", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = {run["name"]: run for run in data["runs"]}
    assert list(runs) == ["sdlab", "sdlab euler", "diffusers"]
    for run in runs.values():
        assert run["step_s"] > 0 and run["load_s"] > 0 and run["rss_mb"] > 100
        assert run["command_s"] > run["load_s"] + run["first_step_s"]
    assert runs["sdlab"]["psnr"] >= 40  # the same image as diffusers
    assert runs["sdlab euler"]["psnr"] < runs["sdlab"]["psnr"]  # the option reached the command
    assert runs["sdlab euler"]["options"] == ["--sampler", "Euler"]
    assert (tmp_path / "out" / "results.png").is_file()
    assert "| sdlab euler | diffusers |" in capsys.readouterr().out


def test_openvino_peer_gives_diffusers_image(tiny_model, tmp_path):
    import shutil

    from openvino_peer import OpenVINOModels, TOLERANCE, convert
    from random_weights import load_diffusers

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    differences = convert(folder)
    assert set(differences) == {"unet", "text_encoder", "vae_decoder"}
    assert max(differences.values()) <= TOLERANCE
    ours = OpenVINOModels(folder, 64).txt2img("a cat", "blurry", 3, 7.0, 0).astype(np.float64)
    reference = load_diffusers(folder)
    theirs = np.asarray(reference("a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.0,
                                  height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0],
                        dtype=np.float64)
    assert theirs.std() > 1
    assert 10 * np.log10(255 ** 2 / max(((ours - theirs) ** 2).mean(), 1e-12)) >= 40


def test_gpu_script_runs_on_the_cpu_with_the_tiny_model(tiny_model, tmp_path, capsys):
    import gpu_bench

    gpu_bench.main(["--device", "cpu", "--tiny", "--modes", "eager", "--batches", "1,2", "--work", str(tiny_model),
                    "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["library"], r["batch"]) for r in rows] == [("sdlab", 1), ("sdlab", 2), ("diffusers", 1),
                                                          ("diffusers", 2)]
    assert all(r["images_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| eager | 2 |" in out
    psnr = float(out.split("PSNR sdlab vs diffusers, first image, eager: ")[1].split(" dB")[0])
    assert psnr >= 40


def test_the_page_cache_is_warmed_with_every_file_the_runs_load(tmp_path):
    from suite import warm_page_cache

    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "openvino").mkdir()
    (tmp_path / "openvino" / "unet.bin").write_bytes(b"y" * 500)
    assert warm_page_cache(tmp_path, openvino=False) == 1000
    assert warm_page_cache(tmp_path, openvino=True) == 1500
