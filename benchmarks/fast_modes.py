"""The opt-in fast modes (`--fast`, sdlab/fast/): what each gains in speed and costs in quality.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/fast_modes.py [--captions 40] [--size 64]
    PYTHONPATH=src .venv/bin/python benchmarks/fast_modes.py --sd15 [--sd15-size 256] [--sd15-steps 20]

Bundled model (default): the `sdlab eval shapes` captions (sdlab.shapes.evaluation.evaluate, no
paraphrases, one seed) generated exactly and with each fast mode; per mode the seconds per image, the
speed-up, the pass rates (all attributes right) per caption group and overall with the change in points,
and the mean PSNR of each image to its exact twin. One process, the exact run first after a warm-up.

--sd15: the SD 1.5 architecture with random weights (every weight random, so no zero-initialised layer
hides a mode's effect), one prompt, DPM++ 2M, CFG 7: seconds per sampling step of sdlab exact and of each
mode (the mean step gap, the first step left out), diffusers' UNet2DConditionModel fp32 per CFG step on the
same weights, the ratios, and the PSNR of each mode's final latents and decoded image to the exact ones.
Random weights draw no picture, so PSNR here says how far a mode moves the numbers, not what it looks like.
Every figure is printed beside the CPU (sdlab.devices.cpu_description).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch

BUNDLED_MODES = ("deepcache:2", "deepcache:3", "deepcache:3:0", "deepcache:3:1:0.4", "deepcache:4:1:0.25",
                 "cfg-trunc:0.8", "cfg-trunc:0.6", "tome:0.5",
                 "deepcache:3,cfg-trunc:0.8", "deepcache:3:0,cfg-trunc:0.6,tome:0.5")
SD15_MODES = ("deepcache:2", "deepcache:3", "deepcache:5", "deepcache:3:1:0.4", "deepcache:4:1:0.25", "cfg-trunc:0.8",
              "tome:0.5",
              "deepcache:3,cfg-trunc:0.8", "deepcache:3,cfg-trunc:0.8,tome:0.5", "deepcache:5,cfg-trunc:0.6,tome:0.5")
PROMPT = "a photograph of an astronaut riding a horse"


class WithFast:
    """A pipeline whose txt2img runs with the fast modes `fast`: evaluate() takes it as the pipeline."""

    def __init__(self, pipe, fast):
        self.pipe, self.fast = pipe, fast

    def txt2img(self, *args, **settings):
        return self.pipe.txt2img(*args, fast=self.fast, **settings)


def psnr(image: np.ndarray, reference: np.ndarray, peak: float) -> float:
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def best_seconds(run, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times[1:])


@torch.no_grad()
def call_costs(pipe, size: int, batch: int) -> str:
    """One UNet call of a CFG batch (2 * batch) at `size` px, whole vs DeepCache's shallow branch (depth 1
    and 0) vs ToMe 0.5, best of 5: the per-call costs behind the speed-ups, steadier than a whole run's
    wall time on a shared machine."""
    from sdlab.fast.tome import token_merging
    from sdlab.models.unet import DeepFeatures

    unet, side = pipe.unet, size // pipe.latent_factor
    x, t = torch.randn(2 * batch, pipe.config.latent_channels, side, side), torch.full((2 * batch,), 500.0)
    context = torch.randn(2 * batch, 77, pipe.config.unet.context_dim)
    whole = best_seconds(lambda: unet(x, t, context))
    costs = [f"whole {whole * 1000:.0f} ms"]
    for depth in (1, 0):
        cache = DeepFeatures(depth)
        unet(x, t, context, deep_cache=cache)
        costs.append(f"shallow depth {depth} {best_seconds(lambda: unet(x, t, context, deep_cache=cache)) / whole:.2f}")
    with token_merging(unet, 0.5, (side, side)):
        costs.append(f"tome:0.5 {best_seconds(lambda: unet(x, t, context)) / whole:.2f}")
    return f"one UNet call, batch {2 * batch} at {size} px: " + ", ".join(costs) + " (of whole)"


def bundled_report(args) -> None:
    import sdlab
    from sdlab.shapes.evaluation import GROUPS, evaluate, table

    pipe = sdlab.load(None)
    run = dict(steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler, batch_size=args.batch,
               with_paraphrases=False, width=args.size, height=args.size)
    pipe.txt2img("a red circle", steps=2, width=args.size, height=args.size)  # warm-up
    rows, exact = [], None
    for fast in (None, *args.modes):
        started = time.perf_counter()
        judged = evaluate(WithFast(pipe, fast), args.captions, args.seed, **run)
        seconds = (time.perf_counter() - started) / len(judged)
        rates = table(judged)
        overall = sum(j.result["all"] for j in judged) / len(judged)
        images = [np.asarray(j.image.convert("RGB")) for j in judged]
        if exact is None:
            exact = (seconds, overall, images)
        close = np.mean([min(psnr(a, b, 255.0), 99.0) for a, b in zip(images, exact[2])])
        rows.append((fast or "exact", seconds, exact[0] / seconds, overall, overall - exact[1],
                     {g: rates[g]["all"] for g in GROUPS if g in rates}, close))
        print(f"{rows[-1][0]}: {seconds:.3f} s/image, all-right {overall * 100:.1f}%", flush=True)

    groups = [g for g in GROUPS if g in rows[0][5]]
    counts = {g: sum(j.group == g for j in judged) for g in groups}
    print(call_costs(pipe, args.size, args.batch))
    print(f"\nBundled model, {len(judged)} `eval shapes` captions ({', '.join(f'{counts[g]} {g}' for g in groups)}), "
          f"{args.size} px, {args.steps} steps {args.sampler}, CFG {args.cfg}, seed {args.seed}, batch {args.batch}")
    print("| mode | s/image | speed-up | all right | change | " + " | ".join(groups) + " | PSNR to exact |")
    print("|---" * (6 + len(groups)) + "|")
    for mode, seconds, speedup, overall, change, by_group, close in rows:
        cells = " | ".join(f"{by_group[g] * 100:.1f}%" for g in groups)
        print(f"| {mode} | {seconds:.3f} | {speedup:.2f}x | {overall * 100:.1f}% | {change * 100:+.1f} | {cells} | "
              f"{'exact' if mode == 'exact' else f'{close:.1f} dB'} |")


def random_sd15(channels: int):
    """The SD 1.5 pipeline with random weights (model_channels `channels`: 320 is SD 1.5, less is a smoke test).
    Layers ldm starts at zero get PyTorch's default initialisation like every other, so each block acts."""
    from sdlab.config import SD1
    from sdlab.models import build_text_encoder, build_unet, build_vae
    from sdlab.pipelines.api import StableDiffusion

    config = dataclasses.replace(SD1, unet=dataclasses.replace(SD1.unet, model_channels=channels))
    torch.manual_seed(0)
    unet, vae, text = build_unet(config.unet), build_vae(config.vae), build_text_encoder(config.text)
    for network in (unet, vae):
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
                module.reset_parameters()
    return StableDiffusion(config, unet.eval(), vae.eval(), text.eval(), model_name="sd15-random")


