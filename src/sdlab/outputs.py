"""Where generated images go and how they carry their parameters, as the popular SD web UI
(AUTOMATIC1111) saves them, so its "PNG Info" tab, civitai and image browsers read ours.

    outputs/txt2img/2026-12-07/00012-31.png     <outputs>/<kind>/<date>/<running number>-<seed>.<ext>
    outputs/txt2img/2026-12-07/grid-00003.png   a batch tiled into one picture

The running number is one more than the highest number in that day's folder (the web UI's rule, which
also counts files other tools or older runs wrote there), and a file is never overwritten: it is
written under a temporary name and linked to its final name only if that name is free.

Parameters: PNG keeps them in a `parameters` text chunk; JPEG and WebP in the EXIF UserComment, as the
web UI writes it with piexif (`UserComment.dump(text, encoding="unicode")`): the 8-byte character
code "UNICODE\\0", then UTF-16 big-endian.
"""

from __future__ import annotations

import datetime
import io
import math
import os
import struct
import tempfile
from typing import Optional, Sequence

from PIL import Image, PngImagePlugin

from .errors import InputError

KINDS = ("txt2img", "img2img", "inpaint", "outpaint", "extras")  # the web UI's outputs/ subfolders
FORMATS = ("png", "jpg", "webp")
EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
_PILLOW_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
QUALITY = 80  # the web UI's default "jpeg_quality", which it also gives WebP

# EXIF (CIPA DC-008): the Exif sub-IFD pointer in IFD0, and UserComment in that sub-IFD, whose first
# 8 bytes name its character code (table 9)
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
_LONG, _UNDEFINED = 4, 7  # TIFF field types
_UNICODE_PREFIX = b"UNICODE\0"
_ASCII_PREFIX = b"ASCII\0\0\0"
_JPEG_EXIF_LIMIT = 65533  # one APP1 segment's payload (its 2-byte length counts itself)


def format_of(path: str) -> Optional[str]:
    """'png', 'jpg' or 'webp' from the file name's extension; None for any other extension."""
    return EXTENSIONS.get(os.path.splitext(path)[1].lower())


def user_comment(text: str) -> bytes:
    """An EXIF UserComment value holding `text`, byte for byte what piexif's
    `UserComment.dump(text, encoding="unicode")` returns."""
    return _UNICODE_PREFIX + text.encode("utf_16_be")


def read_user_comment(data: bytes) -> str:
    """The text of an EXIF UserComment value (piexif's `UserComment.load`, lenient about bad bytes)."""
    prefix, body = data[:8], data[8:]
    if prefix == _UNICODE_PREFIX:
        return body.decode("utf_16_be", errors="replace")
    if prefix == _ASCII_PREFIX:
        return body.decode("ascii", errors="replace")
    return body.decode("utf-8", errors="replace").strip("\0")  # undefined code: most writers mean UTF-8


