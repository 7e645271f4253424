"""The `sdlab` command. User errors print one line and exit non-zero; never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .config import DEFAULT_SAMPLER
from .errors import InputError, SdlabError

EXIT_USER_ERROR = 2


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got '{text}'") from None
    return width, height


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
    parser.add_argument("--size", type=_size, default=None,
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
    parser.add_argument("--lora", action="append", default=[], type=_lora_option, metavar="FILE[:WEIGHT]",
                        help="apply a LoRA (kohya/web UI or diffusers format); repeatable")
    parser.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                        help="where <lora:name:w> prompt tags find their files (by name); repeatable")
    parser.add_argument("--lora-mode", choices=("merge", "dynamic"), default="merge",
                        help="merge LoRAs into the weights (fast) or apply them on the fly")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE_OR_DIR",
                        help="textual-inversion embedding(s) to use by name in prompts; repeatable")


def add_init_options(parser: argparse.ArgumentParser, strength: float, resize: bool = True) -> None:
    """Options of the commands that start from an image."""
    parser.add_argument("--init", required=True, help="the image to start from (PNG, JPEG, WebP)")
    parser.add_argument("--strength", type=float, default=strength,
                        help=f"denoising strength: 0 keeps the image, 1 repaints it fully (default {strength})")
    if resize:
        parser.add_argument("--resize-mode", default="just", choices=("just", "crop", "fill"),
                            help="how the image meets --size: stretch, crop the overflow, or fit and stretch "
                                 "the edges into the borders (default just)")


def add_mask_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mask-blur", type=float, default=4, help="Gaussian blur of the mask edge in pixels (default 4)")
    parser.add_argument("--fill", default="original", choices=("original", "fill", "latent-noise", "latent-nothing"),
                        help="what the masked area starts from below strength 1 (default original)")


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


def _lora_option(text: str):
    from .adapters import parse_lora_option

    return parse_lora_option(text)


def load_for(args, task: str = "txt2img"):
    from . import load
    from .adapters import load_embeddings

    pipe = load(args.model, prediction=args.prediction, device=args.device, dtype=args.dtype, task=task)
    if args.embedding:
        load_embeddings(pipe.text_encoder, args.embedding)
    return pipe


def generation_kwargs(args) -> dict:
    """The `generate` options as keyword arguments of every pipeline."""
    width, height = args.size or (None, None)
    return dict(steps=args.steps, guidance_scale=args.cfg, seed=args.seed, width=width, height=height,
                batch_size=args.batch, sampler=args.sampler, noise=args.noise, clip_skip=args.clip_skip, eta=args.eta,
                loras=args.lora, lora_dirs=args.lora_dir, lora_mode=args.lora_mode,
                tiled_vae=getattr(args, "tiled_vae", None))


def run_and_save(args, started: float, run, steps: int) -> int:
    """Run `run(callback)` under a progress bar of `steps` steps and write its images with their parameters."""
    from .infotext import save_png

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


def cmd_generate(args) -> int:
    if args.hires_scale and args.attention_maps:
        raise InputError("--attention-maps maps one sampling pass; leave out --hires-scale")
    if args.hires_scale:
        from .pipelines.upscale_cli import cmd_hires

        return cmd_hires(args)
    check_output(args.output)
    if args.attention_maps:
        check_output(args.attention_maps)
        if os.path.abspath(args.attention_maps) in map(os.path.abspath, output_paths(args.output, args.batch)):
            raise InputError(f"--attention-maps {args.attention_maps} is also an image output; give it its own file")
    started = time.perf_counter()
    pipe = load_for(args)

    def run(step):
        return pipe.txt2img(args.prompt, args.negative, callback=step, **generation_kwargs(args))

    if args.attention_maps:
        return run_and_save(args, started, lambda step: run_saving_attention_maps(args, pipe, run, step), args.steps)
    return run_and_save(args, started, run, args.steps)


def run_saving_attention_maps(args, pipe, run, step):
    """`run(step)` with the UNet's cross-attention recorded; writes the first image's word maps to
    --attention-maps (temp file, then rename) and returns run's result."""
    from .models.attention import recorded_cross_attention
    from .pipelines.attention_maps import WordMaps, attention_sheet, prompt_words

    words = prompt_words(args.prompt, args.steps)
    if not words:
        raise InputError("--attention-maps needs a prompt with words to map")
    maps = WordMaps(batch_size=args.batch, count=len(words))
    with recorded_cross_attention(pipe.unet, sink=maps):
        result = run(step)
    path = args.attention_maps
    partial = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.partial")
    attention_sheet(result.images[0], maps.mean(), words).save(partial, format="PNG")
    os.replace(partial, path)
    print(f"wrote {path}")
    return result


def denoising_steps(args) -> int:
    from .pipelines.checks import check_strength

    check_strength(args.strength)
    return min(int(args.steps * args.strength), args.steps)


