"""`sdlab train vae|text|unet|inpaint|upscale|dreambooth|lora|textual-inversion|dpo`: the command line
of the training loop.

    sdlab train vae  --data shapes --model-config recipes/shapes-model.json --out runs/vae
    sdlab train text --data shapes --base runs/vae/last.safetensors --out runs/text
    sdlab train unet --data shapes --base runs/text/last.safetensors --out runs/unet
    torchrun --nproc_per_node 2 -m sdlab.training unet --config recipes/shapes-unet.toml
    sdlab train lora --base model.safetensors --data photos/ --out runs/lora --set lora.rank=8
    sdlab train textual-inversion --base model.safetensors --data cat/ --out runs/ti --set textual_inversion.token=my-cat
    sdlab train dreambooth --base model.safetensors --data dog/ --out runs/db --set "dreambooth.class_prompt=a dog"
    sdlab train inpaint|upscale --base model.safetensors --data photos/ --out runs/inpaint

Flags override the --config recipe; `--set section.key=value` reaches any other key.
"""

from __future__ import annotations

import argparse
import sys

from .. import shapes  # noqa: F401  the bundled model's trainers, data and [shapes] section register themselves
from ..errors import ConfigError
from ..training.config import TRAINER_OPTIONS, load_config, parse_assignment
from .common import CommandParser, run_reporting_errors

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

# flag destination -> recipe key
FLAG_KEYS = {
    "data": "data", "base": "base", "out": "out", "model_config": "model", "steps": "steps",
    "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "seed": "seed",
    "resolution": "resolution", "precision": "precision", "grad_checkpointing": "gradient_checkpointing",
    "checkpoint_every": "checkpoint_every", "validate_every": "validate_every", "num_workers": "num_workers",
    "device": "device", "ema_decay": "ema_decay", "init_from_base": "init_from_base",
    "shard_optimizer": "shard_optimizer", "shard_model": "shard_model",
}


def add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML recipe (see recipes/); flags override it")
    parser.add_argument("--data", help="folder of images with same-named .txt captions, or 'shapes'")
    parser.add_argument("--base", help="checkpoint providing the parts this run does not train (required by unet); "
                        "not 'demo', whose weights are random")
    parser.add_argument("--out", help="run folder: checkpoints, validation/, loss.png, last.safetensors")
    parser.add_argument("--model-config", help="model sizes: a preset (sd1, sd2-base, sd2-v) or a ModelConfig JSON file")
    parser.add_argument("--steps", type=int, help="optimizer steps in all")
    parser.add_argument("--batch-size", type=int, help="GLOBAL batch per step, over all processes and --grad-accum")
    parser.add_argument("--grad-accum", type=int, help="micro-batches accumulated per step")
    parser.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    parser.add_argument("--seed", type=int, help="seed of the initial weights, data order and noise")
    parser.add_argument("--resolution", type=int, help="training image side in pixels")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="autocast dtype (auto: bf16/fp16 on GPU)")
    parser.add_argument("--grad-checkpointing", action="store_const", const=True, help="recompute activations in backward")
    parser.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints")
    parser.add_argument("--validate-every", type=int, help="steps between validation grids (0: at the end only)")
    parser.add_argument("--num-workers", type=int, help="DataLoader processes decoding images")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if present)")
    parser.add_argument("--shard-optimizer", action="store_const", const=True,
                        help="under torchrun, split the AdamW state over the processes (ZeRO stage 1)")
    parser.add_argument("--shard-model", action="store_const", const=True,
                        help="under torchrun, split the weights, gradients, AdamW state and EMA too (FSDP, ZeRO stage 3; UNet trainers)")
    parser.add_argument("--ema-decay", type=float, help="EMA decay of the saved weights (0: no EMA)")
    parser.add_argument("--init-from-base", action="store_const", const=True, help="fine-tune --base's part instead of starting fresh")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any recipe key, e.g. --set unet.min_snr_gamma=5 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train_command(subparsers) -> None:
    """Register `train vae|text|...|dpo` on an argparse subparsers object (sdlab's main parser's)."""
    train = subparsers.add_parser("train", help=f"train a model part or adapter: {', '.join(TRAINER_HELP)} "
                                                "(CPU, GPU, torchrun)")
    trainers = train.add_subparsers(dest="trainer", required=True, metavar="{" + ",".join(TRAINER_HELP) + "}")
    for name, help_text in TRAINER_HELP.items():
        parser = trainers.add_parser(name, help=help_text, description=help_text)
        add_train_options(parser)
        parser.set_defaults(run=run_train)


def config_from_args(args):
    overrides = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items()}
    overrides.update(parse_assignment(text) for text in args.set)
    config = load_config(args.trainer, args.config, overrides)
    if config.base == "demo":
        from ..bundled import BUNDLED_MODEL

        # the demo's VAE and text encoder are random: nothing trained on them could be used
        raise ConfigError(f"'demo' is not a base to train on: its weights are random. Give --base a checkpoint file, "
                          f"e.g. the bundled model {BUNDLED_MODEL} or a run's last.safetensors")
    return config


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