def diffusers_step_seconds(pipe, size: int, repeats: int = 2) -> float:
    """diffusers' UNet2DConditionModel on the same weights: seconds per CFG step (batch 2), best of `repeats`."""
    from diffusers import UNet2DConditionModel

    from sdlab.checkpoint import convert

    state = convert.join_original(pipe.config, pipe.unet.state_dict(), pipe.vae.state_dict(),
                                  pipe.text_encoder.state_dict())
    unet = UNet2DConditionModel.from_config(convert.diffusers_configs(pipe.config)["unet/config.json"])
    unet.load_state_dict(convert.original_to_diffusers(state, pipe.config)["unet"], strict=True)
    unet.eval()
    latents = torch.randn(2, 4, size // 8, size // 8)
    context = torch.randn(2, 77, pipe.config.unet.context_dim)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first is a warm-up
            started = time.perf_counter()
            unet(latents, torch.tensor([500, 500]), encoder_hidden_states=context)
            times.append(time.perf_counter() - started)
    return min(times[1:])


def sd15_report(args) -> None:
    pipe = random_sd15(args.sd15_channels)
    diffusers_s = diffusers_step_seconds(pipe, args.sd15_size)
    settings = dict(steps=args.sd15_steps, guidance_scale=7.0, seed=0, sampler="DPM++ 2M", width=args.sd15_size,
                    height=args.sd15_size)
    pipe.txt2img(PROMPT, **{**settings, "steps": 2})  # warm-up
    rows, exact = [], None
    for fast in (None, *args.sd15_modes):
        marks = []
        result = pipe.txt2img(PROMPT, fast=fast, callback=lambda info: marks.append(time.perf_counter()), **settings)
        step_s = (marks[-1] - marks[0]) / (len(marks) - 1)
        latents, image = result.latents.float().numpy(), np.asarray(result.images[0].convert("RGB"))
        if exact is None:
            exact = (step_s, latents, image)
        peak = float(exact[1].max() - exact[1].min())
        rows.append((fast or "exact", step_s, exact[0] / step_s, diffusers_s / step_s,
                     psnr(latents, exact[1], peak), psnr(image, exact[2], 255.0)))
        print(f"{rows[-1][0]}: {step_s:.2f} s/step", flush=True)
    print(call_costs(pipe, args.sd15_size, 1))
    print(f"\nSD 1.5 architecture (model_channels {args.sd15_channels}), random weights, {args.sd15_size} px, "
          f"{args.sd15_steps} steps DPM++ 2M, CFG 7; diffusers fp32 UNet: {diffusers_s:.2f} s per CFG step")
    print("| mode | s/step | vs sdlab exact | vs diffusers fp32 | PSNR latents | PSNR image |")
    print("|---|---|---|---|---|---|")
    for mode, step_s, speedup, vs_diffusers, latent_psnr, image_psnr in rows:
        quality = "exact | exact" if mode == "exact" else f"{latent_psnr:.1f} dB | {image_psnr:.1f} dB"
        print(f"| {mode} | {step_s:.2f} | {speedup:.2f}x | {vs_diffusers:.2f}x | {quality} |")


def main() -> None:
    from sdlab.config import DEFAULT_SAMPLER
    from sdlab.devices import cpu_description

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=40, help="`eval shapes` captions (bundled model)")
    parser.add_argument("--size", type=int, default=64, help="image side in px (bundled model)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0, help="`sdlab eval shapes`' default")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--modes", type=lambda text: text.split(";"), default=list(BUNDLED_MODES),
                        help="fast specs separated by ';' (bundled model)")
    parser.add_argument("--sd15", action="store_true", help="the SD 1.5-size part instead (minutes per mode)")
    parser.add_argument("--sd15-size", type=int, default=256)
    parser.add_argument("--sd15-steps", type=int, default=20)
    parser.add_argument("--sd15-channels", type=int, default=320, help="UNet width; 320 is SD 1.5 (less: smoke test)")
    parser.add_argument("--sd15-modes", type=lambda text: text.split(";"), default=list(SD15_MODES))
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.sd15:
        sd15_report(args)
    else:
        bundled_report(args)


if __name__ == "__main__":
    main()
