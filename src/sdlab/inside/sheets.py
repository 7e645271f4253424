"""Labelled pictures for the inside views: tiles of images with captions, drawn with Pillow.

Small models make small images (the bundled model's are 64 px), so tiles are enlarged by a whole
factor, nearest neighbour, until their short side reaches `MIN_TILE` and captions stay readable.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128  # px: the short side tiles are enlarged to, at least
GAP = 4  # px between tiles
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` px (a scalable one when Pillow has FreeType)."""
    return ImageFont.load_default(size=size)


def enlarge(image: Image.Image, min_side: int = MIN_TILE) -> Image.Image:
    """`image` scaled up by the smallest whole factor that makes its short side at least `min_side`."""
    factor = max(1, -(-min_side // min(image.size)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def text_width(text: str, size: int = 13) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font(size))
    return right - left


def labelled_grid(rows: Sequence[Sequence[Image.Image]], column_labels: Sequence[str] = (),
                  row_labels: Sequence[str] = (), title: Optional[str] = None) -> Image.Image:
    """Rows of equally sized tiles (enlarged to MIN_TILE) on white, a caption under each column's top
    row, a label left of each row and an optional title above. Labels may hold newlines."""
    tiles = [[enlarge(tile.convert("RGB")) for tile in row] for row in rows]
    tile_w, tile_h = tiles[0][0].size
    columns = max(len(row) for row in tiles)
    label_w = max((max(text_width(line) for line in label.split("\n")) for label in row_labels), default=0)
    label_w = label_w + 2 * GAP if label_w else 0
    title_h = 22 if title else 0
    caption_lines = max((label.count("\n") + 1 for label in column_labels), default=0)
    caption_h = 16 * caption_lines + GAP if caption_lines else 0
    width = label_w + columns * (tile_w + GAP) + GAP
    height = title_h + caption_h + len(tiles) * (tile_h + GAP) + GAP
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((GAP, 4), title, fill=INK, font=font(15))
    for c, label in enumerate(column_labels):
        draw.multiline_text((label_w + GAP + c * (tile_w + GAP), title_h + 2), label, fill=INK, font=font(), spacing=3)
    top = title_h + caption_h
    for r, row in enumerate(tiles):
        y = top + GAP + r * (tile_h + GAP)
        if r < len(row_labels):
            draw.multiline_text((GAP, y + tile_h // 2), row_labels[r], fill=INK, font=font(), anchor="lm", spacing=3)
        for c, tile in enumerate(row):
            sheet.paste(tile.resize((tile_w, tile_h), Image.Resampling.NEAREST) if tile.size != (tile_w, tile_h)
                        else tile, (label_w + GAP + c * (tile_w + GAP), y))
    return sheet


def channel_picture(channel: torch.Tensor, limit: Optional[float] = None) -> Image.Image:
    """One latent channel (h, w) as a greyscale picture: 0 is mid grey, +-limit (default: the channel's
    largest magnitude) white and black, so the sign of each value stays visible."""
    channel = channel.detach().float().cpu()
    limit = float(limit if limit is not None else channel.abs().max().clamp(min=1e-6))
    grey = ((channel / limit).clamp(-1, 1) + 1) * 127.5
    return Image.fromarray(grey.round().byte().numpy(), mode="L").convert("RGB")


def pixels_to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image, rounded as pipelines.latents.decode_latents rounds."""
    array = (pixels.detach().float().cpu() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))
