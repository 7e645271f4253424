"""The `sdlab` command. User errors print one line and exit non-zero; never a traceback.

Each command lives in a module of its own and registers itself on the subcommand table below; the
modules share only common.py and never import this file. A run imports only the module of the command
it names (`sdlab generate` never loads the trainers' recipes or the server): start-up is part of every
image's wait. `sdlab --help`, or a word that is no command, registers them all.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from .. import __version__
from .common import CommandParser, run_reporting_errors

# (module, its registering function, the commands it adds), in the order `sdlab --help` lists them
COMMAND_MODULES = (
    ("generate", "add_generate_commands", ("generate", "img2img", "inpaint", "outpaint")),
    ("info", "add_info_commands", ("tokenize", "samplers")),
    ("upscale", "add_upscale_command", ("upscale",)),
    ("train", "add_train_command", ("train",)),
    ("eval", "add_eval_command", ("eval",)),
    ("serve", "add_serve_command", ("serve",)),
    ("inside", "add_inside_commands", ("noise", "schedule", "latents", "interpolate")),
    ("embeddings", "add_embeddings_command", ("embeddings",)),
    ("digits", "add_digits_command", ("digits",)),
    ("edit", "add_edit_command", ("edit",)),  # prompt-to-prompt
    ("attention", "add_attention_command", ("attention",)),  # per-word attention maps
)


def build_parser(command: Optional[str] = None) -> CommandParser:
    """The `sdlab` parser: with `command`, only the module that defines it is imported and registered;
    without, or for an unknown word, every command (for --help and the list of choices)."""
    parser = CommandParser(prog="sdlab", description="Stable Diffusion from scratch: generate, inspect, train.")
    parser.add_argument("--version", action="version", version=f"sdlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    chosen = [entry for entry in COMMAND_MODULES if command in entry[2]] or COMMAND_MODULES
    for module, register, _ in chosen:
        getattr(importlib.import_module(f"{__name__}.{module}"), register)(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_reporting_errors(build_parser(argv[0] if argv else None).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