def encode_image(image: Image.Image, fmt: str = "png", infotext: Optional[str] = None) -> bytes:
    """The file's bytes: `image` as `fmt` with `infotext` where the web UI keeps it for that format."""
    if fmt not in FORMATS:
        raise InputError(f"image format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if infotext:
            info.add_text("parameters", infotext)
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()
    exif = exif_bytes(user_comment(infotext)) if infotext else b""
    if fmt == "jpg" and len(exif) > _JPEG_EXIF_LIMIT:
        raise InputError("the generation parameters are too long for a JPEG's EXIF (64 KB); save as PNG or WebP")
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # JPEG has no alpha; the web UI drops it for WebP too
    rgb.save(buffer, format=_PILLOW_FORMATS[fmt], quality=QUALITY, exif=exif)
    return buffer.getvalue()


def exif_bytes(comment: bytes) -> bytes:
    """An EXIF block ("Exif\\0\\0" and a big-endian TIFF structure) holding only the UserComment
    `comment`, laid out as piexif.dump lays it out: IFD0 points to the Exif IFD, which holds the tag.

    Written by hand because Pillow's Image.Exif stores an unknown tag's bytes as type BYTE, which piexif
    (and so the web UI's PNG Info) reads as a tuple of numbers; UserComment must be UNDEFINED.
    """
    ifd0, exif_ifd = 8, 8 + 18  # an IFD of one entry: count (2 bytes), entry (12), next-IFD offset (4)
    data_at = exif_ifd + 18
    return b"Exif\0\0" + b"".join([
        b"MM", struct.pack(">HI", 42, ifd0),
        struct.pack(">HHHII", 1, EXIF_IFD, _LONG, 1, exif_ifd), struct.pack(">I", 0),
        struct.pack(">HHHII", 1, USER_COMMENT, _UNDEFINED, len(comment), data_at), struct.pack(">I", 0),
        comment,
    ])


def save_image(image: Image.Image, path: str, infotext: Optional[str] = None, fmt: Optional[str] = None) -> str:
    """Write `image` to `path`, replacing a file of that name (scripts' `-o FILE`), atomically: a
    reader sees the old file or the whole new one. `fmt` defaults to the extension's; returns `path`."""
    fmt = fmt or format_of(path)
    if fmt is None:
        raise InputError(f"the output must be a .png, .jpg or .webp file, got '{path}'")
    _write(encode_image(image, fmt, infotext), path, exclusive=False)
    return path


def write_file(data: bytes, path: str) -> str:
    """Write `data` to `path` atomically, replacing a file of that name (animations, sheets); returns `path`."""
    _write(data, path, exclusive=False)
    return path


def day_folder(outdir: str, kind: str, day: Optional[datetime.date] = None) -> str:
    """`<outdir>/<kind>/<YYYY-MM-DD>`, today's by default (local time, as the web UI's)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return os.path.join(outdir, kind, (day or datetime.date.today()).isoformat())


def next_number(folder: str, prefix: str = "") -> int:
    """One more than the highest running number of the files in `folder` (0 when there are none).

    prefix '': names that start with a number (`00012-31.png`); prefix 'grid': `grid-00003.png`.
    """
    start = f"{prefix}-" if prefix else ""
    highest = -1
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if not name.startswith(start):
            continue
        number = os.path.splitext(name[len(start):])[0].split("-")[0]
        if number.isascii() and number.isdigit():
            highest = max(highest, int(number))
    return highest + 1


def save_numbered(image: Image.Image, folder: str, infotext: Optional[str] = None, seed: Optional[int] = None,
                  fmt: str = "png", prefix: str = "") -> str:
    """Write `image` into `folder` (made if missing) under the next free running number and return its
    path: `00012-31.png` (seed 31), or `grid-00003.png` with prefix 'grid'. Never overwrites: when a
    name is taken between choosing and writing (another process saving), the next number is tried."""
    if fmt not in FORMATS:
        raise InputError(f"image format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    os.makedirs(folder, exist_ok=True)
    data = encode_image(image, fmt, infotext)
    number = next_number(folder, prefix)
    while True:
        name = f"{prefix}-{number:05}" if prefix else f"{number:05}"
        path = os.path.join(folder, f"{name}-{seed}.{fmt}" if seed is not None else f"{name}.{fmt}")
        try:
            _write(data, path, exclusive=True)
            return path
        except FileExistsError:
            number = max(number + 1, next_number(folder, prefix))


def _write(data: bytes, path: str, exclusive: bool) -> None:
    """Write under a temporary name in the same folder, then give the file its name: os.replace, or
    with `exclusive` a hard link, which fails with FileExistsError instead of replacing a file."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"output folder does not exist: {directory}")
    fd, tmp = tempfile.mkstemp(prefix=".sdlab-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a saved image gets the usual mode
        if not exclusive:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            # file systems without hard links (FAT, some network mounts): claim the name, then fill it
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def grid_rows(count: int) -> int:
    """The web UI's default grid shape: round(sqrt(n)) rows, as many columns as it takes."""
    return max(1, round(math.sqrt(count)))


def image_grid(images: Sequence[Image.Image], rows: Optional[int] = None) -> Image.Image:
    """The images tiled row by row at the first one's size on black, `grid_rows(n)` rows by default."""
    if not images:
        raise InputError("a grid needs at least one image")
    rows = rows or grid_rows(len(images))
    columns = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "black")
    for i, image in enumerate(images):
        grid.paste(image, (i % columns * width, i // columns * height))
    return grid


def read_parameters(path: str) -> Optional[str]:
    """The generation parameters (infotext) an image carries: a PNG's `parameters` text chunk, or the
    EXIF UserComment of a JPEG or WebP (or of a PNG with EXIF). None when it carries none."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory; give an image file")
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
            if isinstance(text, str):
                return text
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except (OSError, SyntaxError) as exc:  # Pillow: UnidentifiedImageError is an OSError; bad EXIF a SyntaxError
        raise InputError(f"cannot read image {path}: {exc}") from None
    if isinstance(comment, bytes) and comment:
        return read_user_comment(comment)
    return comment or None
