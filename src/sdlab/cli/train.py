"""`sdlab train vae|text|unet|inpaint|upscale|dreambooth|lora|textual-inversion|dpo`: the command line
of the training loop.

    sdlab train vae  --data shapes --model-config recipes/shapes-model.json --out runs/vae
    sdlab train text --data shapes --base runs/vae/last.safetensors --out runs/text
    sdlab train unet --data shapes --base runs/text/last.safetensors --out runs/unet
    torchrun --nproc_per_node 2 -m sdlab.training unet --config recipes/shapes-unet.toml
    sdlab train lora --data photos/ --out runs/lora --rank 8                      # on the bundled model
    sdlab train textual-inversion --base model.safetensors --data cat/ --out runs/ti --token my-cat
    sdlab train dreambooth --base model.safetensors --data dog/ --out runs/db --set "dreambooth.class_prompt=a dog"
    sdlab train inpaint|upscale --base bundled --data photos/ --out runs/inpaint

Flags override the --config recipe; `--set section.key=value` reaches any other key. lora, textual-inversion,
dreambooth and dpo fine-tune the bundled model when --base is not given. A run prints its resolved settings
and writes them to OUT/config.toml, which --config reads back.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .. import shapes  # noqa: F401  the bundled model's trainers, data and [shapes] section register themselves
from ..training.config import (
    BUNDLED_BASE_TRAINERS, TRAINER_OPTIONS, TrainConfig, load_config, parse_assignment,
)
from .common import CommandParser, DefaultsHelpFormatter, run_reporting_errors

TRAINER_HELP = {
    "vae": "the KL autoencoder: reconstruction + KL (+ PatchGAN), then its latent scaling factor",
    "text": "the text encoder, contrastively against a small image tower (CLIP's loss)",
    "unet": "the denoising UNet on --base's frozen VAE and text encoder",
    "lora": "low-rank adapters on --base (kohya/web UI and diffusers LoRA files)",
    "textual-inversion": "new token vectors for a new pseudo-word (web UI embedding file)",
    "dreambooth": "fine-tune --base on a few images of a subject, with prior preservation",
    "inpaint": "a 9-channel inpainting UNet grown from --base's UNet",
    "upscale": "an x4-upscaler-style UNet conditioned on the 4x smaller image",
    "dpo": "preference fine-tuning of --base's UNet on its own shapes pictures, judged right or wrong (Diffusion-DPO)",
}

# The flags every trainer takes: (flag, recipe key, help, argparse keywords). A flag is an override of
# its key, the same as `--set KEY=VALUE`; its help ends with the key's default, read from the recipe
# dataclasses (those whose default is unset say in their help what unset means).
COMMON_FLAGS = [
    ("--data", "data", "folder of images with same-named .txt captions, or 'shapes'", {}),
    ("--out", "out", "run folder: config.toml, checkpoints, validation/, loss.png, last.safetensors "
                     "(default: runs/TRAINER)", {}),
    ("--model-config", "model", "model sizes: a preset (sd1, sd2-base, sd2-v) or a ModelConfig JSON file "
                                "(default: --base's, else sd1)", {}),
    ("--steps", "steps", "optimizer steps in all", {"type": int}),
    ("--batch-size", "batch_size", "GLOBAL batch per step, over all processes and --grad-accum", {"type": int}),
    ("--grad-accum", "grad_accum", "micro-batches accumulated per step", {"type": int}),
    ("--lr", "lr", "peak learning rate (AdamW)", {"type": float}),
    ("--seed", "seed", "seed of the initial weights, data order and noise", {"type": int}),
    ("--resolution", "resolution", "training image side in pixels (default: the model config's)", {"type": int}),
    ("--precision", "precision", "autocast dtype (auto: bf16/fp16 on GPU, fp32 on CPU)",
     {"choices": ("auto", "fp32", "bf16", "fp16")}),
    ("--grad-checkpointing", "gradient_checkpointing", "recompute activations in backward",
     {"action": "store_const", "const": True}),
    ("--checkpoint-every", "checkpoint_every", "steps between resumable checkpoints", {"type": int}),
    ("--validate-every", "validate_every", "steps between validation grids (0: at the end only)", {"type": int}),
    ("--num-workers", "num_workers", "DataLoader processes decoding images", {"type": int}),
    ("--buckets", "buckets", "aspect-ratio buckets for folder data (kohya's): images grouped by similar aspect and "
                             "size, each batch from one bucket", {"action": "store_const", "const": True}),
    ("--min-bucket-reso", "min_bucket_reso", "smallest bucket side in pixels (default: half the resolution)",
     {"type": int}),
    ("--max-bucket-reso", "max_bucket_reso", "largest bucket side; buckets hold at most its square in pixels "
                                             "(default: the resolution)", {"type": int}),
    ("--device", "device", "cpu, cuda, cuda:N (default: cuda if present, else cpu)", {}),
    ("--shard-optimizer", "shard_optimizer", "under torchrun, split the AdamW state over the processes (ZeRO stage 1)",
     {"action": "store_const", "const": True}),
    ("--shard-model", "shard_model", "under torchrun, split the weights, gradients, AdamW state and EMA too "
                                     "(FSDP, ZeRO stage 3; UNet trainers)", {"action": "store_const", "const": True}),
    ("--ema-decay", "ema_decay", "EMA decay of the saved weights, 0: no EMA (default: 0.9999 for unet, "
                                 "none for the others)", {"type": float}),
    ("--init-from-base", "init_from_base", "fine-tune --base's part instead of starting fresh",
     {"action": "store_const", "const": True}),
]
# each trainer's own flags, keys in its [section]
TRAINER_FLAGS = {
    "lora": [
        ("--rank", "lora.rank", "r: the inner width of each adapter's up @ down", {"type": int}),
        ("--alpha", "lora.alpha", "the update is scaled by alpha / rank (kohya's network_alpha)", {"type": float}),
        ("--dropout", "lora.dropout", "probability of leaving out each rank component of the update in a training "
                                      "step (kohya's rank_dropout)", {"type": float}),
    ],
    "textual_inversion": [
        ("--token", "textual_inversion.token", "the new pseudo-word: the embedding's name, written in prompts "
                                               "and in captions", {}),
        ("--init-word", "textual_inversion.init_word", "the vectors start as this word's token embedding(s)", {}),
        ("--vectors", "textual_inversion.vectors", "vectors per use of the pseudo-word", {"type": int}),
    ],
}


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def trainer_flags(trainer: str) -> list:
    return COMMON_FLAGS + TRAINER_FLAGS.get(trainer.replace("-", "_"), [])


def recipe_default(key: str):
    """The dataclass default of a recipe key ("steps", "lora.rank")."""
    section, _, name = key.rpartition(".")
    fields = dataclasses.fields(TRAINER_OPTIONS[section] if section else TrainConfig)
    return next(field.default for field in fields if field.name == name)


def default_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return str(value)


def with_default(help_text: str, key: str) -> str:
    """`help_text` ending with the key's default, unless it names it already; '%' escaped for argparse."""
    if "default" not in help_text:
        help_text += f" (default: {default_text(recipe_default(key))})"
    return help_text.replace("%", "%%")


