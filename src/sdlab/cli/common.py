"""What every `sdlab` command shares: its parser class, the generation options, running a generation
and writing its images, and turning a user's mistake into one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from ..config import DEFAULT_NOISE, DEFAULT_SAMPLER, NOISE_MODES
from ..errors import InputError, SdlabError
from .saving import add_output_options, check_output_options, save_results
from .sizing import add_limit_options

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
            if getattr(namespace, "params_from", None) is not None:
                namespace.given_options = self.options_given(sys.argv[1:] if args is None else args, namespace)
            elif getattr(namespace, "prompt", "") is None:  # optional only beside --params-from
                self.error("the following arguments are required: prompt")
        return namespace, extras

    def options_given(self, args: list, parsed: argparse.Namespace) -> set[str]:
        """The options (by dest) that `args` set, as opposed to their defaults: parsed again into a
        namespace that already holds every dest, so argparse fills in no default. List options (append)
        start empty, the others as a marker no option sets."""
        unset = object()
        namespace = argparse.Namespace(**{dest: [] if isinstance(value, list) else unset
                                          for dest, value in vars(parsed).items()})
        argparse.ArgumentParser.parse_known_args(self, args, namespace)
        # an absent optional positional (the prompt) is set to its default, None
        return {dest for dest, value in vars(namespace).items() if value is not unset and value not in ([], None)}

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        prog = vars(namespace).pop("command_prog")
        if extras:
            # argparse leaves unknown options to the top parser; point at the subcommand they were given to
            self.fail(prog, f"unrecognized arguments: {' '.join(extras)}")
        return namespace


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already names its default or there is
    none to name (argparse's ArgumentDefaultsHelpFormatter adds it even after "(default: ...)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or not action.option_strings or nothing:
            return text
        return f"{text} (default: %(default)s)"


def parse_size(text: str) -> tuple[int, int]:
    """`--size WIDTHxHEIGHT` as (width, height), both positive."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got '{text}'") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, like 512x512, got '{text}'")
    return width, height


def self_attention_scale(text: str) -> float:
    """`--self-attention-scale`: a number above 0, as pipelines.checks wants it, checked before any loading."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: '{text}'") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"the self-attention scale must be above 0 (1: as trained), got {text}")
    return value


def add_self_attention_scale_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--self-attention-scale", type=self_attention_scale, default=1.0, metavar="S", help=help_text)


def guidance_scale(text: str) -> float:
    """`--cfg`: a number, 0 or more (0 ignores the prompt; below 0 would steer away from it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: '{text}'") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"the CFG scale must be 0 or more, got {text}")
    return value


def lora_option(text: str):
    """`--lora FILE[:WEIGHT]`; the adapters (and torch) load only when the option is given."""
    from ..adapters import parse_lora_option

    path, weight = parse_lora_option(text)
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"LoRA file not found: {path}")
    return path, weight


# schedules.SCHEDULE_TYPES' names, spelled out so that building the parser needs no torch (tests/test_cli.py
# checks that they agree)
SCHEDULE_NAMES = ("automatic", "uniform", "karras", "exponential", "sgm-uniform", "simple", "normal", "ddim-uniform",
                  "beta", "align-your-steps")


