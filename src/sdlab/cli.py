"""The `sdlab` command. User errors print one line and exit non-zero; never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import InputError, SdlabError

EXIT_USER_ERROR = 2


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got '{text}'") from None
    return width, height


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the denoising loop."""
    parser.add_argument("prompt", help="what the image should show; (word:1.3) emphasises, [word] de-emphasises")
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write (batches add -1, -2, ...)")
    parser.add_argument("--negative", default="", help="negative prompt: what the image should not show")
    parser.add_argument("--model", default=None, help="checkpoint file (.safetensors/.ckpt), diffusers folder, or 'demo'")
    parser.add_argument("--sampler", default="Euler a", help="sampler name, see `sdlab samplers` (default: Euler a)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    parser.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
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
    from .progress import ProgressBar

    if quiet:
        return None, lambda: None
    bar = ProgressBar(total, desc)
    return (lambda info: bar.update(1)), bar.close


def load_for(args):
    from . import load

    return load(args.model, prediction=args.prediction, device=args.device, dtype=args.dtype)


def cmd_generate(args) -> int:
    from .infotext import save_png

    check_output(args.output)
    started = time.perf_counter()
    pipe = load_for(args)
    width, height = args.size or (None, None)
    step, close = progress_callback(args.steps, args.quiet)
    try:
        result = pipe.txt2img(
            args.prompt, args.negative, steps=args.steps, guidance_scale=args.cfg, seed=args.seed,
            width=width, height=height, batch_size=args.batch, sampler=args.sampler, noise=args.noise,
            clip_skip=args.clip_skip, eta=args.eta, callback=step,
        )
    finally:
        close()
    for path, image, infotext in zip(output_paths(args.output, len(result.images)), result.images, result.infotexts):
        save_png(image, path, infotext)
        print(f"wrote {path}")
    print(f"seed {result.seeds[0]}, {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


def cmd_tokenize(args) -> int:
    from .tokenizer import get_tokenizer

    texts = args.text
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin]
    if not texts:
        raise InputError("give at least one text to tokenize (or '-' to read lines from stdin)")
    tokenizer = get_tokenizer()
    encoded = [tokenizer.encode(text) for text in texts]
    if args.json:
        print(json.dumps(encoded))
        return 0
    for text, ids in zip(texts, encoded):
        print(f"{text!r}: {len(ids)} tokens")
        for token_id, token in zip(ids, tokenizer.token_strings(ids)):
            print(f"  {token_id:>6}  {token}")
    return 0


def cmd_samplers(args) -> int:
    from .samplers import list_samplers

    for name, aliases in list_samplers():
        print(f"{name:<20} {', '.join(aliases)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlab", description="Stable Diffusion from scratch: generate, inspect, train.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="text to image")
    add_generation_options(generate)
    generate.set_defaults(run=cmd_generate)

    tokenize = commands.add_parser("tokenize", help="show how CLIP's tokenizer splits text")
    tokenize.add_argument("text", nargs="*", help="texts to tokenize; '-' reads one text per line from stdin")
    tokenize.add_argument("--json", action="store_true", help="print a JSON list of id lists, one per input")
    tokenize.set_defaults(run=cmd_tokenize)

    samplers = commands.add_parser("samplers", help="list sampler names and aliases")
    samplers.set_defaults(run=cmd_samplers)

    from .training.cli import add_train_command

    add_train_command(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SdlabError as exc:
        print(f"sdlab: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sdlab: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("sdlab: error: out of memory; try a smaller --size or --batch", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