def base_help(trainer: str) -> str:
    what = "checkpoint providing the parts this run does not train, or 'bundled': the model that ships with sdlab " \
           "(not 'demo', whose weights are random)"
    if trainer.replace("-", "_") in BUNDLED_BASE_TRAINERS:
        return f"the model to fine-tune: a {what} (default: bundled)"
    needed = "; unet needs one" if trainer == "unet" else ""
    return f"a {what} (default: none: every part but the trained one starts fresh{needed})"


def add_train_options(parser: argparse.ArgumentParser, trainer: str) -> None:
    parser.add_argument("--config", help="TOML recipe (see recipes/, or a run's OUT/config.toml); flags override it "
                                         "(default: none: the defaults shown here)")
    parser.add_argument("--base", help=base_help(trainer))
    for flag, key, help_text, keywords in trainer_flags(trainer):
        parser.add_argument(flag, dest=dest(flag), help=with_default(help_text, key), **keywords)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any recipe key, e.g. --set unet.min_snr_gamma=5 (repeatable; default: none)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint (default: off)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no settings at the start (default: off)")


def add_train_command(subparsers) -> None:
    """Register `train vae|text|...|dpo` on an argparse subparsers object (sdlab's main parser's)."""
    train = subparsers.add_parser("train", help=f"train a model part or adapter: {', '.join(TRAINER_HELP)} "
                                                "(CPU, GPU, torchrun)")
    trainers = train.add_subparsers(dest="trainer", required=True, metavar="{" + ",".join(TRAINER_HELP) + "}")
    for name, help_text in TRAINER_HELP.items():
        parser = trainers.add_parser(name, help=help_text, description=help_text,
                                     formatter_class=DefaultsHelpFormatter)
        add_train_options(parser, name)
        parser.set_defaults(run=run_train)


def config_from_args(args):
    overrides = {"base": args.base}
    overrides.update({key: getattr(args, dest(flag)) for flag, key, _, _ in trainer_flags(args.trainer)})
    overrides.update(parse_assignment(text) for text in args.set)
    return load_config(args.trainer, args.config, overrides)


def run_train(args) -> int:
    from ..training.loop import train

    train(config_from_args(args), resume=args.resume, quiet=args.quiet)
    return 0


def main(argv=None) -> int:
    """`python -m sdlab.training [train] vae|text|unet|... ...`, also as each process of torchrun."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and (argv[0] in TRAINER_OPTIONS or argv[0] in TRAINER_HELP):
        argv = ["train", *argv]
    parser = CommandParser(prog="python -m sdlab.training", description="sdlab's training loop")
    add_train_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_reporting_errors(args, "sdlab: interrupted; the last checkpoint is intact, continue with --resume")