def schedule_option(text: str) -> str:
    """`--schedule`: a schedule type by its name, the web UI's label or an alias, any case."""
    from ..schedules import resolve_schedule

    try:
        return resolve_schedule(text).key
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def vae_option(text: str) -> str:
    """`--vae FILE`: a VAE file or folder, checked now so a typo fails before the model loads."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"VAE file not found: {text}")
    return text


def fast_option(text: str) -> str:
    """`--fast deepcache:3,tome:0.5`: the opt-in fast modes (sdlab/fast/modes.py), checked and written as
    the images' "Fast" field writes them."""
    from ..fast.modes import parse_fast

    try:
        return parse_fast(text).spec()
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_generation_options(parser: argparse.ArgumentParser, default_size: str = "the model's",
                           kind: str = "txt2img", cfg: float = 7.0, params_from: bool = False) -> None:
    """Options shared by every command that runs the denoising loop; `kind` names its outputs subfolder.
    `params_from`: the command takes --params-from, whose file may give the prompt."""
    prompt_help = ("what the image should show; (word:1.3) emphasises, [word] de-emphasises, [from:to:when] and "
                   "[a|b] edit it across steps, <lora:name:0.8> applies a LoRA")
    if params_from:
        parser.add_argument("prompt", nargs="?", default=None, help=prompt_help + " (default: --params-from's)")
        parser.add_argument("--params-from", default=None, metavar="IMAGE",
                            help="re-run an image: take every setting its parameters name (PNG, JPEG, WebP, as the "
                                 "web UI writes them); options given on the command line win")
    else:
        parser.add_argument("prompt", help=prompt_help)
    add_output_options(parser, kind)
    parser.add_argument("--negative", default="", help="negative prompt: what the image should not show")
    parser.add_argument("--style", action="append", default=[], metavar="NAME",
                        help="apply a style of --styles-file to the prompt and negative prompt, as the web UI does; "
                             "repeatable")
    parser.add_argument("--styles-file", default=None, metavar="CSV",
                        help="the web UI's styles.csv (name,prompt,negative_prompt) (default: styles.csv in the "
                             "current folder)")
    parser.add_argument("--model", default=None,
                        help="checkpoint file (.safetensors/.ckpt), diffusers folder, or 'demo': a tiny model with "
                             "random weights that draws noise, for trying the commands (default: the bundled model "
                             "for the command)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER,
                        help=f"sampler name, see `sdlab samplers` (default: {DEFAULT_SAMPLER})")
    parser.add_argument("--schedule", type=schedule_option, default=None, metavar="TYPE",
                        help=f"schedule type, the web UI's: {', '.join(SCHEDULE_NAMES)} (default: automatic, the "
                             "sampler's own, or the one a name like 'DPM++ 2M Karras' carries)")
    parser.add_argument("--tiling", action="store_true",
                        help="seamless images: the right edge continues into the left, the bottom into the top "
                             "(textures); the VAE then runs untiled")
    add_self_attention_scale_option(parser, "multiply the UNet's self-attention logits by S (default 1: as trained); "
                                    "about 2 on a canvas larger than the model's own draws fewer objects twice "
                                    "(MODEL_CARD.md)")
    parser.add_argument("--vae", type=vae_option, default=None, metavar="FILE",
                        help="a VAE file or diffusers VAE folder whose weights replace the model's VAE (the web "
                             "UI's SD VAE), e.g. vae-ft-mse-840000-ema-pruned.safetensors")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--cfg", type=guidance_scale, default=cfg,
                        help=f"classifier-free guidance scale, 0 or more (default {cfg:g})")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    parser.add_argument("--size", type=parse_size, default=None,
                        help="WIDTHxHEIGHT, multiples of the model's VAE factor: 8 for SD models and the demo, 4 for "
                             f"the bundled model (default: {default_size})")
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--prediction", choices=("epsilon", "v"), default=None,
                        help="override the model's prediction type (SD2 768 models are v)")
    parser.add_argument("--noise", default=DEFAULT_NOISE,
                        help=f"whose random numbers: {', '.join(NOISE_MODES)}. per-image: image i of a batch is the "
                             "image of seed + i alone (the web UI's CPU RNG); the others give the same image as that "
                             f"tool for the same seed, diffusers one generator for the whole batch (default: {DEFAULT_NOISE})")
    parser.add_argument("--clip-skip", type=int, default=1, help="use the text encoder's Nth-last layer (default 1)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta / ancestral noise amount")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: detected)")
    parser.add_argument("--dtype", default=None,
                        help="fp32, bf16, fp16 (default: fp32 on CPUs, devices.default_dtype says why; bf16 only on "
                             "CPUs with native bf16)")
    parser.add_argument("--compile", action="store_true",
                        help="run the UNet through torch.compile (Inductor): the same image, faster steps, but the "
                             "first run compiles for minutes (kept in ~/.cache/sdlab/inductor for later runs)")
    parser.add_argument("--prepack", action="store_true",
                        help="CPU, fp32: reorder the UNet's weights once for oneDNN instead of at every step: the same "
                             "image within fp32 rounding, ~1.2x faster UNet steps, a few seconds more before the first "
                             "step and a second copy of the UNet's weights in memory (3.4 GB for SD 1.5)")
    parser.add_argument("--lowvram", action="store_true",
                        help="keep the text encoder, UNet and VAE in CPU memory, each on the GPU only while it works "
                             "(slower; for GPUs that cannot hold the whole model; nothing changes on the CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--fast", type=fast_option, default=None, metavar="MODE[,MODE]",
                        help="trade the exact image for speed (off by default; quality in "
                             "docs/performance-fast-modes.md): deepcache:N reuses the deep UNet features for N-1 "
                             "of every N steps (deepcache:N:D:S: cached below skip connection D, default 1, and "
                             "only after the first share S of the steps, e.g. deepcache:3:1:0.4), cfg-trunc:F "
                             "drops the unconditional pass after fraction F of the steps, tome:R merges share R of "
                             "the image tokens before self-attention; combine with commas, e.g. deepcache:3,tome:0.5")
    parser.add_argument("--lora", action="append", default=[], type=lora_option, metavar="FILE[:WEIGHT]",
                        help="apply a LoRA (kohya/web UI or diffusers format); repeatable")
    parser.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                        help="where <lora:name:w> prompt tags find their files (by name); repeatable")
    parser.add_argument("--lora-mode", choices=("merge", "dynamic"), default="merge",
                        help="merge LoRAs into the weights (fast) or apply them on the fly")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE_OR_DIR",
                        help="textual-inversion embedding(s) to use by name in prompts; repeatable")
    add_seed_options(parser)
    add_limit_options(parser)


