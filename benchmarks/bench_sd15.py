"""sdlab vs diffusers on the same work: the SD 1.5 architecture with random weights, on the CPU.

    .venv/bin/python benchmarks/bench_sd15.py [--size 256] [--steps 10] [--dtypes fp32,bf16] [--repeats 2]

Builds SD 1.5 (UNet 860M, VAE 84M, CLIP-L 123M parameters) with random weights, saves it once in the
original single-file layout, then for each library and dtype runs a fresh subprocess that loads the
file (sdlab: `sdlab.load`; diffusers: `StableDiffusionPipeline.from_single_file`, offline with local
configs) and generates one image (Euler, CFG 7). Separate processes make peak RSS and load time
honest; both libraries' modules are imported before the load clock starts. sdlab's end-to-end time
includes the web UI's "Model hash" (SHA-256 of the file, a few seconds for 4 GB, cached afterwards). bf16 runs only on CPUs with native bf16 (AVX512-BF16/AMX): elsewhere torch's bf16 is ~40x
slower. Prints seconds per step, end-to-end seconds, load seconds and peak RSS, with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"


def build_checkpoint(folder: Path) -> Path:
    """SD 1.5 with random weights, saved by sdlab in the original layout, plus diffusers' offline configs."""
    from sdlab.checkpoint import convert
    from sdlab.checkpoint.save import save_single_file
    from sdlab.config import SD1
    from sdlab.models import build_text_encoder, build_unet, build_vae

    path = folder / "sd15-random.safetensors"
    torch.manual_seed(0)
    unet, vae, text = build_unet(SD1.unet), build_vae(SD1.vae), build_text_encoder(SD1.text)
    save_single_file(path, SD1, unet, vae, text)
    del unet, vae, text

    for relative, document in convert.diffusers_configs(SD1).items():
        target = folder / "configs" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(document, indent=2))
    write_tokenizer(folder / "configs" / "tokenizer")
    # v1-inference.yaml's numbers; YAML is a superset of JSON, so JSON text is a valid original config
    original = {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "parameterization": "eps", "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        "unet_config": {"params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
            "use_checkpoint": False, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
    }}}
    (folder / "v1-inference.yaml").write_text(json.dumps(original))
    return path


def write_tokenizer(tokenizer_dir: Path) -> None:
    """sdlab's CLIP vocabulary as the files transformers' CLIPTokenizer reads."""
    from sdlab.tokenizer import NUM_MERGES, VOCAB_PATH, Tokenizer
    import gzip

    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in Tokenizer().vocab.items()}
    with gzip.open(VOCAB_PATH, "rt", encoding="utf-8") as file:
        merges = file.read().split("\n")[1:NUM_MERGES + 1]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77}))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker_sdlab(args) -> dict:
    import sdlab
    import sdlab.checkpoint.load  # noqa: F401  module imports happen before the clock, as for diffusers
    import sdlab.pipelines.txt2img  # noqa: F401

    started = time.perf_counter()
    pipe = sdlab.load(args.file, dtype=args.dtype)
    load_s = time.perf_counter() - started
    marks = []
    started = time.perf_counter()
    pipe.txt2img(PROMPT, NEGATIVE, steps=args.steps, guidance_scale=7.0, seed=0, width=args.size, height=args.size,
                 sampler="Euler", callback=lambda info: marks.append(time.perf_counter()))
    total_s = time.perf_counter() - started
    return {"load_s": load_s, "total_s": total_s, "step_s": _per_step(marks), "rss_mb": peak_rss_mb()}


def worker_diffusers(args) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from diffusers.utils import logging

    logging.set_verbosity_error()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    folder = Path(args.file).parent
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        args.file, config=str(folder / "configs"), original_config=str(folder / "v1-inference.yaml"),
        local_files_only=True, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype)
    load_s = time.perf_counter() - started
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    marks = []

    def on_step(pipeline, step, timestep, kwargs):
        marks.append(time.perf_counter())
        return kwargs

    started = time.perf_counter()
    pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.0, height=args.size,
         width=args.size, generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=on_step)
    total_s = time.perf_counter() - started
    return {"load_s": load_s, "total_s": total_s, "step_s": _per_step(marks), "rss_mb": peak_rss_mb()}


def _per_step(marks: list[float]) -> float:
    """Mean seconds per step, leaving out the first (one-time warm-up costs)."""
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    return sum(gaps) / len(gaps)


def run_worker(library: str, dtype: str, file: Path, size: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", library, "--dtype", dtype, "--file", str(file),
               "--size", str(size), "--steps", str(steps)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{library} {dtype} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="runs per library and dtype, alternating; best kept")
    parser.add_argument("--dtypes", default=None, help="comma list; default fp32, plus bf16 on CPUs with native bf16")
    parser.add_argument("--worker", choices=("sdlab", "diffusers"))
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--file")
    args = parser.parse_args()
    if args.worker:
        result = worker_sdlab(args) if args.worker == "sdlab" else worker_diffusers(args)
        print(json.dumps(result))
        return

    from sdlab.devices import cpu_description, cpu_has_native_bf16

    dtypes = args.dtypes.split(",") if args.dtypes else ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    print(f"CPU: {cpu_description()}; torch {torch.__version__}")
    print(f"work: SD 1.5 architecture, random weights, {args.size}x{args.size}, {args.steps} steps Euler, CFG 7, batch 1")
    with tempfile.TemporaryDirectory(prefix="sdlab-bench-") as tmp:
        file = build_checkpoint(Path(tmp))
        print(f"checkpoint: {file.stat().st_size / 2**30:.2f} GiB fp32 single file\n")
        header = f"{'dtype':<6} {'library':<10} {'s/step':>8} {'end-to-end s':>13} {'load s':>8} {'peak RSS MB':>12}"
        print(header)
        rows = []
        for dtype in dtypes:
            # Alternate the libraries and keep each one's best run: a shared 2-core VM drifts by 10-30%
            # between minutes, which would otherwise favour whoever ran in the quieter minute.
            runs = {"diffusers": [], "sdlab": []}
            for repeat in range(args.repeats):
                order = ("diffusers", "sdlab") if repeat % 2 == 0 else ("sdlab", "diffusers")
                for library in order:
                    runs[library].append(run_worker(library, dtype, file, args.size, args.steps))
            results = {library: {key: min(r[key] for r in rs) for key in rs[0]} for library, rs in runs.items()}
            for library, r in results.items():
                print(f"{dtype:<6} {library:<10} {r['step_s']:>8.3f} {r['total_s']:>13.2f} {r['load_s']:>8.2f} {r['rss_mb']:>12.0f}")
            ours, theirs = results["sdlab"], results["diffusers"]
            rows.append((dtype, {key: ours[key] / theirs[key] for key in ours}))
        print("\nratios sdlab / diffusers (below 1 = sdlab better)")
        for dtype, ratio in rows:
            print(f"{dtype:<6} s/step {ratio['step_s']:.3f}  end-to-end {ratio['total_s']:.3f}  "
                  f"load {ratio['load_s']:.3f}  peak RSS {ratio['rss_mb']:.3f}")


if __name__ == "__main__":
    main()
