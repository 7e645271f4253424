"""The `sdlab` command. User errors print one line and exit non-zero; never a traceback.

Each command lives in a module of its own and registers itself on the subcommand table below; the
modules share only common.py and never import this file.
"""

from __future__ import annotations

import sys

from .. import __version__
from .common import CommandParser, run_reporting_errors
from .attention import add_attention_command
from .edit import add_edit_command
from .digits import add_digits_command
from .embeddings import add_embeddings_command
from .eval import add_eval_command
from .generate import add_generate_commands
from .info import add_info_commands
from .inside import add_inside_commands
from .serve import add_serve_command
from .train import add_train_command
from .upscale import add_upscale_command


def build_parser() -> CommandParser:
    parser = CommandParser(prog="sdlab", description="Stable Diffusion from scratch: generate, inspect, train.")
    parser.add_argument("--version", action="version", version=f"sdlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_commands(commands)  # generate, img2img, inpaint, outpaint
    add_info_commands(commands)  # tokenize, samplers
    add_upscale_command(commands)
    add_train_command(commands)
    add_eval_command(commands)
    add_serve_command(commands)
    add_inside_commands(commands)  # noise, schedule, latents, interpolate
    add_embeddings_command(commands)  # embeddings nearest, map, export
    add_digits_command(commands)  # digits train, draw, eval
    add_edit_command(commands)  # prompt-to-prompt
    add_attention_command(commands)  # per-word attention maps
    return parser


def main(argv=None) -> int:
    return run_reporting_errors(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