def add_seed_options(parser: argparse.ArgumentParser) -> None:
    """The web UI's variation seeds and batch count."""
    group = parser.add_argument_group("variation seeds and batch count", "the web UI's Extra seed options")
    group.add_argument("--subseed", type=int, default=None, metavar="N",
                       help="variation seed: image i's noise is bent towards the noise of N + i (default: random)")
    group.add_argument("--subseed-strength", type=float, default=0.0, metavar="S",
                       help="how far: 0 is the seed's noise, 1 the variation seed's; every image then keeps --seed")
    group.add_argument("--seed-resize-from", type=parse_size, default=None, metavar="WxH",
                       help="the seed's noise as it is at this size, centred: a seed found at one size keeps its "
                            "composition at another")
    group.add_argument("--n-iter", type=int, default=1, metavar="N",
                       help="batch count: N batches one after another, each --batch images, seeds going on (default 1)")


def seed_kwargs(args) -> dict:
    """The variation seeds and batch count as pipeline keywords."""
    return dict(subseed=args.subseed, subseed_strength=args.subseed_strength, seed_resize_from=args.seed_resize_from,
                n_iter=args.n_iter)


def add_tiled_vae_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiled-vae", action=argparse.BooleanOptionalAction, default=None,
                        help="decode (and encode) in tiles: the same image in about half the memory; default: "
                             "only above a megapixel or when the image would not fit")


def prepare_generation(args) -> None:
    """What every generating command does before its model loads: refuse output options that would fail
    later, and expand --style into the prompt and negative prompt (which the image's parameters then
    carry, as the web UI's do)."""
    check_output_options(args)
    if getattr(args, "prepack", False) and getattr(args, "compile", False):
        raise InputError("--prepack and --compile both prepare the UNet's weights for the CPU: use one")
    if args.style:
        from ..styles import apply_styles, default_styles_file, load_styles

        path = args.styles_file or default_styles_file()
        if path is None:
            raise InputError("--style needs a styles file: give --styles-file or put styles.csv in the current folder")
        args.prompt, args.negative = apply_styles(args.prompt, args.negative, args.style, load_styles(path))


# pipeline keyword (pipelines.from_params) -> the command-line option that sets it
_OPTION_OF_SETTING = {
    "prompt": "prompt", "negative_prompt": "negative", "steps": "steps", "guidance_scale": "cfg", "seed": "seed",
    "sampler": "sampler", "schedule_type": "schedule", "tiling": "tiling", "noise": "noise", "clip_skip": "clip_skip",
    "eta": "eta", "subseed": "subseed", "subseed_strength": "subseed_strength",
    "seed_resize_from": "seed_resize_from", "strength": "strength", "resize_mode": "resize_mode",
    "mask_blur": "mask_blur", "only_masked": "only_masked", "padding": "padding", "invert_mask": "invert_mask",
    "hires_scale": "hires_scale", "hires_strength": "hires_strength", "hires_steps": "hires_steps",
    "hires_upscaler": "hires_upscaler", "prediction": "prediction", "self_attention_scale": "self_attention_scale",
}


