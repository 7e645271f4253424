"""The noise schedule as a picture, drawn with Pillow: a_t (abar_t), sigma_t and the log-SNR of the
model's DDPM schedule over its timesteps, and the noise levels a few samplers and schedule types visit.

a_t = prod (1 - beta_s) is the signal fraction left at timestep t; sigma_t = sqrt((1 - a_t) / a_t) is
the same noise level in the samplers' variance-exploding view (schedules.py); log-SNR = log(a_t / (1 -
a_t)) = -2 log sigma_t (Kingma et al. 2021, "Variational Diffusion Models").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from ..config import ScheduleConfig
from ..samplers import resolve_sampler, sampler_and_schedule_names, sampler_sigmas
from ..schedules import alphas_cumprod, discrete_sigmas, sigma_to_t
from .sheets import font, text_width

# (sampler, schedule type): what the fourth panel compares
SAMPLER_SCHEDULES = (("Euler", None), ("DPM++ 2M", None), ("DDIM", None), ("Euler", "karras"),
                     ("Euler", "exponential"), ("Euler", "sgm-uniform"))
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PANEL = (520, 330)  # px per panel
MARGIN = (70, 40, 20, 50)  # left, top, right, bottom inside a panel: tick labels and titles
GRID = (225, 225, 225)
INK = (20, 20, 20)


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    colour: tuple[int, int, int]
    markers: bool = False


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About `count` round numbers (1, 2, 5 times a power of ten apart) covering [low, high]."""
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def tick_text(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}"


def draw_panel(sheet: Image.Image, origin: tuple[int, int], title: str, x_label: str, y_label: str,
               series: list[Series], x_range: tuple[float, float], y_range: tuple[float, float],
               log_y: bool = False, legend: str = "") -> None:
    """One line chart with axes, ticks, grid lines, labels and a legend in the corner `legend` names
    ("top right", "bottom left"; "" for none), at `origin`."""
    draw = ImageDraw.Draw(sheet)
    left, top = origin[0] + MARGIN[0], origin[1] + MARGIN[1]
    right, bottom = origin[0] + PANEL[0] - MARGIN[2], origin[1] + PANEL[1] - MARGIN[3]
    y_low, y_high = (math.log10(v) for v in y_range) if log_y else y_range

    def x_px(x):
        return left + (x - x_range[0]) / (x_range[1] - x_range[0]) * (right - left)

    def y_px(y):
        value = math.log10(y) if log_y else y
        return bottom - (value - y_low) / (y_high - y_low) * (bottom - top)

    for x in nice_ticks(*x_range):
        draw.line([(x_px(x), top), (x_px(x), bottom)], fill=GRID)
        draw.line([(x_px(x), bottom), (x_px(x), bottom + 4)], fill=INK)
        draw.text((x_px(x), bottom + 6), tick_text(x), fill=INK, font=font(12), anchor="mt")
    y_ticks = ([10.0**p for p in range(math.ceil(y_low - 1e-9), math.floor(y_high + 1e-9) + 1)] if log_y
               else nice_ticks(*y_range))
    for y in y_ticks:
        draw.line([(left, y_px(y)), (right, y_px(y))], fill=GRID)
        draw.line([(left - 4, y_px(y)), (left, y_px(y))], fill=INK)
        draw.text((left - 6, y_px(y)), tick_text(y), fill=INK, font=font(12), anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) / 2, origin[1] + 10), title, fill=INK, font=font(15), anchor="mt")
    draw.text(((left + right) / 2, bottom + 24), x_label, fill=INK, font=font(13), anchor="mt")
    label = Image.new("RGB", (text_width(y_label, 13) + 4, 18), (255, 255, 255))
    ImageDraw.Draw(label).text((2, 1), y_label, fill=INK, font=font(13))
    label = label.rotate(90, expand=True)
    sheet.paste(label, (origin[0] + 4, int((top + bottom - label.height) / 2)))

    for line in series:
        points = [(x_px(x), y_px(y)) for x, y in zip(line.xs, line.ys) if not (log_y and y <= 0)]
        draw.line(points, fill=line.colour, width=2)
        if line.markers:
            for px, py in points:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=line.colour)
    if legend:
        width = max(text_width(line.label, 12) for line in series) + 34
        box_left = right - width - 8 if "right" in legend else left + 4
        box_top = top + 4 if "top" in legend else bottom - 8 - 17 * len(series)
        draw.rectangle([box_left, box_top, box_left + width + 4, box_top + 4 + 17 * len(series)],
                       fill=(255, 255, 255), outline=GRID)
        y = box_top + 4
        for line in series:
            draw.line([(box_left + 6, y + 7), (box_left + 26, y + 7)], fill=line.colour, width=3)
            draw.text((box_left + 32, y), line.label, fill=INK, font=font(12))
            y += 17


