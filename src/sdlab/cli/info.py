"""`sdlab tokenize` and `sdlab samplers`: the commands that show how sdlab reads its input."""

from __future__ import annotations

import json
import sys

from ..errors import InputError


def add_info_commands(commands) -> None:
    tokenize = commands.add_parser("tokenize", help="show how CLIP's tokenizer splits text, and what the text "
                                                    "encoder receives of a prompt with (emphasis:1.3) or BREAK")
    tokenize.add_argument("text", nargs="*", help="texts to tokenize; '-' reads one text per line from stdin")
    tokenize.add_argument("--json", action="store_true", help="print a JSON list of id lists, one per input")
    tokenize.set_defaults(run=cmd_tokenize)

    samplers = commands.add_parser("samplers", help="list sampler names and aliases, and the schedule types")
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
        received = encoder_input(text, tokenizer)
        written = " as written" if received is not None else ""
        print(f"{text!r}: {len(ids)} tokens{written}")
        for token_id, token in zip(ids, tokenizer.token_strings(ids)):
            print(f"  {token_id:>6}  {token}")
        if received is not None:
            print_encoder_input(text, received, tokenizer)
    return 0


# characters a prompt needs before emphasis or BREAK can change what the encoder receives
_PROMPT_SYNTAX = ("(", ")", "[", "]", "BREAK")


def encoder_input(text: str, tokenizer) -> list[tuple[int, float] | None] | None:
    """The (token id, weight) pairs the text encoder receives for a prompt, as the generating commands read
    it (sdlab.prompts): emphasis brackets and weights are taken out and become weights; None marks a BREAK.
    None when the prompt has no such syntax and the encoder receives exactly its tokens, all of weight 1."""
    if not any(mark in text for mark in _PROMPT_SYNTAX):
        return None  # plain text: no need to load sdlab.prompts (and torch)
    from ..prompts import BREAK, parse_prompt_attention

    received: list[tuple[int, float] | None] = []
    for part, weight in parse_prompt_attention(text):
        if (part, weight) == BREAK:
            received.append(None)
        else:
            received.extend((token_id, weight) for token_id in tokenizer.encode(part))
    if received == [(token_id, 1.0) for token_id in tokenizer.encode(text)]:
        return None
    return received


def print_encoder_input(text: str, received: list, tokenizer) -> None:
    from ..prompts import tokenize_weighted

    tokens = [pair for pair in received if pair is not None]
    words = " ".join("BREAK" if pair is None else tokenizer.decode([pair[0]]) + _times(pair[1]) for pair in received)
    chunks = len(tokenize_weighted(text, tokenizer))
    print(f"encoder input (weights applied): {words}")
    print(f"  {len(tokens)} tokens in {chunks} chunk{'s' if chunks > 1 else ''} of 75")
    for token_id, weight in tokens:
        print(f"  {token_id:>6}  {tokenizer.token_strings([token_id])[0]:<16} {_times(weight) or '×1'}")


def _times(weight: float) -> str:
    return "" if weight == 1.0 else f"×{weight:.3g}"


def cmd_samplers(args) -> int:
    from ..samplers import list_samplers
    from ..schedules import list_schedules

    for name, aliases in list_samplers():
        print(f"{name:<20} {', '.join(aliases)}")
    print("\nschedule types (--schedule; the PNG's 'Schedule type'):")
    for key, label in list_schedules():
        print(f"{key:<20} {label}")
    return 0
