"""sdlab and diffusers on one CUDA GPU: images per second at 512 px, 20 steps, fp16, batch 1 and 4, eager
and with torch.compile. benchmarks/gpu.sh installs what this needs and runs it.

    python benchmarks/gpu_bench.py [--size 512] [--steps 20] [--batches 1,4] [--dtype fp16]
        [--modes eager,compile] [--compile-mode reduce-overhead] [--sdlab-kwargs '{"fast": "deepcache:3"}']
    python benchmarks/gpu_bench.py --device cpu --tiny     # the same code on sdlab's tiny demo model, in seconds

Both libraries load the same random SD 1.5-size weights (random_weights.py) and make the same images:
the same prompts, seed 0, DPM++ 2M Karras, CFG 7, diffusers' seeded noise. 'compile' is torch.compile on
each library's UNet module, the same mode for both (the UNet is where the time goes); its first batch,
which compiles, is reported apart as the warm-up (the first library compiled also pays torch's one-time
set-up: `--libraries diffusers,sdlab` swaps the order). Each figure is one timed batch after a warm-up batch,
the GPU synchronised before the clock stops. `--sdlab-kwargs` adds keywords to sdlab's txt2img (its own
compile or fast modes) without changing this script. The first image of sdlab and of diffusers, eager,
batch 1, are compared (PSNR): fp16 differs a little from run to run of the kernels, not by much.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_weights import CONFIGS, build_checkpoint, load_diffusers  # noqa: E402
from report import psnr  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # CUDA's fp16 too


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sdlab_generator(pipe, extra: dict):
    def generate(batch: int, steps: int, size: int):
        return pipe.txt2img(PROMPT, NEGATIVE, steps=steps, guidance_scale=7.0, seed=0, width=size, height=size,
                            batch_size=batch, sampler="DPM++ 2M Karras", noise="diffusers", **extra).images
    return generate


def diffusers_generator(pipe):
    def generate(batch: int, steps: int, size: int):
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, height=size,
                    width=size, num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(0)).images
    return generate


def timed(generate, device, batch: int, steps: int, size: int) -> tuple[float, list]:
    synchronize(device)
    started = time.perf_counter()
    images = generate(batch, steps, size)
    synchronize(device)
    return time.perf_counter() - started, images


def load(library: str, folder: Path, device: torch.device, dtype: str, sdlab_kwargs: dict):
    """The library's pipeline on the device, and a generate(batch, steps, size) -> PIL images over it."""
    if library == "sdlab":
        import sdlab

        pipe = sdlab.load(str(folder / "model.safetensors"), device=str(device), dtype=dtype)
        return pipe, sdlab_generator(pipe, sdlab_kwargs)
    pipe = load_diffusers(folder, DTYPES[dtype]).to(device)
    return pipe, diffusers_generator(pipe)


def measure(args, folder: Path, device: torch.device) -> tuple[list[dict], dict]:
    """One row per library, mode and batch; and the first eager images, for the PSNR."""
    rows, first_images = [], {}
    for library in args.libraries:
        pipe, generate = load(library, folder, device, args.dtype, args.sdlab_kwargs)
        for mode in args.modes:
            if mode == "compile":
                pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)
            for batch in args.batches:
                warm_up_s, images = timed(generate, device, batch, args.warm_up_steps, args.size)
                seconds, images = timed(generate, device, batch, args.steps, args.size)
                if mode == "eager" and batch == args.batches[0]:
                    first_images[library] = images[0]
                rows.append({"library": library, "mode": mode, "batch": batch, "seconds": seconds,
                             "images_per_s": batch / seconds, "warm_up_s": warm_up_s})
                print(f"{library:<10} {mode:<8} batch {batch}: {batch / seconds:.3f} images/s "
                      f"({seconds:.2f} s; warm-up {warm_up_s:.1f} s)", file=sys.stderr, flush=True)
        del pipe, generate
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, first_images


def table(rows: list[dict]) -> str:
    lines = ["| library | mode | batch | s per batch | images/s | warm-up s |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['library']} | {r['mode']} | {r['batch']} | {r['seconds']:.3f} | {r['images_per_s']:.3f} | "
              f"{r['warm_up_s']:.1f} |" for r in rows]
    lines += ["", "sdlab / diffusers images/s (above 1: sdlab faster):", "",
              "| mode | batch | ratio |", "| --- | ---: | ---: |"]
    theirs = {(r["mode"], r["batch"]): r for r in rows if r["library"] == "diffusers"}
    for r in rows:
        if r["library"] == "sdlab" and (r["mode"], r["batch"]) in theirs:
            ratio = r["images_per_s"] / theirs[(r["mode"], r["batch"])]["images_per_s"]
            lines.append(f"| {r['mode']} | {r['batch']} | {ratio:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="sdlab's tiny demo model, 64 px, 2 steps: checks the script")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 512; --tiny 64)")
    parser.add_argument("--steps", type=int, default=None, help="default 20; --tiny 2")
    parser.add_argument("--warm-up-steps", type=int, default=3, help="steps of the untimed first batch")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=[1, 4])
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default fp16 on CUDA, fp32 elsewhere")
    parser.add_argument("--libraries", type=lambda text: text.split(","), default=["sdlab", "diffusers"],
                        help="in this order; the first to compile also pays torch.compile's one-time set-up")
    parser.add_argument("--modes", type=lambda text: text.split(","), default=["eager", "compile"])
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        help="torch.compile's mode for both UNets: default, reduce-overhead (CUDA graphs), max-autotune")
    parser.add_argument("--sdlab-kwargs", type=json.loads, default={}, metavar="JSON",
                        help="extra keywords of sdlab's txt2img, e.g. '{\"fast\": \"deepcache:3\"}'")
    parser.add_argument("--work", default=None, metavar="DIR", help="keep the random weights here and reuse them")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 512)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this torch build or machine has none (try --device cpu --tiny)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {args.dtype}, {args.size} px, {args.steps} steps, "
          f"DPM++ 2M Karras, CFG 7, compile mode {args.compile_mode}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sdlab-gpu-") as tmp:
        folder = Path(args.work or tmp)
        if not (folder / "model.safetensors").is_file():
            build_checkpoint(folder, CONFIGS["tiny" if args.tiny else "sd15"])
        rows, first_images = measure(args, folder, device)
    print(table(rows))
    if len(first_images) == 2:
        print(f"\nPSNR sdlab vs diffusers, first image, eager: {psnr(first_images['sdlab'], first_images['diffusers']):.1f} dB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