def schedule_plot(schedule: ScheduleConfig, steps: int = 20, samplers=SAMPLER_SCHEDULES) -> Image.Image:
    """Four panels: a_t and 1 - a_t, sigma_t (log axis), log-SNR over t, and the sigmas each of
    `samplers` ((sampler, schedule type) pairs) walks in `steps` steps, with the timesteps they mean."""
    a = alphas_cumprod(schedule).double()
    sigmas = discrete_sigmas(schedule).double()
    t = list(range(len(a)))
    last = len(a) - 1
    log_snr = (a / (1 - a)).log()
    sheet = Image.new("RGB", (2 * PANEL[0], 2 * PANEL[1] + 30), (255, 255, 255))
    ImageDraw.Draw(sheet).text((10, 8), f"Noise schedule: {len(a)} timesteps, scaled-linear betas "
                               f"{schedule.beta_start:g} to {schedule.beta_end:g}", fill=INK, font=font(16))
    blue, orange = COLOURS[0], COLOURS[1]
    draw_panel(sheet, (0, 30), "signal and noise fractions", "timestep t", "fraction",
               [Series("abar_t (signal)", t, a.tolist(), blue), Series("1 - abar_t (noise)", t, (1 - a).tolist(), orange)],
               (0, last), (0, 1), legend="top right")
    draw_panel(sheet, (PANEL[0], 30), "sigma_t = sqrt((1 - abar_t) / abar_t)", "timestep t", "sigma (log)",
               [Series("sigma_t", t, sigmas.tolist(), blue)], (0, last),
               (10 ** math.floor(math.log10(sigmas[0])), 10 ** math.ceil(math.log10(sigmas[-1]))), log_y=True)
    draw_panel(sheet, (0, 30 + PANEL[1]), "log-SNR = log(abar_t / (1 - abar_t))", "timestep t", "log-SNR",
               [Series("log-SNR", t, log_snr.tolist(), blue)], (0, last),
               (math.floor(log_snr.min()), math.ceil(log_snr.max())))
    lines = []
    for (sampler, schedule_type), colour in zip(samplers, COLOURS):
        walked = sampler_sigmas(sampler, schedule, steps, schedule_type=schedule_type).double()
        name, label = sampler_and_schedule_names(resolve_sampler(sampler), schedule_type)
        timesteps = sigma_to_t(walked[walked > 0].float(), schedule).round().int().tolist()
        lines.append(Series(f"{name}, {label}: t {timesteps[0]} .. {timesteps[-1]}", range(len(walked)),
                            walked.tolist(), colour, markers=True))
    draw_panel(sheet, (PANEL[0], 30 + PANEL[1]), f"the sigmas samplers walk in {steps} steps", "step",
               "sigma (log)", lines, (0, steps), (10 ** math.floor(math.log10(sigmas[0])),
                                                 10 ** math.ceil(math.log10(sigmas[-1]))), log_y=True, legend="bottom left")
    return sheet
