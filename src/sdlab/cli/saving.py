"""Where the generating commands write their images: `-o FILE` for scripts, else the web UI's numbered
outputs folder (sdlab/outputs.py), in PNG, JPEG or WebP, with a grid of the batch on request."""

from __future__ import annotations

import argparse
import os

from ..errors import InputError
from ..outputs import FORMATS, day_folder, format_of, image_grid, save_image, save_numbered


def add_output_options(parser: argparse.ArgumentParser, kind: str) -> None:
    """-o, --outdir, --format and --grid; `kind` is the outputs subfolder (txt2img, img2img, ..., extras)."""
    parser.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="write exactly this file (.png, .jpg or .webp), replacing it if it exists; batches "
                             "add -1, -2, ... (default: a new numbered file in --outdir)")
    parser.add_argument("--outdir", default="outputs", metavar="DIR",
                        help=f"without -o, images go to DIR/{kind}/YYYY-MM-DD/NNNNN-SEED.png, numbered on from the "
                             "highest number there as the web UI does, never overwriting (default: outputs)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="png (the parameters in its text chunk), jpg or webp (in the EXIF UserComment, as the "
                             "web UI writes them); default: -o's extension, else png")
    parser.add_argument("--grid", action="store_true",
                        help="also write a batch of 2 or more tiled in one picture, as the web UI does: "
                             "grid-NNNNN.png beside the images, or STEM-grid.png with -o")
    parser.set_defaults(output_kind=kind)


def output_paths(output: str, count: int) -> list[str]:
    """-o's file and, for a batch, STEM-1.EXT, STEM-2.EXT, ..."""
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [output] + [f"{stem}-{i}{ext}" for i in range(1, count)]


def grid_path(output: str) -> str:
    return f"{os.path.splitext(output)[0]}-grid.png"


def check_writable_file(path: str) -> None:
    """The folder of `path` exists and can be written to."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"output folder does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise InputError(f"cannot write to the output folder: {directory}")


def check_output_options(args) -> None:
    """Refuse before the model loads what would fail when the images are written."""
    if args.output is not None:
        fmt = format_of(args.output)
        if fmt is None:
            raise InputError(f"-o must name a .png, .jpg or .webp file (it carries the generation parameters), "
                             f"got '{args.output}'")
        if args.format is not None and args.format != fmt:
            raise InputError(f"--format {args.format} but -o {args.output} is a .{fmt} file; leave out one of them")
        check_writable_file(args.output)
        return
    check_output_folder(args.outdir, "--outdir")


def check_output_folder(folder: str, option: str) -> None:
    """`folder` is, or can be made, a folder to write in: its nearest existing part is a writable folder."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{option} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise InputError(f"{option} {folder}: cannot write to {existing}")


def save_results(args, result) -> list[str]:
    """Write the result's images (and with --grid the batch's grid, whose parameters are the first
    image's); return the paths written, in order."""
    grid = image_grid(result.images) if args.grid and len(result.images) > 1 else None
    if args.output is not None:
        fmt = format_of(args.output)
        paths = [save_image(image, path, infotext, fmt) for path, image, infotext in
                 zip(output_paths(args.output, len(result.images)), result.images, result.infotexts)]
        if grid is not None:
            paths.append(save_image(grid, grid_path(args.output), result.infotexts[0]))
        return paths
    folder = day_folder(args.outdir, args.output_kind)
    paths = [save_numbered(image, folder, infotext, seed, fmt=args.format or "png")
             for image, infotext, seed in zip(result.images, result.infotexts, result.seeds)]
    if grid is not None:
        paths.append(save_numbered(grid, folder, result.infotexts[0], prefix="grid"))
    return paths