def cmd_img2img(args) -> int:
    from .pipelines.images import load_image, resize_mode_key

    check_output(args.output)
    started = time.perf_counter()
    image = load_image(args.init, "init image")  # bad input fails before the model loads
    resize_mode_key(args.resize_mode)
    steps = denoising_steps(args)
    pipe = load_for(args)
    return run_and_save(args, started, lambda step: pipe.img2img(
        args.prompt, image, args.negative, strength=args.strength, resize_mode=args.resize_mode, callback=step,
        **generation_kwargs(args)), steps)


def cmd_inpaint(args) -> int:
    import warnings

    from .pipelines.images import load_image, load_mask, resize_mode_key

    check_output(args.output)
    started = time.perf_counter()
    image = load_image(args.init, "init image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = load_mask(args.mask, image.size)
    for warning in caught:
        print(f"sdlab: warning: {warning.message}", file=sys.stderr)
    resize_mode_key(args.resize_mode)
    steps = denoising_steps(args)
    pipe = load_for(args, "inpaint")
    return run_and_save(args, started, lambda step: pipe.inpaint(
        args.prompt, image, mask, args.negative, strength=args.strength, mask_blur=args.mask_blur,
        only_masked=args.only_masked, padding=args.padding, fill=args.fill, invert_mask=args.invert_mask,
        resize_mode=args.resize_mode, callback=step, **generation_kwargs(args)), steps)


def cmd_outpaint(args) -> int:
    from .pipelines.images import load_image
    from .pipelines.outpaint import parse_extend

    check_output(args.output)
    if args.size:
        raise InputError("outpaint takes its size from the image and --extend; leave out --size")
    started = time.perf_counter()
    image = load_image(args.init, "init image")
    extend = parse_extend(args.extend)
    steps = denoising_steps(args)
    pipe = load_for(args)
    options = generation_kwargs(args)
    del options["width"], options["height"]
    return run_and_save(args, started, lambda step: pipe.outpaint(
        args.prompt, image, args.negative, extend=extend, overlap=args.overlap, strength=args.strength,
        mask_blur=args.mask_blur, fill=args.fill, callback=step, **options), steps)


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
    generate.add_argument("--attention-maps", metavar="PNG", default=None,
                          help="also write where each word of the prompt was read (cross-attention, first image)")
    generate.set_defaults(run=cmd_generate)

    img2img = commands.add_parser("img2img", help="repaint an image towards a prompt")
    add_generation_options(img2img, default_size="the image's")
    add_init_options(img2img, strength=0.75)
    img2img.set_defaults(run=cmd_img2img)

    inpaint = commands.add_parser("inpaint", help="repaint the white part of a mask")
    add_generation_options(inpaint, default_size="the image's; with --only-masked the model's")
    add_init_options(inpaint, strength=0.75)
    inpaint.add_argument("--mask", required=True, help="mask image: white = repaint, black = keep")
    add_mask_options(inpaint)
    inpaint.add_argument("--only-masked", action="store_true",
                         help="inpaint a box around the mask at --size (default: the model's), paste it back")
    inpaint.add_argument("--padding", type=int, default=32,
                         help="with --only-masked: pixels around the mask (default 32)")
    inpaint.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
    inpaint.set_defaults(run=cmd_inpaint)

    outpaint = commands.add_parser("outpaint", help="extend an image's canvas and paint the new margins")
    add_generation_options(outpaint, default_size="the image's plus --extend; not settable")
    add_init_options(outpaint, strength=0.8, resize=False)
    outpaint.add_argument("--extend", required=True, help="pixels per side, e.g. left=64,right=0,top=0,bottom=64")
    outpaint.add_argument("--overlap", type=int, default=8,
                          help="pixels of the image repainted along the seam (default 8)")
    add_mask_options(outpaint)
    outpaint.set_defaults(run=cmd_outpaint)

    tokenize = commands.add_parser("tokenize", help="show how CLIP's tokenizer splits text")
    tokenize.add_argument("text", nargs="*", help="texts to tokenize; '-' reads one text per line from stdin")
    tokenize.add_argument("--json", action="store_true", help="print a JSON list of id lists, one per input")
    tokenize.set_defaults(run=cmd_tokenize)

    samplers = commands.add_parser("samplers", help="list sampler names and aliases")
    samplers.set_defaults(run=cmd_samplers)

    from .eval.cli import add_eval_command
    from .pipelines.upscale_cli import add_hires_options, add_upscale_command
    from .training.cli import add_train_command

    add_hires_options(generate)
    add_upscale_command(commands)

    add_train_command(commands)
    add_eval_command(commands)
    return parser


def main(argv=None) -> int:
    return run_reporting_errors(build_parser().parse_args(argv))


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


if __name__ == "__main__":
    sys.exit(main())
