"""sdlab, diffusers and OpenVINO side by side on the CPU, on the same random SD 1.5-size weights.

    .venv/bin/python benchmarks/suite.py [--sizes 256,512] [--steps 20] [--repeats 2] [--profile]
        [--sdlab "compile=--compile"] [--sdlab "deepcache=--fast deepcache:3"] [--out benchmarks/results]

Builds the SD 1.5 architecture with random weights once (random_weights.py; `--work DIR` keeps it for
the next invocation), converts diffusers' modules holding the same tensors to OpenVINO (checked within
1e-4 of PyTorch), then for each image size runs every library in a fresh process (workers.py), the runs
alternating and repeated, each figure the best of the repeats (a shared VM drifts 10-30 % from minute to
minute). Every run makes the same image: same prompt, seed 0, DPM++ 2M Karras, CFG 7, batch 1, the
seeded noise diffusers' (sdlab's --noise diffusers), so each PNG is compared with diffusers' (PSNR).

Figures: seconds per step (the mean after the first), the first step, the whole command from process
start to PNG, load, peak RSS; the speed-up of each sdlab run over each peer; each step against this
machine's matmul floor (floor.py). bf16 runs are added where the CPU has native bf16 (elsewhere torch's
bf16 is ~40x slower). `--sdlab NAME=OPTIONS` adds an sdlab run with `sdlab generate` options (repeatable).
`--profile` adds the per-step table by op group. Results: printed, and results.md/.json/.png in --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import floor  # noqa: E402
import report  # noqa: E402
from openvino_peer import PARTS  # noqa: E402
from random_weights import CONFIGS, build_checkpoint  # noqa: E402
from workers import GUIDANCE_SCALE, SAMPLER, SEED  # noqa: E402

WORKERS = Path(__file__).parent / "workers.py"
PEERS = ("diffusers", "openvino")
# the vector extensions that decide which kernels torch and OpenVINO can use
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
SD15_MEMORY_BYTES = 8 * 2**30  # a run holds the 4 GB fp32 weights; OpenVINO's conversion about twice that


@dataclass
class Run:
    name: str
    library: str
    dtype: str = "fp32"
    options: list[str] = field(default_factory=list)  # sdlab generate's command-line options

    def __post_init__(self):
        if "--dtype" in self.options[:-1]:
            self.dtype = self.options[self.options.index("--dtype") + 1]


def planned_runs(sdlab_variants: list[str], peers: list[str], dtypes: list[str]) -> list[Run]:
    """sdlab eager, each `NAME=OPTIONS` variant, and each peer, in every dtype."""
    runs = []
    for dtype in dtypes:
        suffix = "" if dtype == "fp32" else f" {dtype}"
        runs.append(Run(f"sdlab{suffix}", "sdlab", dtype))
        for variant in sdlab_variants:
            name, _, options = variant.partition("=")
            runs.append(Run(f"sdlab {name}{suffix}", "sdlab", dtype, shlex.split(options)))
        runs += [Run(f"{peer}{suffix}", peer, dtype) for peer in peers]
    return runs


def run_worker(run: Run, folder: Path, size: int, steps: int, png: Path) -> dict:
    """One fresh process; its wall time is the command-to-PNG figure."""
    command = [sys.executable, str(WORKERS), run.library, "--folder", str(folder), "--size", str(size),
               "--steps", str(steps), "--dtype", run.dtype, "--png", str(png), "--", *run.options]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    command_s = time.perf_counter() - started
    if proc.returncode != 0 or not png.is_file():
        raise SystemExit(f"{run.name} at {size} px failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "command_s": command_s}


def run_helper(kind: str, folder: Path, *options: str) -> dict:
    """A workers.py job that is not a timed run (the OpenVINO conversion, the profile)."""
    proc = subprocess.run([sys.executable, str(WORKERS), kind, "--folder", str(folder), *options],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_description() -> dict:
    from sdlab.devices import cpu_description, cpu_flags

    versions = {}
    for module in ("diffusers", "openvino"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    return {
        "date": datetime.date.today().isoformat(), "cpu": cpu_description(),
        "flags": " ".join(flag for flag in FLAGS if flag in cpu_flags()), "platform": platform.platform(),
        "torch": torch.__version__, **versions, "python": platform.python_version(),
        "load_before": f"{os.getloadavg()[0]:.1f}",
    }


def matmul_rates(dtypes: list[str], matmul_side: int) -> dict[str, float]:
    return {dtype: floor.matmul_rate(floor.DTYPES[dtype], matmul_side) for dtype in dtypes}


def prepare_model(folder: Path, model: str, openvino: bool) -> dict:
    """Build the weights (unless `folder` has them) and convert them for OpenVINO (unless done);
    -> the conversion's check, or {} when OpenVINO is not run or was converted before."""
    if not (folder / "model.safetensors").is_file():
        if model == "sd15":
            from sdlab.devices import available_memory_bytes

            free = available_memory_bytes(torch.device("cpu"))
            if free is not None and free < SD15_MEMORY_BYTES:
                print(f"warning: {free / 2**30:.1f} GiB of memory available; SD 1.5 size wants about "
                      f"{SD15_MEMORY_BYTES / 2**30:.0f} GiB", file=sys.stderr)
        print(f"building {model} with random weights in {folder} ...", file=sys.stderr, flush=True)
        build_checkpoint(folder, CONFIGS[model])
    if openvino and not all((folder / "openvino" / f"{part}.xml").is_file() for part in PARTS):
        print("converting to OpenVINO ...", file=sys.stderr, flush=True)
        return run_helper("convert", folder)
    return {}


