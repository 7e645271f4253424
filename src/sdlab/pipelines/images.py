"""Pixels in and out of the editing pipelines: loading, the web UI's resize modes, masks and pasting back.

Images are PIL images at the edges and float tensors inside: pixels (1, 3, H, W) in [-1, 1] as the VAE
takes them (the same arithmetic as diffusers' image processor, so inputs compare bit for bit), masks
(H, W) in [0, 1] with 1 = repaint.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

# The web UI's resize modes (img2img "Resize mode"), by sdlab's short name.
RESIZE_MODES = {"just": "Just resize", "crop": "Crop and resize", "fill": "Resize and fill"}


# -- loading --------------------------------------------------------------------------------------


def _open(source, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"{what} must be a PIL image or a path to an image file, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}; give a PNG, JPEG or WebP file") from None


def load_image(source, what: str = "init image") -> Image.Image:
    """An RGB image from a PIL image or a file; transparency is flattened onto white, as the web UI does."""
    image = _open(source, what)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_mask(source, size: tuple[int, int], what: str = "mask") -> Image.Image:
    """A greyscale mask (white = repaint) the size of the image it goes with.

    A mask of another size is stretched to `size` with a warning, since a user who painted it on a
    differently sized copy usually still means the same regions. Transparent pixels count as black.
    """
    mask = _open(source, what)
    if mask.mode in ("RGBA", "LA"):
        rgba = mask.convert("RGBA")
        mask = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    mask = mask.convert("L")
    if mask.size != tuple(size):
        warnings.warn(f"the {what} is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; "
                      "stretching the mask to the image", stacklevel=3)
        mask = mask.resize(tuple(size), Image.Resampling.BILINEAR)  # no ringing past the painted edge
    return mask


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    return torch.from_numpy(2.0 * array - 1.0).permute(2, 0, 1)[None]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Greyscale image -> (H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(mask.convert("L")).astype(np.float32) / 255.0)


def tensor_to_mask(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray((mask.clamp(0, 1).numpy() * 255).round().astype(np.uint8), mode="L")


# -- resize modes ---------------------------------------------------------------------------------


def resize_mode_key(mode: str) -> str:
    """'just' | 'crop' | 'fill', from the short name or the web UI's label, any case."""
    text = str(mode).strip().lower()
    for key, label in RESIZE_MODES.items():
        if text in (key, label.lower()):
            return key
    raise InputError(f"unknown resize mode '{mode}'; choose just (stretch), crop (fill the size, crop the "
                     "overflow) or fill (fit inside, stretch the edge pixels into the borders)")


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just") -> Image.Image:
    """`image` brought to width x height the way the web UI's img2img resize modes do it.

    just: stretch to the size. crop: scale to cover the size, keeping the aspect ratio, and cut the
    overflow evenly from both sides. fill: scale to fit inside, centre, and fill the empty borders by
    stretching the outermost row or column of pixels across them (the web UI's "Resize and fill").
    Lanczos resampling, as the web UI uses without an upscaler model.
    """
    mode = resize_mode_key(mode)
    w, h = image.size
    if (w, h) == (width, height):
        return image.copy()
    if mode == "just":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    target_wider = width * h > height * w
    if (mode == "crop") == target_wider:  # crop: match the width of a wider target; fill: of a narrower one
        scaled = (width, max(1, h * width // w))
    else:
        scaled = (max(1, w * height // h), height)
    resized = image.resize(scaled, Image.Resampling.LANCZOS)
    if mode == "crop":
        left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
        return resized.crop((left, top, left + width, top + height))
    left, top = (width - scaled[0]) // 2, (height - scaled[1]) // 2
    return pad_by_stretching(resized, left, width - scaled[0] - left, top, height - scaled[1] - top)


def pad_by_stretching(image: Image.Image, left: int, right: int, top: int, bottom: int) -> Image.Image:
    """Grow the canvas, each new border a copy of the nearest edge pixels (corners: the corner pixel)."""
    array = np.asarray(image)
    widths = ((top, bottom), (left, right)) + ((0, 0),) * (array.ndim - 2)
    return Image.fromarray(np.pad(array, widths, mode="edge"), mode=image.mode)


# -- masks ----------------------------------------------------------------------------------------


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian of standard deviation `sigma` px over 2 * int(2.5 sigma + 0.5) + 1 taps (the kernel
    size the web UI passes to OpenCV for its mask blur), summing to 1."""
    radius = int(2.5 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def _separable(planes: torch.Tensor, kernel: torch.Tensor, padding: str) -> torch.Tensor:
    """Convolve (N, H, W) planes with `kernel` along both axes; `padding` 'reflect' or 'zeros'."""
    radius = kernel.numel() // 2
    x = planes[:, None]
    for dim in (3, 2):
        size = x.shape[dim]
        pad = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
        if padding == "zeros":
            x = F.pad(x, pad)
        else:  # mirror without repeating the edge (OpenCV's default border); replicate where too small
            x = F.pad(x, pad, mode="reflect" if radius < size else "replicate")
        weight = kernel.view(1, 1, 1, -1) if dim == 3 else kernel.view(1, 1, -1, 1)
        x = F.conv2d(x, weight.to(x.dtype))
    return x[:, 0]


def blur_mask(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """(H, W) mask blurred with a Gaussian of standard deviation `radius` px (the web UI's "Mask blur")."""
    if radius < 0:
        raise InputError(f"mask blur must be 0 or more pixels, got {radius}")
    if radius == 0:
        return mask.clone()
    return _separable(mask[None].float(), gaussian_kernel(radius), "reflect")[0].clamp(0, 1)


def crop_region(mask: torch.Tensor, padding: int) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2), end exclusive: the box around the mask's non-zero pixels grown by `padding` px
    on every side and clipped to the image; None for an empty mask."""
    rows = torch.nonzero(mask.amax(dim=1) > 0).flatten()
    cols = torch.nonzero(mask.amax(dim=0) > 0).flatten()
    if rows.numel() == 0:
        return None
    height, width = mask.shape
    return (max(0, int(cols[0]) - padding), max(0, int(rows[0]) - padding),
            min(width, int(cols[-1]) + 1 + padding), min(height, int(rows[-1]) + 1 + padding))


def expand_to_aspect(region, width: int, height: int, image_width: int, image_height: int):
    """Grow `region` along its short side to the aspect ratio width : height, centred, shifted back
    inside the image and clipped to it, so the crop scales to the working size without distortion
    wherever the image allows (the web UI's only-masked inpainting does the same)."""
    x1, y1, x2, y2 = region

    def grow(lo, hi, want, limit):
        extra = max(0, want - (hi - lo))
        lo, hi = lo - extra // 2, hi + extra - extra // 2
        if lo < 0:
            lo, hi = 0, hi - lo
        if hi > limit:
            lo, hi = lo - (hi - limit), limit
        return max(0, lo), hi

    if (x2 - x1) * height > (y2 - y1) * width:
        y1, y2 = grow(y1, y2, math.ceil((x2 - x1) * height / width), image_height)
    else:
        x1, x2 = grow(x1, x2, math.ceil((y2 - y1) * width / height), image_width)
    return x1, y1, x2, y2


def fill_masked(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The web UI's masked content "fill": the masked area painted with the surrounding colours, blurred.

    Normalised convolution (Knutsson & Westin 1993): blur(image * known) / blur(known) is the local
    average of the known pixels only. Averages from coarse to fine are laid over each other where
    the finer one has enough known pixels nearby, so small holes take their rim's colour and large
    ones a smooth gradient of it. `pixels` (1, 3, H, W), `mask` (H, W) with 1 = unknown.
    """
    known = (1 - mask).clamp(0, 1)[None]  # (1, H, W)
    if known.sum() == 0:
        return torch.zeros_like(pixels)
    flat = pixels[0]
    filled = ((flat * known).sum(dim=(1, 2)) / known.sum()).view(3, 1, 1).expand_as(flat).clone()
    longest = max(mask.shape)
    for sigma in (64, 16, 4, 1):
        if sigma > longest / 2:
            continue
        kernel = gaussian_kernel(sigma)
        weight = _separable(known, kernel, "zeros")
        average = _separable(flat * known, kernel, "zeros") / weight.clamp_min(1e-6)
        confident = (2 * weight).clamp(0, 1)
        filled = filled * (1 - confident) + average * confident
    return (flat * known + filled * (1 - known))[None]


def composite(generated: Image.Image, original: Image.Image, alpha: torch.Tensor) -> Image.Image:
    """generated where alpha = 1, original where alpha = 0 (exactly), blended in between; (H, W) alpha."""
    a = alpha.clamp(0, 1).numpy()[..., None].astype(np.float64)
    new = np.asarray(generated.convert("RGB")).astype(np.float64)
    old = np.asarray(original.convert("RGB")).astype(np.float64)
    return Image.fromarray(np.clip((old * (1 - a) + new * a).round(), 0, 255).astype(np.uint8))
