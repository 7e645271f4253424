"""One measured run of one library, in a fresh process: what suite.py starts, one after another.

    python benchmarks/workers.py sdlab|diffusers|openvino --folder DIR --size 256 --steps 20 --dtype fp32 \
        --png out.png [-- sdlab's extra command-line options]

Each makes one image from the random-weight model in DIR (random_weights.py) and writes it as a PNG,
then prints one JSON line: load_s (reading the weights until sampling starts), first_step_s (text
encoding, the first step and any one-time work such as compiling), step_s (the mean of the other
steps), rss_mb (the process's peak resident memory, VmHWM). suite.py times the whole process, start to
exit, as the command-to-PNG figure.

sdlab runs as its user does, `sdlab generate` with the given options, here inside this process so that
its step times can be read: the CLI's progress bar draws once when sampling starts (0/N) and after each
step, so while the command runs stderr is a stand-in that notes the time of each draw. Any option the
command takes (`--compile`, `--fast deepcache:3`, `--dtype bf16`, ...) can be added after `--`.

    python benchmarks/workers.py profile --folder DIR --size 256 --dtype fp32     # profile_step.py's table
    python benchmarks/workers.py convert --folder DIR                           # the OpenVINO IR files
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
GUIDANCE_SCALE = 7.0
SEED = 0
SAMPLER = "DPM++ 2M Karras"  # diffusers: DPMSolverMultistepScheduler, Karras sigmas (random_weights.py)


def peak_rss_mb() -> float:
    """The process's own peak resident memory (VmHWM; ru_maxrss can carry a forking parent's peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def step_times(marks: list[float]) -> tuple[float, float]:
    """Times at sampling start and after each step -> (first step s, mean s of the later steps).
    With one step only the first is known, and stands for both."""
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    later = gaps[1:] or gaps
    return gaps[0], sum(later) / len(later)


class StepClock:
    """Stands in for stderr while `sdlab generate` runs: notes when loading starts ('loading NAME ...')
    and when the progress bar shows each count; passes every other line on to the real stderr."""

    PROGRESS = re.compile(r"(\d+)/(\d+) \|")

    def __init__(self, stream):
        self.stream = stream
        self.loading_at = None
        self.count_at: dict[int, float] = {}

    def isatty(self) -> bool:
        return True  # the bar draws after every step only on a terminal

    def write(self, text: str) -> int:
        now = time.perf_counter()
        match = self.PROGRESS.search(text)
        if match:
            self.count_at.setdefault(int(match.group(1)), now)
        elif text.startswith("loading "):
            self.loading_at = now
        elif text.strip():
            self.stream.write(text if text.endswith("\n") else text + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def run_sdlab(args) -> dict:
    import sdlab.checkpoint.load  # noqa: F401  imports before the load clock, as for the other libraries
    import sdlab.pipelines.txt2img  # noqa: F401
    from sdlab.cli import main

    command = ["generate", PROMPT, "--negative", NEGATIVE, "--model", str(Path(args.folder) / "model.safetensors"),
               "--steps", str(args.steps), "--cfg", str(GUIDANCE_SCALE), "--seed", str(SEED),
               "--size", f"{args.size}x{args.size}", "--sampler", SAMPLER, "--noise", "diffusers",
               "--device", "cpu", "--dtype", args.dtype, "--output", args.png, *args.extra]
    clock = StepClock(sys.stderr)
    sys.stderr = clock
    try:
        code = main(command)
    finally:
        sys.stderr = clock.stream
    if code != 0:
        raise SystemExit(f"sdlab {' '.join(command)} exited with {code}")
    if len(clock.count_at) < 2:
        raise SystemExit("sdlab generate drew no progress bar, so its steps cannot be timed; leave out --quiet")
    marks = [clock.count_at[count] for count in sorted(clock.count_at)]
    first, later = step_times(marks)
    return {"load_s": marks[0] - clock.loading_at, "first_step_s": first, "step_s": later}


def import_reference_libraries() -> None:
    """diffusers and transformers import most modules on first use: import those loading uses before the
    load clock starts, as sdlab's are (on a busy 2-core VM these imports alone can take 30 s)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import single_file_utils  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def run_diffusers(args) -> dict:
    import torch

    from floor import DTYPES
    from random_weights import load_diffusers

    import_reference_libraries()
    started = time.perf_counter()
    pipe = load_diffusers(Path(args.folder), DTYPES[args.dtype])
    marks = [time.perf_counter()]
    load_s = marks[0] - started

    def on_step(pipeline, step, timestep, kwargs):
        marks.append(time.perf_counter())
        return kwargs

    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=GUIDANCE_SCALE,
                 height=args.size, width=args.size, generator=torch.Generator("cpu").manual_seed(SEED),
                 callback_on_step_end=on_step).images[0]
    image.save(args.png)
    first, later = step_times(marks)
    return {"load_s": load_s, "first_step_s": first, "step_s": later}


def run_openvino(args) -> dict:
    import openvino  # noqa: F401  imported before the load clock, as the other libraries are
    from PIL import Image

    from openvino_peer import OpenVINOModels

    import_reference_libraries()
    started = time.perf_counter()
    models = OpenVINOModels(Path(args.folder), args.size, precision={"fp32": "f32", "bf16": "bf16"}[args.dtype])
    marks = [time.perf_counter()]
    load_s = marks[0] - started
    pixels = models.txt2img(PROMPT, NEGATIVE, args.steps, GUIDANCE_SCALE, SEED,
                            callback=lambda index: marks.append(time.perf_counter()))
    Image.fromarray(pixels).save(args.png)
    first, later = step_times(marks)
    return {"load_s": load_s, "first_step_s": first, "step_s": later}


def run_profile(args) -> dict:
    from profile_step import profile_libraries

    return profile_libraries(Path(args.folder), args.size, args.dtype)


def run_convert(args) -> dict:
    from openvino_peer import convert

    return convert(Path(args.folder))


TIMED = ("sdlab", "diffusers", "openvino")
RUNNERS = {"sdlab": run_sdlab, "diffusers": run_diffusers, "openvino": run_openvino, "profile": run_profile,
           "convert": run_convert}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("library", choices=RUNNERS)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    args.extra = extra
    result = RUNNERS[args.library](args)
    if args.library in TIMED:
        result["rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
