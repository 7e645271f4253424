"""The denoising trajectory: what the latents look like, and what the model predicts the clean image
to be, every few steps of a sampling run (the lectures' frames 0, 5, ... 30).

`Trajectory` is a step callback (samplers/__init__.py: the dict {x, i, sigma, denoised, ...}), the
same callback that drives progress bars and the server's live previews; pass it as `callback=` to any
pipeline. At step i the sampler holds `x = x0 + sigma_i * eps` (Karras et al. 2022, Sec. 2) and the
model's guess `denoised` of x0. Both are decoded with the model's real VAE: the noisy latents as
`x / sqrt(sigma^2 + 1)`, the variance-preserving latents the VAE's scale expects (what diffusers'
pipelines hold and the lectures decode), the prediction as it is. The last frame is the generated image.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from PIL import Image

from ..errors import InputError
from ..outputs import save_image, write_file
from ..pipelines.latents import decode_latents, with_tiled_vae
from .sheets import labelled_grid

ANIMATION_FORMATS = {".webp": "WEBP", ".gif": "GIF"}
FRAME_MS = 400  # each step's frame in the animation
LAST_FRAME_MS = 1500  # the finished image stays a while before the loop restarts


@dataclass
class TrajectoryFrame:
    step: int  # the sampler's 0-based step; the run's step count for the finished image
    total: int
    sigma: float  # noise level of `noisy`; 0 for the finished image
    noisy: Image.Image  # the current latents, decoded
    denoised: Image.Image  # the model's prediction of the clean image at this step, decoded


class Trajectory:
    """A step callback that keeps every `every`-th step's latents (step 0, every, 2 * every, ...) on the
    CPU; `frames(pipe, result)` decodes them after the run. `then` is another callback to call too."""

    def __init__(self, every: int = 5, then: Optional[Callable[[dict], None]] = None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise InputError(f"the trajectory's step interval (--every) must be a whole number of 1 or more, got {every!r}")
        self.every = every
        self.then = then
        self.steps: list[dict] = []

    def __call__(self, step: dict) -> None:
        if self.then is not None:
            self.then(step)
        if step["i"] % self.every == 0:
            self.steps.append({"i": int(step["i"]), "total": int(step["total"]), "sigma": float(step["sigma"]),
                               "x": step["x"].detach().float().cpu(),
                               "denoised": step["denoised"].detach().float().cpu()})

    @torch.no_grad()
    def frames(self, pipe, result, image: int = 0) -> list[TrajectoryFrame]:
        """The recorded steps of batch item `image`, decoded with `pipe`'s VAE, then the finished image."""
        if not self.steps:
            raise InputError("the trajectory recorded no steps: pass it as callback= to a pipeline first")
        latents = self.steps[0]["x"][image:image + 1]
        factor = pipe.latent_factor
        pipe = with_tiled_vae(pipe, None, latents.shape[-1] * factor, latents.shape[-2] * factor, 1)
        frames = []
        for step in self.steps:
            noisy = step["x"][image:image + 1] / (step["sigma"] ** 2 + 1) ** 0.5
            frames.append(TrajectoryFrame(step["i"], step["total"], step["sigma"], decode_latents(pipe, noisy)[0],
                                          decode_latents(pipe, step["denoised"][image:image + 1])[0]))
        total = self.steps[-1]["total"]
        final = result.images[image]
        frames.append(TrajectoryFrame(total, total, 0.0, final, final))
        return frames


def frame_label(frame: TrajectoryFrame) -> str:
    if frame.step == frame.total:
        return f"done ({frame.total} steps)"
    return f"step {frame.step}\nsigma {frame.sigma:.3g}"


def trajectory_grid(frames: list[TrajectoryFrame]) -> Image.Image:
    """Columns of frames: the noisy latents decoded above, the predicted clean image below."""
    return labelled_grid([[f.noisy for f in frames], [f.denoised for f in frames]],
                         column_labels=[frame_label(f) for f in frames],
                         row_labels=["latents x_t\n(decoded)", "predicted\nclean x0"],
                         title="Denoising trajectory")


def animation_frames(frames: list[TrajectoryFrame]) -> list[Image.Image]:
    """One picture per frame: the noisy latents and the prediction side by side, captioned."""
    return [labelled_grid([[f.noisy, f.denoised]], column_labels=["latents x_t", "predicted x0"],
                          title=frame_label(f).replace("\n", ", ")) for f in frames]


def check_trajectory_path(path: str) -> None:
    """The trajectory's file must be an animation (.webp, .gif) or a grid (.png)."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (*ANIMATION_FORMATS, ".png"):
        raise InputError(f"the trajectory must be a .webp or .gif animation (a .png grid is written beside it) "
                         f"or a .png grid, got '{path}'")


def trajectory_paths(path: str) -> list[str]:
    """The files `save_trajectory(path)` writes: the animation and the grid STEM.png beside it, or the grid."""
    check_trajectory_path(path)
    stem, extension = os.path.splitext(path)
    return [path] if extension.lower() == ".png" else [path, stem + ".png"]


def save_trajectory(frames: list[TrajectoryFrame], path: str) -> list[str]:
    """Write the frames as an animation (.webp, .gif) with the grid STEM.png beside it, or as the grid
    alone (.png), each atomically; return the paths written."""
    paths = trajectory_paths(path)
    if len(paths) == 2:
        pictures = animation_frames(frames)
        buffer = io.BytesIO()
        durations = [FRAME_MS] * (len(pictures) - 1) + [LAST_FRAME_MS]
        options = {"lossless": True} if path.lower().endswith(".webp") else {}
        pictures[0].save(buffer, format=ANIMATION_FORMATS[os.path.splitext(path)[1].lower()], save_all=True,
                         append_images=pictures[1:], duration=durations, loop=0, **options)
        write_file(buffer.getvalue(), path)
    save_image(trajectory_grid(frames), paths[-1])
    return paths
