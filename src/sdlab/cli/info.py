"""`sdlab tokenize` and `sdlab samplers`: the commands that show how sdlab reads its input."""

from __future__ import annotations

import json
import sys

from ..errors import InputError


def add_info_commands(commands) -> None:
    tokenize = commands.add_parser("tokenize", help="show how CLIP's tokenizer splits text")
    tokenize.add_argument("text", nargs="*", help="texts to tokenize; '-' reads one text per line from stdin")
    tokenize.add_argument("--json", action="store_true", help="print a JSON list of id lists, one per input")
    tokenize.set_defaults(run=cmd_tokenize)

    samplers = commands.add_parser("samplers", help="list sampler names and aliases")
    samplers.set_defaults(run=cmd_samplers)


def cmd_tokenize(args) -> int:
    from ..tokenizer import get_tokenizer

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
    from ..samplers import list_samplers

    for name, aliases in list_samplers():
        print(f"{name:<20} {', '.join(aliases)}")
    return 0
