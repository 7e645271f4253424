"""One UNet training step, sdlab against diffusers on the same weights: forward, ε-prediction MSE,
backward and an AdamW update, what `sdlab train unet` repeats.

    .venv/bin/python benchmarks/bench_train.py                       # the bundled model's UNet, batch 16
    .venv/bin/python benchmarks/bench_train.py --model sd1 --batch 1 --latent 32 --repeats 3

The UNets get identical tensors (sdlab's conversion to diffusers' layout and config); both run in this
process, alternating, and each reports the median of `repeats` steps after a warm-up step, plus the
bytes of its weights, gradients and AdamW state. Text embeddings and latents are random: the step's
cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RECIPE = Path(__file__).parents[1] / "recipes" / "shapes-model.toml"


def diffusers_unet(config, unet):
    from diffusers import UNet2DConditionModel

    from sdlab.checkpoint import convert

    twin = UNet2DConditionModel.from_config(convert.diffusers_configs(config)["unet/config.json"])
    twin.load_state_dict(convert.unet_to_diffusers(unet.state_dict(), config.unet), strict=True)
    return twin


def training_step(unet, optimizer, latents, timesteps, context, noise, diffusers: bool) -> None:
    prediction = unet(latents, timesteps, context)
    if diffusers:
        prediction = prediction.sample
    F.mse_loss(prediction, noise).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_bytes(unet, optimizer) -> int:
    """Weights, their gradients (one per weight) and AdamW's two moments."""
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    return 2 * weights + moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(RECIPE), help="a model preset (sd1, sd2-base) or a model TOML/JSON")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--latent", type=int, help="latent side (default: the model's resolution / VAE factor)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from sdlab.devices import cpu_description
    from sdlab.models import build_unet
    from sdlab.training.components import resolve_model_config

    config = resolve_model_config(args.model)
    side = args.latent or config.resolution // config.vae.downsample_factor
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    ours = build_unet(config.unet).train()
    theirs = diffusers_unet(config, ours).train()
    parameters = sum(p.numel() for p in ours.parameters())
    print(f"work: {config.name} UNet ({parameters / 1e6:.2f} M weights), batch {args.batch}, "
          f"{config.unet.in_channels}x{side}x{side} latents, fp32, AdamW")

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, config.unet.in_channels, side, side, generator=generator)
    noise = torch.randn(args.batch, config.unet.out_channels, side, side, generator=generator)
    context = torch.randn(args.batch, 77, config.unet.context_dim, generator=generator)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)
    runs = {}
    for name, unet in (("sdlab", ours), ("diffusers", theirs)):
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
        step = (lambda u=unet, o=optimizer, d=name == "diffusers":
                training_step(u, o, latents, timesteps, context, noise, d))
        step()  # warm-up, and AdamW's state exists from here on
        runs[name] = {"step": step, "times": [], "bytes": state_bytes(unet, optimizer)}
    for _ in range(args.repeats):  # alternating: a shared machine drifts from minute to minute
        for run in runs.values():
            started = time.perf_counter()
            run["step"]()
            run["times"].append(time.perf_counter() - started)

    print("| library | s/step (median) | steps/s | weights + grads + AdamW MB |")
    print("| --- | ---: | ---: | ---: |")
    for name, run in runs.items():
        median = statistics.median(run["times"])
        print(f"| {name} | {median:.3f} | {1 / median:.2f} | {run['bytes'] / 2**20:.0f} |")
    ratio = statistics.median(runs["sdlab"]["times"]) / statistics.median(runs["diffusers"]["times"])
    print(f"ratio sdlab / diffusers, s/step: {ratio:.3f} (below 1: sdlab faster)")


if __name__ == "__main__":
    main()
