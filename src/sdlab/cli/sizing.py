"""Refusing, before the model loads, a request the machine cannot hold: `sdlab generate --size
100000x100000` fails in a second with one line instead of growing until the kernel kills it.

The check needs the model's config, not its weights: the bundled models and sdlab's files carry it
in their safetensors metadata, other safetensors files give it by their header's tensor shapes (read
as meta tensors, nothing loaded), diffusers folders by their config.json files. A pickled `.ckpt`
must be unpickled to be known, so its requests are checked once it has loaded, before any work.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Optional

Size = tuple[int, int]  # (width, height)


def max_pixels(text: str) -> int:
    """`--max-pixels`: a pixel count (16777216) or a size whose area is the cap (4096x4096)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"--max-pixels takes a pixel count or a size like 4096x4096, got '{text}'")
    return parts[0] * (parts[1] if len(parts) == 2 else 1)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_MAX_PIXELS

    side = int(DEFAULT_MAX_PIXELS**0.5)
    parser.add_argument("--max-pixels", type=max_pixels, default=DEFAULT_MAX_PIXELS, metavar="N|WxH",
                        help=f"refuse images larger than this, whatever the free memory (default: {side}x{side}); "
                             "requests that do not fit in the free memory are refused anyway")
    parser.add_argument("--max-batch", type=positive_int, default=None, metavar="N",
                        help="refuse batches of more images than this (default: as many as fit in memory)")


def limits_of(args):
    from ..memory import Limits

    return Limits(max_pixels=args.max_pixels, max_batch=args.max_batch)


def model_path(args, task: str) -> str:
    """--model, or the bundled model for the command ('demo' when none is installed), kept in
    args.model so that it is looked up (and a missing bundled model reported) once."""
    from .. import bundled

    if args.model is None:
        args.model = bundled.default_model_path(task)
    return args.model


def config_without_weights(path: str, prediction: Optional[str] = None):
    """The ModelConfig of the model at `path` read without its weights; None when that cannot be told
    without loading (pickles) or the file is unreadable (the loader then says why, in its words)."""
    from safetensors import SafetensorError

    from .. import bundled
    from ..errors import SdlabError

    if path == "demo":
        return bundled.DEMO
    try:
        if os.path.isdir(path):
            config = _diffusers_config(path)
        elif path.lower().endswith(".safetensors") and os.path.isfile(path):
            config = _safetensors_config(path, prediction)
        else:
            return None
    except (SdlabError, SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None
    return config if prediction is None else config.replace(prediction=prediction)


def _safetensors_config(path: str, prediction: Optional[str]):
    import torch
    from safetensors import safe_open

    from ..checkpoint.detect import METADATA_KEY, detect_config
    from ..checkpoint.load import clean_state_dict
    from ..config import from_json

    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        if METADATA_KEY in metadata:  # sdlab's own files, the bundled models among them
            return from_json(metadata[METADATA_KEY])
        shapes = {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}
        weights, buffers, _ = clean_state_dict(shapes)
        buffers = {key: f.get_tensor(key) for key in buffers}  # ldm's schedule buffers: a few KB
    return detect_config(weights, metadata, prediction, buffers)


def _diffusers_config(folder: str):
    from ..checkpoint.convert import config_from_diffusers

    def read(*parts: str) -> dict:
        with open(os.path.join(folder, *parts)) as f:
            return json.load(f)

    scheduler = os.path.join(folder, "scheduler", "scheduler_config.json")
    return config_from_diffusers(read("unet", "config.json"), read("vae", "config.json"),
                                 read("text_encoder", "config.json"),
                                 read("scheduler", "scheduler_config.json") if os.path.isfile(scheduler) else None)


def image_size(path: str, what: str) -> Size:
    """(width, height) of an image file from its header, before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    from ..errors import InputError

    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            return image.size
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what} {path} is too large to open safely ({exc}); give a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}; give a PNG, JPEG or WebP file") from None


def check_fits(args, config, sizes: list[Size], device, dtype, weights_loaded: bool) -> None:
    """Refuse (TooLargeError, one line) any of `sizes` that breaks the limits or the free memory."""
    from ..memory import check_generation_fits

    for width, height in sizes:
        check_generation_fits(config, width, height, args.batch, device, dtype, guidance=args.cfg != 1,
                              tiled_vae=getattr(args, "tiled_vae", None), steps=args.steps,
                              limits=limits_of(args), weights_loaded=weights_loaded)


def refuse_too_large(args, task: str, sizes: Callable) -> bool:
    """Before loading: check what `sizes(config)` (every image size the command will make) needs,
    against --max-pixels, --max-batch and the free memory. False when the model's config is only
    known once loaded: the sizes given outright are checked against the limits, the rest after loading."""
    from .. import devices
    from ..memory import check_limits

    config = config_without_weights(model_path(args, task), args.prediction)
    if config is None:
        if args.size:
            check_limits(*args.size, args.batch, args.steps, limits_of(args))
        return False
    device, dtype = devices.resolve(args.device, args.dtype)
    check_fits(args, config, sizes(config), device, dtype, weights_loaded=False)
    return True
