"""Images in requests and answers: base64 strings, decoded with care.

A request's image is untrusted bytes: its size is read from the header and checked against the
server's pixel cap before a single pixel is decoded (a tiny PNG can claim a gigapixel: a
"decompression bomb"); only common still-image formats are opened; whatever cannot be read is the
client's error (InputError, a 400), never the server's. URLs are refused: the server fetches nothing
on a client's behalf.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from typing import Optional

from PIL import Image

from ..errors import InputError
from ..outputs import encode_image

FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF"]  # what Image.open may try; nothing exotic
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_URL = re.compile(r"^(https?|ftp|file|s3|gs)://", re.IGNORECASE)


def decode_image(data: str, what: str, max_pixels: int) -> Image.Image:
    """A PIL image from base64 text (a `data:image/...;base64,` prefix is allowed), fully loaded."""
    if not isinstance(data, str) or not data.strip():
        raise InputError(f"{what} is empty; send the image as base64 text")
    text = data.strip()
    if _URL.match(text):
        raise InputError(f"{what} is a URL; this server fetches nothing: send the image itself as base64")
    text = _DATA_URL.sub("", text, count=1)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64; send a PNG, JPEG or WebP file encoded as base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(f"{what} is {width}x{height}, more than this server's limit of {max_pixels} pixels; "
                                 "send a smaller image")
            image.load()
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            MemoryError) as exc:
        raise InputError(f"{what} cannot be read as an image ({exc}); send a PNG, JPEG or WebP file") from None
    return image


def decode_optional(data: Optional[str], what: str, max_pixels: int) -> Optional[Image.Image]:
    return None if data in (None, "") else decode_image(data, what, max_pixels)


def encode_png_base64(image: Image.Image, infotext: Optional[str] = None) -> str:
    """Base64 PNG (no data: prefix) carrying `infotext` in its `parameters` chunk."""
    return base64.b64encode(encode_image(image, "png", infotext or None)).decode("ascii")


def bytes_base64(data: Optional[bytes]) -> Optional[str]:
    return base64.b64encode(data).decode("ascii") if data else None


def text_chunks(image: Image.Image) -> dict:
    """An image's text metadata (PNG tEXt/iTXt chunks and the like) as strings."""
    return {key: value for key, value in image.info.items() if isinstance(key, str) and isinstance(value, str)}