def apply_params_from(args) -> None:
    """--params-from IMAGE: the image's parameters become the options the command line left out. Fields
    this command has no option for, and values sdlab cannot use, are said in one line each."""
    if args.params_from is None:
        return
    from ..outputs import read_parameters
    from ..pipelines.from_params import options_from_infotext

    check_image_file(args.params_from, "--params-from")
    text = read_parameters(args.params_from)
    if not text:
        raise InputError(f"{args.params_from} carries no generation parameters; give an image sdlab or the web "
                         "UI wrote with its parameters")
    settings, hires, model, notes = options_from_infotext(text)
    settings = {**settings, **(hires or {})}
    if "prediction" in model:
        settings["prediction"] = model["prediction"]
    if "width" in settings:
        settings["size"] = (settings.pop("width"), settings.pop("height"))
    if "fill" in settings:
        settings["fill"] = settings["fill"].replace(" ", "-")  # the --fill choices' spelling
    unused = []
    for name, value in settings.items():
        option = _OPTION_OF_SETTING.get(name, name)
        if not hasattr(args, option):
            unused.append(name)
        elif option not in args.given_options:
            setattr(args, option, value)
    if unused:
        notes.append(f"settings this command does not take: {', '.join(unused)}")
    args.params_model = model
    for note in notes:
        print(f"sdlab: note: {args.params_from}: {note}", file=sys.stderr)


def warn_if_other_model(args, pipe) -> None:
    """--params-from names a model other than the loaded one: one warning line, the run goes on."""
    model = getattr(args, "params_model", None)
    if not model or ("hash" not in model and "name" not in model):
        return
    same = model["hash"] == pipe.model_hash if "hash" in model else model["name"] == pipe.model_name
    if not same:
        named = " ".join(v for v in (model.get("name"), model.get("hash") and f"[{model['hash']}]") if v)
        print(f"sdlab: warning: {args.params_from} was made with model {named}; this run uses {pipe.model_name} "
              f"[{pipe.model_hash}]", file=sys.stderr)


def check_image_file(path: str, what: str) -> None:
    """A folder given where an image belongs says so (opening it would say 'not found')."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a directory; give an image file")


def progress_callback(total: int, quiet: bool, desc: str = "sampling ", images: int = 1):
    """A step callback and its closer: one bar over every image's steps (`images` per step, the batch
    being denoised together), drawn before the work starts."""
    from ..progress import ProgressBar

    if quiet:
        return None, lambda: None
    bar = ProgressBar(total * images, desc)
    return (lambda info: bar.update(images)), bar.close


def load_for(args, task: str = "txt2img", sizes=None, checked: Optional[bool] = None):
    """The model for `task`, once the request is known to fit: `sizes(config)` lists every image size
    the command will make (default: --size, else the model's own), checked against the limits and the
    free memory before the weights load (sizing.py), or after, for a model only loading can describe.
    `checked`: refuse_too_large has already run (commands that check before reading their images)."""
    from .. import load
    from ..adapters import load_embeddings
    from .sizing import check_fits, model_path, refuse_too_large

    sizes = sizes or (lambda config: [args.size or (config.resolution, config.resolution)])
    path = model_path(args, task)
    if checked is None:
        checked = refuse_too_large(args, task, sizes)
    if not args.quiet:
        print(f"loading {os.path.basename(os.path.normpath(path))} ...", file=sys.stderr, flush=True)
    pipe = load(path, prediction=args.prediction, device=args.device, dtype=args.dtype, task=task, vae=args.vae,
                lowvram=getattr(args, "lowvram", False))
    if not checked:
        check_fits(args, pipe.config, sizes(pipe.config), pipe.device, pipe.dtype, weights_loaded=True)
    if args.embedding:
        load_embeddings(pipe.text_encoder, args.embedding)
    warn_if_other_model(args, pipe)
    return pipe


def run_and_save(args, started: float, run, steps: int, save=None) -> int:
    """Run `run(callback)` under a progress bar of `steps` steps of the whole batch, --n-iter batches, and
    write its images with their parameters (`save(args, result)` -> paths; default save_results)."""
    step, close = progress_callback(steps * getattr(args, "n_iter", 1), args.quiet, images=args.batch)
    try:
        result = run(step)
    finally:
        close()
    for path in (save or save_results)(args, result):
        print(f"wrote {path}")
    print(f"seed {result.seeds[0]}, {time.perf_counter() - started:.1f}s{peak_memory_note()}", file=sys.stderr)
    return 0


def peak_memory_note() -> str:
    """", peak RSS 412 MiB" (and the GPU's peak where one ran): what the run held at most."""
    import torch

    from ..memory import gib, peak_rss_bytes

    peak = peak_rss_bytes()
    note = f", peak RSS {gib(peak)}" if peak else ""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        note += f", peak GPU {gib(torch.cuda.max_memory_allocated())}"
    return note


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
