"""A request that cannot fit is refused in seconds, with one line, before anything large is allocated;
one that fits runs; the estimate grows as it should and bounds what a generation measures."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sdlab import memory
from sdlab.config import SD1, SD2
from sdlab.errors import InputError, TooLargeError
from sdlab.memory import Limits, check_generation_fits, check_limits, generation_memory, generation_memory_bytes

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
CPU = torch.device("cpu")
GiB = 2**30

# Runs `python -m sdlab ARGS` as its child and reports the child's exit code, output, wall time and
# peak RSS (ru_maxrss of RUSAGE_CHILDREN counts only children that have ended, i.e. this one).
MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sdlab", *sys.argv[1:]], capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps(dict(code=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, peak=peak,
                          seconds=time.perf_counter() - started)))
""")


def run_measured(*args, cwd):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, env=env, cwd=cwd,
                         check=True)
    return json.loads(out.stdout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sdlab:")]


def test_a_huge_image_is_refused_in_seconds_without_allocating_it(tmp_path):
    result = run_measured("generate", "a red circle", "--size", "100000x100000", "-o", str(tmp_path / "x.png"),
                          cwd=tmp_path)
    assert result["code"] == 2, result["stderr"]
    (line,) = error_lines(result["stderr"])
    assert "100000x100000" in line and "would need about" in line and "free" in line
    assert "Traceback" not in result["stderr"]
    assert result["peak"] < 1 * GiB
    assert result["seconds"] < 30  # torch's import is most of it
    assert os.listdir(tmp_path) == []


def test_a_batch_that_does_not_fit_is_refused_the_same_way(tmp_path):
    result = run_measured("generate", "a red circle", "--size", "1024x1024", "--batch", "1000",
                          "-o", str(tmp_path / "x.png"), cwd=tmp_path)
    assert result["code"] == 2, result["stderr"]
    (line,) = error_lines(result["stderr"])
    assert "1000 1024x1024 images would need about" in line
    assert result["peak"] < 1 * GiB
    assert os.listdir(tmp_path) == []


def test_limits_refuse_whatever_the_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 10**15)
    with pytest.raises(TooLargeError, match="above the limit .*--max-pixels"):
        check_generation_fits(SD1, 8192, 8200, 1, CPU, torch.float32)
    check_generation_fits(SD1, 8192, 8192, 1, CPU, torch.float32)  # the default cap itself passes
    with pytest.raises(TooLargeError, match="--max-batch"):
        check_limits(512, 512, 9, limits=Limits(max_batch=8))
    with pytest.raises(TooLargeError, match="50 steps"):
        check_limits(512, 512, 1, 50, Limits(max_steps=40))
    check_limits(10**6, 10**6, 10**6, 10**6, Limits(None, None, None))
    assert issubclass(TooLargeError, InputError)  # the CLI's one line and exit 2


def test_unknown_free_memory_leaves_only_the_limits(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: None)
    monkeypatch.setattr("sdlab.devices.available_memory_bytes", lambda device: None)
    check_generation_fits(SD1, 4096, 4096, 16, CPU, torch.float32)


def test_sd_at_2048_with_the_tiled_vae_fits_a_24_gb_machine():
    """What a demanding user expects to run on a 24 GB machine must not be refused by the estimate."""
    needed = generation_memory_bytes(SD1, 2048, 2048, 1, tiled_vae=True)
    assert needed < 20 * GiB
    assert generation_memory_bytes(SD1, 512, 512, 1) < 8 * GiB  # SD at its own size: weights (4 GiB) + a little


def test_the_estimate_grows_with_size_and_batch():
    small = generation_memory(SD2, 512, 512, 1)
    assert generation_memory(SD2, 1024, 1024, 1).work > 3.5 * small.work
    assert generation_memory(SD2, 512, 512, 4).work > 3.5 * small.work
    assert generation_memory(SD2, 512, 512, 1, guidance=False).sampling < small.sampling
    assert generation_memory(SD2, 2048, 2048, 1, tiled_vae=True).decoding < \
        generation_memory(SD2, 2048, 2048, 1).decoding
    assert small.weights == generation_memory(SD2, 1024, 1024, 8).weights > 4 * GiB  # 1.3 billion fp32 numbers


def test_attention_scores_are_counted_only_where_the_kernel_holds_them():
    """torch's CPU and CUDA attention kernels are fused; the math path (MPS) holds (B, heads, N, N)."""
    cpu = generation_memory(SD1, 1024, 1024, 1)
    mps = generation_memory(SD1, 1024, 1024, 1, device=torch.device("mps"), dtype=torch.float16)
    tokens = (1024 // 8) ** 2
    assert mps.sampling > 2 * 8 * tokens**2 * 2 > cpu.sampling


MEASURE_GENERATION = textwrap.dedent("""
    import json, resource, sys, torch
    torch.set_num_threads(1)
    from sdlab.memory import generation_memory
    import sdlab, sdlab.pipelines.api, sdlab.prompts, sdlab.adapters, sdlab.models.tiling
    side = int(sys.argv[1])
    with open("/proc/self/statm") as f:  # resident now: ru_maxrss may still hold the imports' transient peak
        before = int(f.read().split()[1]) * resource.getpagesize()
    pipe = sdlab.load(None)
    pipe.txt2img("a red circle", steps=2, width=side, height=side, seed=1, tiled_vae=False)
    # VmHWM belongs to this process's own memory map; ru_maxrss would carry over the peak of the large
    # pytest process this one was forked from (Linux keeps it across exec)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 - before
    print(json.dumps(dict(peak=peak, estimate=generation_memory(pipe.config, side, side, 1).total)))
""")


def test_the_estimate_bounds_a_measured_generation():
    """Peak RSS of the bundled model's whole txt2img (load, prompts, sampling, decode) at 384 px, above
    what the process held before: the estimate is above it, by less than 2x (measured 1.2-1.3x)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    # peak RSS varies from run to run with the allocator (420-570 MB measured here): the smaller of two runs
    results = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", MEASURE_GENERATION, "384"], capture_output=True, text=True,
                             env=env, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = min(results, key=lambda measured: measured["peak"])
    assert result["peak"] < result["estimate"] < 2 * result["peak"], results


def test_a_request_that_fits_runs(tmp_path):
    result = run_measured("generate", "a red circle", "--size", "64x64", "--steps", "2", "-o",
                          str(tmp_path / "x.png"), cwd=tmp_path)
    assert result["code"] == 0, result["stderr"]
    assert os.path.isfile(tmp_path / "x.png")
    assert result["stderr"].startswith("loading sdlab-shapes.safetensors")


def test_the_python_api_refuses_what_cannot_fit_before_sampling(monkeypatch):
    """The engine checks too, so `pipe.txt2img` and the server refuse as the CLI does: with a machine that
    has 64 MB free, a 4096x4096 request fails with one line before the UNet is called once."""
    import sdlab
    from sdlab import devices

    pipe = sdlab.load()
    calls = []
    monkeypatch.setattr(pipe.unet, "forward", lambda *args, **kwargs: calls.append(1))
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 64 * 2**20)
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 64 * 2**20)
    with pytest.raises(TooLargeError, match="would need about"):
        pipe.txt2img("a red circle", width=4096, height=4096, steps=2)
    assert calls == []
