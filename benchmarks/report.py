"""The suite's results as a markdown block (for benchmarks/README.md) and a bar chart, from one dict.

The dict is what suite.py writes as results.json: `machine` (CPU, flags, versions, date, load average),
`work` (model, sizes, steps, sampler), `floor` (matmul rates, FLOPs per step and size), `runs` (one
entry per size and run: the measured figures), `profile` (per size, per library: seconds per op group)
and `openvino_check` (the conversion's largest relative differences). Re-render a saved file with
`python benchmarks/report.py results.json`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdlab.inside import sheets

from floor import CATEGORIES


def psnr(ours, theirs) -> float:
    """dB between two 8-bit images (PIL images or arrays); infinite when they are equal."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    mse = ((ours - theirs) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def floor_seconds(data: dict, size: int, dtype: str) -> float:
    """The step's FLOPs at this machine's matmul rate in `dtype`; NaN where the rate was not measured."""
    rate = data["floor"]["rates"].get(dtype)
    return data["floor"]["flops"][str(size)]["total"] / rate if rate else math.nan


def is_peer(run: dict) -> bool:
    return run["library"] != "sdlab"


def _row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _table(header: list[str], rows: list[list], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return [_row(header), _row(align), *map(_row, rows)]


def _f(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(data: dict) -> str:
    machine, work = data["machine"], data["work"]
    lines = [
        f"### {machine['date']} — {machine['cpu']}",
        "",
        f"- CPU flags: {machine['flags'] or 'none of the vector extensions looked for'}; {machine['platform']}",
        f"- torch {machine['torch']}, diffusers {machine['diffusers']}, openvino {machine['openvino']}, "
        f"Python {machine['python']}; load average {machine['load_before']} before, {machine['load_after']} after",
        f"- work: {work['model']} architecture, random weights, {work['sampler']}, {work['steps']} steps, "
        f"CFG {work['guidance_scale']}, batch 1, seed {work['seed']}; each run a fresh process, runs alternating, "
        f"each figure the best of {work['repeats']}",
        "- matmul floor: " + ", ".join(f"{dtype} {rate / 1e9:.0f} GFLOP/s" for dtype, rate in data["floor"]["rates"].items())
        + f" ({work['matmul_side']}² matmul); UNet step with CFG: "
        + ", ".join(f"{size} px {flops['total'] / 1e9:.4g} GFLOP" for size, flops in data["floor"]["flops"].items()),
    ]
    if data.get("openvino_check"):
        lines.append("- OpenVINO conversion, largest difference to PyTorch relative to the output's largest value: "
                     + ", ".join(f"{part} {value:.1e}" for part, value in data["openvino_check"].items()))
    for size in work["sizes"]:
        runs = [run for run in data["runs"] if run["size"] == size]
        reference = work.get("reference", "")
        lines += ["", f"#### {size}×{size} px", ""]
        lines += _table(
            ["run", "dtype", "s/step", "× floor", "first step s", "command to PNG s", "load s", "peak RSS MB",
             f"PSNR vs {reference} dB"],
            [[run["name"], run["dtype"], _f(run["step_s"]), _f(run["step_s"] / floor_seconds(data, size, run["dtype"]), 2),
              _f(run["first_step_s"], 2), _f(run["command_s"], 1), _f(run["load_s"], 2), _f(run["rss_mb"], 0),
              "same" if run["psnr"] == math.inf else _f(run["psnr"], 1)] for run in runs], right_from=2)
        ours, peers = [r for r in runs if not is_peer(r)], [r for r in runs if is_peer(r)]
        if ours and peers:
            lines += ["", "Speed-up of sdlab: the peer's time / sdlab's (above 1: sdlab faster); load and peak RSS "
                      "as sdlab / peer (below 1: sdlab better).", ""]
            lines += _table(["sdlab run", "peer", "s/step", "command to PNG", "load", "peak RSS"],
                            [[mine["name"], peer["name"], _f(peer["step_s"] / mine["step_s"], 2),
                              _f(peer["command_s"] / mine["command_s"], 2), _f(mine["load_s"] / peer["load_s"], 2),
                              _f(mine["rss_mb"] / peer["rss_mb"], 2)] for mine in ours for peer in peers], right_from=2)
        if str(size) in data.get("profile", {}):
            lines += ["", *profile_table(data, size)]
    return "\n".join(lines) + "\n"


def profile_table(data: dict, size: int) -> list[str]:
    """Per op group: each library's time (the ops' own time) and share, the group's FLOPs and the rate
    sdlab reaches on them."""
    profiles, flops = data["profile"][str(size)], data["floor"]["flops"][str(size)]
    libraries = list(profiles)
    header = ["op group", *[f"{library} ms ({profiles[library]['dtype']})" for library in libraries],
              *[f"{library} %" for library in libraries], "GFLOP", f"{libraries[0]} GFLOP/s"]
    rows = []
    for group in (*CATEGORIES, "total"):
        seconds = [profiles[library][group] for library in libraries]
        share = [100 * s / profiles[library]["total"] for s, library in zip(seconds, libraries)]
        gflop = flops.get(group, 0.0) / 1e9
        rows.append([group, *[_f(1000 * s, 0) for s in seconds], *[_f(p, 1) for p in share], _f(gflop, 1),
                     _f(gflop / seconds[0], 1) if gflop else "–"])
    walls = ", ".join(f"{library} {profiles[library]['wall']:.3f} s" for library in libraries)
    return [f"Profile of one UNet step (CFG batch 2), {size} px, torch.profiler, the ops' own time; the "
            f"step unprofiled (best of 3, the UNets taking turns in one process): {walls}. sdlab's 3x3 "
            "convolutions over at most 64 positions run as matrix products (models/conv.py), which the "
            "profiler counts under linear.", "", *_table(header, rows)]


BAR_COLOURS = {"sdlab": (31, 119, 180), "diffusers": (255, 127, 14), "openvino": (44, 160, 44)}


def plot(data: dict) -> Image.Image:
    """One panel per size: seconds per UNet step of every run as bars, the matmul floors as lines."""
    font = sheets.font(12)  # at Pillow's default 10 px some spaces render zero-width
    sizes = data["work"]["sizes"]
    label_w, bar_w, bar_h, pad = 220, 520, 22, 12
    panels = []
    for size in sizes:
        runs = [run for run in data["runs"] if run["size"] == size]
        floors = {dtype: floor_seconds(data, size, dtype) for dtype in data["floor"]["rates"]}
        top = max([run["step_s"] for run in runs] + [f for f in floors.values() if not math.isnan(f)])
        height = 2 * pad + 24 + len(runs) * (bar_h + 6) + 20
        panel = Image.new("RGB", (label_w + bar_w + 2 * pad + 60, height), "white")
        draw = ImageDraw.Draw(panel)
        draw.text((pad, pad), f"{size}x{size} px: seconds per UNet step (CFG), {data['work']['steps']} steps",
                  fill="black", font=font)
        scale = bar_w / top
        y = pad + 24
        for run in runs:
            draw.text((pad, y + 5), f"{run['name']} ({run['dtype']})", fill="black", font=font)
            length = max(1, int(run["step_s"] * scale))
            draw.rectangle([label_w, y, label_w + length, y + bar_h], fill=BAR_COLOURS.get(run["library"], "grey"))
            draw.text((label_w + length + 4, y + 5), f"{run['step_s']:.3f}", fill="black", font=font)
            y += bar_h + 6
        for dtype, seconds in floors.items():
            if not math.isnan(seconds):
                x = label_w + int(seconds * scale)
                draw.line([x, pad + 20, x, y], fill=(214, 39, 40), width=2)
                draw.text((x + 3, y + 2), f"{dtype} floor {seconds:.3f}", fill=(214, 39, 40), font=font)
        panels.append(panel)
    sheet = Image.new("RGB", (max(p.width for p in panels), 24 + sum(p.height for p in panels)), "white")
    machine = data["machine"]
    ImageDraw.Draw(sheet).text((pad, 8), f"{machine['cpu']}; torch {machine['torch']}; {machine['date']}",
                               fill="black", font=font)
    y = 24
    for panel in panels:
        sheet.paste(panel, (0, y))
        y += panel.height
    return sheet


def write(folder: Path, data: dict) -> str:
    """results.json, results.md and results.png in `folder`; -> the markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data, indent=2))
    text = markdown(data)
    (folder / "results.md").write_text(text)
    plot(data).save(folder / "results.png")
    return text


if __name__ == "__main__":
    path = Path(sys.argv[1])
    print(write(path.parent, json.loads(path.read_text())))
