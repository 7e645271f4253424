"""What the server costs on top of the pipelines (issue #22's targets), with the bundled model:

1. start-up: `sdlab serve` in a fresh process until its first answer (GET /sdapi/v1/progress, what a
   client polls; it needs no torch), until GET /api/v1/samplers answers (the sampler registry imports
   torch), and until its first image (the model loads as the first job) — target: first answer <= 3 s;
2. one txt2img request (64x64, 20 steps DPM++ 2M, CFG 5) through /sdapi/v1/txt2img vs the same call
   in Python in this process — target: the API <= 5 % more wall time. The server runs the web UI's
   default live preview (approximate, every 10 steps) and returns a base64 PNG, as clients get it;
3. one live preview (the linear latent-to-RGB map and the PNG, what /progress shows; the full-VAE
   preview beside it) vs one sampling step — target: <= 5 %.

    .venv/bin/python benchmarks/server.py [--repeats 5] [--startup-only]

Both sides run with this process's torch thread count; API and Python runs alternate and the best of
`repeats` is kept, because a shared machine drifts from minute to minute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(SRC.parent / "tests"))

PROMPT = "a large red circle on the left"
REQUEST = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 20, "sampler_name": "DPM++ 2M", "cfg_scale": 5.0,
           "seed": 1}


def wait_for(url: str, process: subprocess.Popen) -> None:
    while True:
        if process.poll() is not None:
            raise SystemExit(f"sdlab serve exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.01)


def start_server(port: int, threads: int) -> tuple[subprocess.Popen, float, float, float]:
    """(process, seconds to the first answer, to the sampler list, to the first image) of a fresh `sdlab serve`."""
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "sdlab", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/sdapi/v1/progress", process)
    first_answer = time.perf_counter() - started
    wait_for(url + "/api/v1/samplers", process)
    samplers = time.perf_counter() - started
    post(url, dict(REQUEST, steps=1))
    return process, first_answer, samplers, time.perf_counter() - started


def cpu_name() -> str:
    """The processor's model name from /proc/cpuinfo (sdlab.devices imports torch, which would warm
    the page cache for the servers measured after it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def post(url: str, body: dict) -> dict:
    import json

    request = urllib.request.Request(url + "/sdapi/v1/txt2img", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.loads(answer.read())


def best_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--startup-only", action="store_true", help="measure start-up only (1.)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of the servers")
    args = parser.parse_args()

    from server_helpers import free_port

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {' '.join(map(str, os.getloadavg()))}")
    starts = []
    for _ in range(3):
        process, first_answer, samplers, first_image = start_server(free_port(), args.threads)
        process.terminate()
        process.wait(30)
        starts.append((first_answer, samplers, first_image))
    print("start-up runs (first answer, sampler list, first image):",
          ", ".join(f"({a:.2f} s, {b:.2f} s, {c:.2f} s)" for a, b, c in starts))
    first_answer, samplers, first_image = (min(run[i] for run in starts) for i in range(3))
    print(f"start-up: first answer {first_answer:.2f} s (target <= 3 s), sampler list {samplers:.2f} s, "
          f"first image {first_image:.2f} s (best of {len(starts)} each); "
          f"load average now {' '.join(map(str, os.getloadavg()))}")
    if args.startup_only:
        return

    import torch

    import sdlab
    from sdlab.previews import fit_for_pipeline
    from sdlab.server.engine import Engine

    threads = args.threads
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads")

    pipe = sdlab.load()
    settings = {k: REQUEST[k] for k in ("width", "height", "steps", "seed")}
    settings.update(sampler="DPM++ 2M", guidance_scale=5.0)
    port = free_port()
    process, _, _, _ = start_server(port, threads)
    url = f"http://127.0.0.1:{port}"
    try:
        python_times, api_times = [], []
        for _ in range(args.repeats):  # alternating, so that both see the same drift
            python_times.append(best_time(lambda: pipe.txt2img(PROMPT, **settings), 1))
            api_times.append(best_time(lambda: post(url, REQUEST), 1))
    finally:
        process.terminate()
        process.wait(30)
    python_s, api_s = min(python_times), min(api_times)
    print(f"txt2img 64x64, 20 steps: Python {python_s:.3f} s, API {api_s:.3f} s, "
          f"API / Python {api_s / python_s:.3f} (target <= 1.05)")

    # one step: the difference of 20 and 10 steps, so that text encoding and decoding cancel out
    ten = best_time(lambda: pipe.txt2img(PROMPT, **dict(settings, steps=10)), args.repeats)
    twenty = best_time(lambda: pipe.txt2img(PROMPT, **settings), args.repeats)
    step_s = (twenty - ten) / 10
    preview_map = fit_for_pipeline(pipe)
    side = 64 // pipe.latent_factor
    latents = torch.randn(1, pipe.config.latent_channels, side, side)  # (B, C, 64/f, 64/f)
    approx = best_time(lambda: [Engine._preview_png(pipe, latents, "approx", preview_map) for _ in range(20)],
                       args.repeats) / 20
    full = best_time(lambda: [Engine._preview_png(pipe, latents, "full", preview_map) for _ in range(5)],
                     args.repeats) / 5
    print(f"one step {step_s * 1000:.1f} ms; preview (approx, PNG) {approx * 1000:.2f} ms = {approx / step_s:.3f} "
          f"of a step (target <= 0.05); full-VAE preview {full * 1000:.1f} ms = {full / step_s:.2f} of a step")


if __name__ == "__main__":
    main()
