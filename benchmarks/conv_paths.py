"""Each 3x3 convolution of the SD 1.5 UNet, as torch's direct convolution, as one matrix product, and on a
weight packed once for oneDNN (`--prepack`, sdlab.models.prepack).

sdlab.models.conv runs a 3x3 convolution as one matrix product (unfold, then GEMM) where its output has
at most GEMM_MAX_POSITIONS positions per image; this measures both ways for every distinct 3x3 stride-1
convolution one UNet step calls (found by running the UNet on the meta device, so nothing is allocated
for the model), with the CFG batch, and prints a table with the CPU it ran on:

    python benchmarks/conv_paths.py --size 256 [--size 512] [--batch 2] [--repeats 3]

Use it to check the threshold on a new CPU: the rows at and under the threshold should favour the product.
The packed column is what `--prepack` runs (the weight packed for that input size, outside the timing).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torch.nn.functional as F

from sdlab.config import SD1
from sdlab.devices import cpu_description
from sdlab.models import build_unet
from sdlab.models.conv import GEMM_MAX_POSITIONS, Conv2d, conv3x3_as_gemm
from sdlab.models.prepack import available as prepack_available, prepacked


def unet_convolutions(latent_side: int, batch: int) -> Counter:
    """(input shape, out channels) -> calls, for the 3x3 stride-1 convolutions of one SD 1.5 UNet call."""
    with torch.device("meta"):
        unet = build_unet(SD1.unet)
    found: Counter = Counter()

    def record(module, inputs, output):
        if module.kernel_size == (3, 3) and module.stride == (1, 1):
            found[(tuple(inputs[0].shape), module.out_channels)] += 1

    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(record)
    with torch.no_grad(), torch.device("meta"):
        unet(torch.zeros(batch, 4, latent_side, latent_side), torch.zeros(batch), torch.zeros(batch, 77, 768))
    return found


def best_time(function, repeats: int) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def measure(size: int, batch: int, repeats: int) -> None:
    print(f"\nSD 1.5 UNet, {size} px, batch {batch}: 3x3 stride-1 convolutions (ms per call, best of {repeats})")
    print("| input | out | calls | direct | product | direct / product | taken | packed | taken / packed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    totals = Counter()
    for (shape, out_channels), calls in sorted(unet_convolutions(size // 8, batch).items(), key=lambda kv: -kv[0][0][2]):
        x = torch.randn(shape)
        weight = torch.randn(out_channels, shape[1], 3, 3) / (9 * shape[1]) ** 0.5
        bias = torch.randn(out_channels)
        direct = best_time(lambda: F.conv2d(x, weight, bias, padding=1), repeats)
        product = best_time(lambda: conv3x3_as_gemm(x, weight, bias), repeats)
        taken = "product" if shape[2] * shape[3] <= GEMM_MAX_POSITIONS else "direct"
        chosen = product if taken == "product" else direct
        packed = packed_time(x, weight, bias, repeats)
        totals["direct"] += calls * direct
        totals["product"] += calls * product
        totals["sdlab"] += calls * chosen
        totals["packed"] += calls * packed
        print(f"| {'x'.join(map(str, shape))} | {out_channels} | {calls} | {direct * 1e3:.1f} | {product * 1e3:.1f} "
              f"| {direct / product:.2f} | {taken} | {packed * 1e3:.1f} | {chosen / packed:.2f} |")
    print(f"per UNet call: all direct {totals['direct']:.3f} s, all product {totals['product']:.3f} s, "
          f"sdlab's choice {totals['sdlab']:.3f} s ({totals['direct'] / totals['sdlab']:.2f}x all direct), "
          f"--prepack {totals['packed']:.3f} s")


def packed_time(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, repeats: int) -> float:
    """Seconds per call of the convolution as `--prepack` runs it (the packing done in the warm-up call)."""
    if not prepack_available():
        return float("nan")
    conv = Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        with prepacked(conv):
            return best_time(lambda: conv(x), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, action="append", help="image side in px (default: 256)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch: 2 is one image with CFG (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per shape after a warm-up (default: 3)")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for size in args.size or [256]:
        measure(size, args.batch, args.repeats)


if __name__ == "__main__":
    main()
