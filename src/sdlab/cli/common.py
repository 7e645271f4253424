"""What every `sdlab` command shares: its parser class, the generation options, writing images, and
turning a user's mistake into one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..config import DEFAULT_SAMPLER
from ..errors import InputError, SdlabError

EXIT_USER_ERROR = 2


class CommandParser(argparse.ArgumentParser):
    """argparse, except that a mistake prints one line pointing at the command's --help instead of the
    whole usage. add_subparsers hands this class on to every subcommand's parser."""

    def error(self, message: str):
        self.fail(self.prog, message)

    def fail(self, prog: str, message: str):
        self.exit(EXIT_USER_ERROR, f"sdlab: error: {message}; see `{prog} --help`\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # the innermost subcommand parses first and so names itself; its parents keep that name
        if not hasattr(namespace, "command_prog"):
            namespace.command_prog = self.prog
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        prog = vars(namespace).pop("command_prog")
        if extras:
            # argparse leaves unknown options to the top parser; point at the subcommand they were given to
            self.fail(prog, f"unrecognized arguments: {' '.join(extras)}")
        return namespace


def parse_size(text: str) -> tuple[int, int]:
    """`--size WIDTHxHEIGHT` as (width, height), both positive."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got '{text}'") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, like 512x512, got '{text}'")
    return width, height


def lora_option(text: str):
    """`--lora FILE[:WEIGHT]`; the adapters (and torch) load only when the option is given."""
    from ..adapters import parse_lora_option

    return parse_lora_option(text)


def add_generation_options(parser: argparse.ArgumentParser, default_size: str = "the model's") -> None:
    """Options shared by every command that runs the denoising loop."""
    parser.add_argument("prompt", help="what the image should show; (word:1.3) emphasises, [word] de-emphasises, "
                        "[from:to:when] and [a|b] edit it across steps, <lora:name:0.8> applies a LoRA")
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write (batches add -1, -2, ...)")
    parser.add_argument("--negative", default="", help="negative prompt: what the image should not show")
    parser.add_argument("--model", default=None, help="checkpoint file (.safetensors/.ckpt), diffusers folder, or 'demo'")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER,
                        help=f"sampler name, see `sdlab samplers` (default: {DEFAULT_SAMPLER})")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    parser.add_argument("--size", type=parse_size, default=None,
                        help=f"WIDTHxHEIGHT, multiples of 8 (default: {default_size})")
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--prediction", choices=("epsilon", "v"), default=None,
                        help="override the model's prediction type (SD2 768 models are v)")
    parser.add_argument("--noise", default="diffusers",
                        help="whose random numbers: diffusers, a1111-cpu, a1111-gpu, comfy (same seed, same image as that tool)")
    parser.add_argument("--clip-skip", type=int, default=1, help="use the text encoder's Nth-last layer (default 1)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta / ancestral noise amount")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: detected)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fastest safe for the device)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--lora", action="append", default=[], type=lora_option, metavar="FILE[:WEIGHT]",
                        help="apply a LoRA (kohya/web UI or diffusers format); repeatable")
    parser.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                        help="where <lora:name:w> prompt tags find their files (by name); repeatable")
    parser.add_argument("--lora-mode", choices=("merge", "dynamic"), default="merge",
                        help="merge LoRAs into the weights (fast) or apply them on the fly")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE_OR_DIR",
                        help="textual-inversion embedding(s) to use by name in prompts; repeatable")


def add_tiled_vae_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiled-vae", action=argparse.BooleanOptionalAction, default=None,
                        help="decode (and encode) in tiles: the same image in about half the memory; default: "
                             "only above a megapixel or when the image would not fit")


def output_paths(output: str, count: int) -> list[str]:
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [output] + [f"{stem}-{i}{ext or '.png'}" for i in range(1, count)]


def check_output(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"output folder does not exist: {directory}")
    if not os.access(directory, os.W_OK):
        raise InputError(f"cannot write to the output folder: {directory}")
    if not path.lower().endswith(".png"):
        raise InputError(f"output must be a .png file (it carries the generation parameters), got '{path}'")


def progress_callback(total: int, quiet: bool, desc: str = "sampling "):
    from ..progress import ProgressBar

    if quiet:
        return None, lambda: None
    bar = ProgressBar(total, desc)
    return (lambda info: bar.update(1)), bar.close


def load_for(args, task: str = "txt2img"):
    from .. import load
    from ..adapters import load_embeddings

    pipe = load(args.model, prediction=args.prediction, device=args.device, dtype=args.dtype, task=task)
    if args.embedding:
        load_embeddings(pipe.text_encoder, args.embedding)
    return pipe


def run_and_save(args, started: float, run, steps: int) -> int:
    """Run `run(callback)` under a progress bar of `steps` steps and write its images with their parameters."""
    from ..infotext import save_png

    step, close = progress_callback(steps, args.quiet)
    try:
        result = run(step)
    finally:
        close()
    for path, image, infotext in zip(output_paths(args.output, len(result.images)), result.images, result.infotexts):
        save_png(image, path, infotext)
        print(f"wrote {path}")
    print(f"seed {result.seeds[0]}, {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


def run_reporting_errors(args, interrupted: str = "sdlab: interrupted") -> int:
    """Run a parsed command; user errors, Ctrl-C and running out of memory become one line and an exit code."""
    try:
        return args.run(args)
    except SdlabError as exc:
        print(f"sdlab: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        print("sdlab: error: out of memory; try a smaller --size or --batch (training: a smaller --batch-size "
              "with --grad-accum, --grad-checkpointing, or --shard-model under torchrun)", file=sys.stderr)
        return 1


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, or torch's allocator failures (CUDA OOM and the CPU allocator's RuntimeError)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