def warm_page_cache(folder: Path, openvino: bool) -> int:
    """Read the weights every run loads once, so that the first run does not pay the disk for the others
    (a one-round run put sdlab, first, at a 5.5 s load and a 13 s first step). -> bytes read."""
    files = [folder / "model.safetensors"] + (sorted((folder / "openvino").glob("*.bin")) if openvino else [])
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            while chunk := handle.read(64 * 2**20):
                total += len(chunk)
    return total


def run_suite(args, folder: Path) -> dict:
    from sdlab.devices import cpu_has_native_bf16

    config = CONFIGS[args.model]
    dtypes = args.dtypes.split(",") if args.dtypes else ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    peers = [peer for peer in args.peers.split(",") if peer]
    runs = planned_runs(args.sdlab, peers, dtypes)
    reference = next((run for run in runs if run.library == "diffusers" and run.dtype == "fp32"), runs[0])
    data = {"machine": machine_description(),
            "work": {"model": args.model, "sizes": args.sizes, "steps": args.steps, "sampler": SAMPLER,
                     "guidance_scale": GUIDANCE_SCALE, "seed": SEED, "repeats": args.repeats,
                     "matmul_side": args.matmul_side, "reference": reference.name},
            "openvino_check": prepare_model(folder, args.model, "openvino" in peers)}
    warm_page_cache(folder, "openvino" in peers)
    print("measuring the matmul floor ...", file=sys.stderr, flush=True)
    rates_before = matmul_rates(dtypes, args.matmul_side)
    data["floor"] = {"flops": {str(size): floor.unet_step_flops(config, size // config.vae.downsample_factor)
                               for size in args.sizes}}
    data["runs"], data["profile"] = [], {}
    pngs = folder / "images"
    pngs.mkdir(exist_ok=True)
    for size in args.sizes:
        measured = {run.name: [] for run in runs}
        for repeat in range(args.repeats):
            # a different order each round, so no run always gets the quieter minute
            order = runs[repeat % len(runs):] + runs[:repeat % len(runs)]
            for run in order:
                print(f"{size} px: {run.name} (round {repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                png = pngs / f"{run.name.replace(' ', '-')}-{size}.png"
                measured[run.name].append(run_worker(run, folder, size, args.steps, png))
        for run in runs:
            best = {key: min(result[key] for result in measured[run.name]) for key in measured[run.name][0]}
            png = pngs / f"{run.name.replace(' ', '-')}-{size}.png"
            reference_png = pngs / f"{reference.name.replace(' ', '-')}-{size}.png"
            data["runs"].append({"size": size, "name": run.name, "library": run.library, "dtype": run.dtype,
                                 "options": run.options, **best, "psnr": report.psnr(Image.open(png).convert("RGB"), Image.open(reference_png).convert("RGB"))})
        if args.profile:
            print(f"{size} px: profiling one step ...", file=sys.stderr, flush=True)
            data["profile"][str(size)] = run_helper("profile", folder, "--size", str(size))
    # measured again at the end, the faster kept: a busy minute at the start would lower the floor's rate
    rates_after = matmul_rates(dtypes, args.matmul_side)
    data["floor"]["rates"] = {dtype: max(rates_before[dtype], rates_after[dtype]) for dtype in dtypes}
    data["machine"]["load_after"] = f"{os.getloadavg()[0]:.1f}"
    return data


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=lambda text: [int(s) for s in text.split(",")], default=[256, 512],
                        help="image sides in px, comma-separated (default 256,512)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each library per size, alternating; best kept")
    parser.add_argument("--sdlab", action="append", default=[], metavar="NAME=OPTIONS",
                        help="an sdlab run with these `sdlab generate` options, e.g. 'compile=--compile' (repeatable)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    parser.add_argument("--dtypes", default=None, help="comma-separated; default fp32, plus bf16 on CPUs with native bf16")
    parser.add_argument("--profile", action="store_true", help="add the per-step profile table by op group")
    parser.add_argument("--model", choices=sorted(CONFIGS), default="sd15",
                        help="sd15: the SD 1.5 architecture; tiny: sdlab's demo model, to check the suite itself")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="keep the weights and their OpenVINO conversion here and reuse them next time")
    parser.add_argument("--matmul-side", type=int, default=floor.MATMUL_SIDE)
    parser.add_argument("--out", default="benchmarks/results", help="folder for results.md, .json and .png")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.work:
        data = run_suite(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="sdlab-suite-") as tmp:
            data = run_suite(args, Path(tmp))
    print(report.write(Path(args.out), data))


if __name__ == "__main__":
    main()
