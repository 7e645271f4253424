"""The bundled shapes model's speed: sdlab vs diffusers on the same weights, and the whole CLI command.

    .venv/bin/python benchmarks/bench_bundled.py [--steps 20] [--repeats 5]

One 64x64 image, 20 steps DPM++ 2M, CFG 5, batch 1, fp32: the median of `repeats` runs after a
warm-up, in this process for both libraries (diffusers gets the same tensors through sdlab's
conversion to its layout and configs). Then `sdlab generate` as a user runs it, a fresh process each
time (Python start-up, imports, model load, sampling, PNG write): the median wall-clock time.
Targets (issue #5): one image <= 1 s, the whole command <= 5 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_weights import write_tokenizer  # noqa: E402

PROMPT = "a large red circle on the left"


def diffusers_twin(pipe, folder: Path):
    """diffusers' StableDiffusionPipeline holding the bundled model's tensors."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdlab.checkpoint import convert

    config = pipe.config
    state = convert.join_original(config, pipe.unet.state_dict(), pipe.vae.state_dict(),
                                  pipe.text_encoder.state_dict())
    parts = convert.original_to_diffusers(state, config)
    configs = convert.diffusers_configs(config)
    unet = UNet2DConditionModel.from_config(configs["unet/config.json"])
    unet.load_state_dict(parts["unet"], strict=True)
    vae = AutoencoderKL.from_config(configs["vae/config.json"])
    vae.load_state_dict(parts["vae"], strict=True)
    text_config = {k: v for k, v in configs["text_encoder/config.json"].items() if k != "architectures"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder.load_state_dict(parts["text_encoder"], strict=False)
    write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    scheduler = DPMSolverMultistepScheduler.from_config(configs["scheduler/scheduler_config.json"])
    twin = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    twin.set_progress_bar_config(disable=True)
    return twin


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import sdlab
    from sdlab.devices import cpu_description

    print(f"CPU: {cpu_description()}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    print(f"work: bundled sdlab-shapes, 64x64, {args.steps} steps DPM++ 2M, CFG 5, batch 1, fp32")
    pipe = sdlab.load()
    with tempfile.TemporaryDirectory(prefix="sdlab-bench-") as tmp:
        twin = diffusers_twin(pipe, Path(tmp))
        ours = median_seconds(lambda: pipe.txt2img(PROMPT, steps=args.steps, guidance_scale=5.0, seed=0,
                                                   sampler="DPM++ 2M"), args.repeats)
        theirs = median_seconds(lambda: twin(PROMPT, num_inference_steps=args.steps, guidance_scale=5.0, height=64,
                                             width=64, generator=torch.Generator().manual_seed(0)), args.repeats)
        print(f"one image: sdlab {ours:.3f} s, diffusers {theirs:.3f} s, ratio sdlab/diffusers {ours / theirs:.3f}")

        command = [sys.executable, "-m", "sdlab", "generate", PROMPT, "-o", str(Path(tmp) / "out.png"),
                   "--seed", "0", "--quiet"]
        walls = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            walls.append(time.perf_counter() - started)
        print(f"`sdlab generate` (new process, defaults: Euler a, CFG 7, 20 steps): median {statistics.median(walls):.2f} s, "
              f"min {min(walls):.2f} s")


if __name__ == "__main__":
    main()
