"""Prompts the way the popular SD web UI (AUTOMATIC1111) reads them: emphasis, 75-token chunks, BREAK,
textual-inversion embeddings and prompt editing.

    parse_prompt_attention   "a (red:1.3) cat"  ->  [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]
    tokenize_weighted        -> chunks of 77 ids and 77 weights: [start, 75 tokens or padding, end]
    encode_prompts           -> text_embeddings (B, 77 * n_chunks, D), every chunk encoded on its own
    prompt_schedule          "a [fantasy:cyberpunk:16] landscape", 20 -> [(16, "a fantasy landscape"),
                                                                           (20, "a cyberpunk landscape")]
    encode_conditioning      -> ScheduledConditioning for cond and uncond: the embeddings of every step

Emphasis: `(text)` multiplies the weight by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies
it by 1.3; nesting multiplies; `\\(`, `\\)`, `\\[`, `\\]` are literal brackets. Brackets left open
apply to the rest of the prompt, a closing bracket with nothing open is plain text.

Weighting follows the web UI's "Original" emphasis: each token's hidden state is multiplied by its
weight, then the chunk is rescaled so its mean equals the mean before weighting. The web UI takes
that mean over the whole batch of one chunk index; here it is taken per prompt, so a prompt's
embedding does not depend on what it is batched with (the two agree for a single prompt). A chunk
whose weights are all 1 is returned as the encoder gave it, bit for bit.

Two deliberate differences from the web UI: `BREAK` inside brackets still starts a new chunk (the web
UI multiplies its marker and then encodes the word "break"), and a malformed weight such as
`(word:1.2.3)` is kept as text instead of raising.

Textual-inversion embeddings (adapters/embeddings.py) registered on the text encoder are found by
their name's tokens, as the web UI finds them, and take as many token positions as they have vectors;
an embedding never straddles two chunks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import InputError
from .tokenizer import CHUNK_LENGTH, END_ID, START_ID, Tokenizer, get_tokenizer

COMMA_BACKTRACK = 20  # the web UI's default "comma padding backtrack", in tokens
ROUND_MULTIPLIER = 1.1  # (text)
SQUARE_MULTIPLIER = 1 / 1.1  # [text]
BREAK = ("BREAK", -1.0)  # the marker parse_prompt_attention emits for the BREAK keyword, as the web UI does

# One token of emphasis syntax per match: escaped brackets and backslashes, openers, a `:weight)`
# closer (group 1 is the weight), plain closers, runs of plain text, and a lone ':'.
_ATTENTION_RE = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; adjacent runs of equal weight are merged.

    'an (important) word' -> [('an ', 1.0), ('important', 1.1), (' word', 1.0)]. A BREAK keyword
    becomes the `BREAK` marker. The empty prompt is [('', 1.0)].
    """
    runs: list[list] = []  # [text, weight, is_break]; weights are multiplied in place as brackets close
    open_round: list[int] = []  # index into `runs` where each still-open bracket started
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            if not run[2]:
                run[1] *= multiplier

    for match in _ATTENTION_RE.finditer(text):
        token, weight = match.group(0), _as_float(match.group(1))
        if token.startswith("\\"):
            runs.append([token[1:], 1.0, False])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), weight)
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_RE.split(token)):
                if i > 0:
                    runs.append([BREAK[0], BREAK[1], True])
                runs.append([part, 1.0, False])
    for start in open_round:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for run in runs:
        if merged and not run[2] and not merged[-1][2] and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w, _ in merged] or [("", 1.0)]


def _as_float(text: Optional[str]) -> Optional[float]:
    try:
        return None if text is None else float(text)
    except ValueError:  # '1.2.3' or '.' match the weight pattern but are no number: treat as text
        return None


# -- chunks --------------------------------------------------------------------------------------------


@dataclass
class PromptChunk:
    """One 77-token window: ids [start, tokens..., end, padding...] and one weight per id."""

    ids: list[int]
    weights: list[float]


def make_chunk(ids: Sequence[int], weights: Sequence[float], pad_token_id: int = END_ID) -> PromptChunk:
    """Wrap up to 75 tokens as [start, tokens, end, pad...]; special tokens and padding weigh 1.

    With SD1's padding (the end token) this is the web UI's chunk; with SD2's (0) the end token
    directly follows the text, as in open_clip and diffusers (the web UI writes the same ids).
    """
    padding = CHUNK_LENGTH - len(ids)
    return PromptChunk(
        ids=[START_ID, *ids, END_ID] + [pad_token_id] * padding,
        weights=[1.0, *weights, 1.0] + [1.0] * padding,
    )


def tokenize_weighted(prompt: str, tokenizer: Optional[Tokenizer] = None, pad_token_id: int = END_ID,
                      embeddings=None) -> list[PromptChunk]:
    """The prompt's chunks of 77 ids and weights, split as the web UI splits them.

    A chunk holds 75 tokens. When a token would overflow it and the last comma of the chunk is
    among its last 20 tokens, the words after that comma move to the next chunk (so a phrase stays
    together) and the chunk is padded. BREAK closes the current chunk. The empty prompt is one
    chunk of padding.

    `embeddings` (adapters.embeddings.EmbeddingLookup) has `match(tokens, position)`, which returns
    (vector ids, tokens of the name) where an embedding's name starts, else None. The vector ids
    replace the name; they move whole to the next chunk when they do not fit.
    """
    tokenizer = tokenizer or get_tokenizer()
    comma_id = tokenizer.vocab[",</w>"]
    chunks: list[PromptChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # position of the last comma in the current chunk

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(make_chunk(ids, weights, pad_token_id))
        ids, weights, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(prompt):
        if (text, weight) == BREAK:
            close_chunk()
            continue
        tokens = tokenizer.encode(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_id:
                last_comma = len(ids)
            elif len(ids) == CHUNK_LENGTH and last_comma != -1 and CHUNK_LENGTH - last_comma <= COMMA_BACKTRACK:
                moved = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close_chunk()
                ids, weights = moved
            if len(ids) == CHUNK_LENGTH:
                close_chunk()
            hit = embeddings.match(tokens, position) if embeddings is not None else None
            if hit is None:
                ids.append(token)
                weights.append(weight)
                position += 1
                continue
            vector_ids, consumed = hit
            if len(ids) + len(vector_ids) > CHUNK_LENGTH:
                close_chunk()
            ids.extend(vector_ids)
            weights.extend([weight] * len(vector_ids))
            position += consumed
    if ids or not chunks:
        close_chunk()
    return chunks


# -- encoding ------------------------------------------------------------------------------------------


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's hidden state by its weight and restore each prompt's mean.

    hidden (B, 77, D), weights (B, 77). Rows whose weights are all 1 come back untouched.
    """
    weighted_rows = (weights != 1).any(dim=1)  # (B,)
    if not weighted_rows.any():
        return hidden
    h = hidden.float()  # fp16 means of 77 * 1024 values lose digits
    original_mean = h.mean(dim=(1, 2), keepdim=True)
    weighted = h * weights.to(h)[..., None]
    weighted = weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))
    return torch.where(weighted_rows[:, None, None].to(hidden.device), weighted.to(hidden.dtype), hidden)


def _encode_chunks(text_encoder: torch.nn.Module, chunks: Sequence[PromptChunk], clip_skip: int) -> torch.Tensor:
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=device)  # (B, 77)
    weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32, device=device)
    return apply_weights(text_encoder(ids, clip_skip=clip_skip), weights)  # (B, 77, D)


def encode_prompts(text_encoder: torch.nn.Module, prompts: Sequence[str], clip_skip: int = 1) -> torch.Tensor:
    """text_embeddings (B, 77 * n, D) for the prompts, each padded with empty chunks to the longest.

    `text_encoder(input_ids, clip_skip)` maps (B, 77) ids to (B, 77, D) hidden states, final layer
    norm applied; its `config` (a TextConfig) gives the padding id. Repeated prompts are encoded once.
    Embeddings loaded onto the encoder (adapters.embeddings) are recognised by name.
    Gradients flow (for training); inference callers wrap this in torch.no_grad().
    """
    from .adapters.embeddings import embedding_lookup

    if isinstance(prompts, str) or not prompts:
        raise InputError("encode_prompts takes a non-empty list of prompt strings")
    tokenizer = get_tokenizer()
    pad_token_id = text_encoder.config.pad_token_id
    lookup = embedding_lookup(text_encoder)
    unique = list(dict.fromkeys(prompts))
    chunked = [tokenize_weighted(p, tokenizer, pad_token_id, lookup) for p in unique]
    empty = make_chunk([], [], pad_token_id)
    n_chunks = max(len(c) for c in chunked)
    parts = [
        _encode_chunks(text_encoder, [c[i] if i < len(c) else empty for c in chunked], clip_skip)
        for i in range(n_chunks)
    ]
    text_embeddings = torch.cat(parts, dim=1)  # (unique, 77 * n, D)
    return text_embeddings[[unique.index(p) for p in prompts]]


def encode_empty_chunk(text_encoder: torch.nn.Module, clip_skip: int = 1) -> torch.Tensor:
    """(1, 77, D): the encoding of the empty prompt, which pads shorter conditionings."""
    return _encode_chunks(text_encoder, [make_chunk([], [], text_encoder.config.pad_token_id)], clip_skip)


def pad_to_chunks(text_embeddings: torch.Tensor, n_chunks: int, empty_chunk: torch.Tensor) -> torch.Tensor:
    """Append `empty_chunk` (1, 77, D) until text_embeddings (B, 77 * k, D) has n_chunks chunks."""
    missing = n_chunks - text_embeddings.shape[1] // empty_chunk.shape[1]
    if missing <= 0:
        return text_embeddings
    filler = empty_chunk.to(text_embeddings).expand(text_embeddings.shape[0], -1, -1)
    return torch.cat([text_embeddings] + [filler] * missing, dim=1)


def pad_cond_uncond(cond: torch.Tensor, uncond: torch.Tensor,
                    empty_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cond and uncond with the same number of chunks, so CFG can run them as one batch."""
    chunk = empty_chunk.shape[1]
    n_chunks = max(cond.shape[1], uncond.shape[1]) // chunk
    return pad_to_chunks(cond, n_chunks, empty_chunk), pad_to_chunks(uncond, n_chunks, empty_chunk)


# -- prompt editing ------------------------------------------------------------------------------------
#
# The web UI's syntax (its `prompt_parser` grammar), read by a small recursive-descent parser:
#   [from:to:when]  `from` until step `when`, then `to`     [to:when]  nothing, then `to`
#   [from::when]    `from`, then nothing                    [a|b|c]    a, b, c, a, ... one per step
# `when` with a decimal point is a fraction of the steps (0.25 of 20 -> 5), without one a step number;
# the switch happens after that step. Constructs nest; (emphasis) and [de-emphasis] pass through as
# text. Brackets and colons that open or close nothing are text at the top level; a prompt the grammar
# does not derive (a `|` outside [...], a trailing backslash) is used unchanged at every step.

_PLAIN_RE = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text without editing syntax; backslash escapes a character
_STRAY = "[]():"  # at the top level these may stand for themselves
_WHEN_RE = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*]")


@dataclass
class _Scheduled:
    before: list  # nodes shown up to and including step `step`; [] for [to:when]
    after: list
    when: str  # the number as written
    step: int = 0


@dataclass
class _Alternate:
    options: list  # one node list per option


def _parse_sequence(text: str, i: int, top: bool) -> Optional[tuple[list, int]]:
    """Nodes from position i to the first character this level cannot take, and that position.

    Inside a construct the caller checks that character; at the top level everything must parse, else None.
    """
    nodes: list = []
    while i < len(text):
        plain = _PLAIN_RE.match(text, i)
        if plain:
            nodes.append(plain.group())
            i = plain.end()
            continue
        char = text[i]
        parsed = _parse_round(text, i) if char == "(" else _parse_square(text, i) if char == "[" else None
        if parsed is not None:
            group, i = parsed
            nodes.extend(group)
        elif top and char in _STRAY:
            nodes.append(char)
            i += 1
        elif top:
            return None
        else:
            break
    return nodes, i


def _parse_round(text: str, i: int) -> Optional[tuple[list, int]]:
    """(text) or (text:weight), kept as text; its inside may hold editing constructs."""
    first, j = _parse_sequence(text, i + 1, top=False)
    if text.startswith(")", j):
        return ["(", *first, ")"], j + 1
    if text.startswith(":", j):
        second, k = _parse_sequence(text, j + 1, top=False)
        if text.startswith(")", k):
            return ["(", *first, ":", *second, ")"], k + 1
    return None


def _parse_square(text: str, i: int) -> Optional[tuple[list, int]]:
    """[text] (kept as text), [a|b|...], [to:when] or [from:to:when]."""
    first, j = _parse_sequence(text, i + 1, top=False)
    if text.startswith("]", j):
        return ["[", *first, "]"], j + 1
    if text.startswith("|", j):
        options = [first]
        while text.startswith("|", j):
            option, j = _parse_sequence(text, j + 1, top=False)
            options.append(option)
        return ([_Alternate(options)], j + 1) if text.startswith("]", j) else None
    if text.startswith(":", j):
        when = _WHEN_RE.match(text, j + 1)
        if when:
            return [_Scheduled([], first, when.group(1))], when.end()
        second, k = _parse_sequence(text, j + 1, top=False)
        when = _WHEN_RE.match(text, k + 1) if text.startswith(":", k) else None
        if when:
            return [_Scheduled(first, second, when.group(1))], when.end()
    return None


def _switch_step(when: str, steps: int, old_scheduling: bool) -> int:
    """The last step that shows `from`. The web UI's rule: a decimal point makes `when` a fraction of the
    steps; its older rule (`old_scheduling`) took any value below 1 as a fraction."""
    value = float(when)
    if old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in when:
        value *= steps
    if not math.isfinite(value):
        return steps if value > 0 else 0
    return min(steps, int(value))


def _collect_steps(nodes: list, steps: int, old_scheduling: bool, found: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            node.step = _switch_step(node.when, steps, old_scheduling)
            if node.step >= 1:
                found.add(node.step)
            _collect_steps(node.before, steps, old_scheduling, found)
            _collect_steps(node.after, steps, old_scheduling, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, steps + 1))
            for option in node.options:
                _collect_steps(option, steps, old_scheduling, found)


def _render(nodes: list, step: int) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            parts.append(_render(node.before if step <= node.step else node.after, step))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step))
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int, old_scheduling: bool = False) -> list[tuple[int, str]]:
    """[(until_step, text), ...]: `text` is the prompt for 1-based steps up to and including `until_step`.

    The web UI's `get_learned_conditioning_prompt_schedules` for one prompt, e.g. with 20 steps
    "a [fantasy:cyberpunk:16] landscape" -> [(16, "a fantasy landscape"), (20, "a cyberpunk landscape")],
    and with 4 steps "[a|b]" -> [(1, "a"), (2, "b"), (3, "a"), (4, "b")]. Entries are listed at every
    step where some construct may switch, so neighbours can repeat a text, as in the web UI.
    """
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    try:
        parsed = _parse_sequence(prompt, 0, top=True)
    except RecursionError:  # thousands of nested brackets: the text is taken as it is
        parsed = None
    if parsed is None:
        return [(steps, prompt)]
    nodes, _ = parsed
    found = {steps}
    _collect_steps(nodes, steps, old_scheduling, found)
    return [(step, _render(nodes, step)) for step in sorted(found)]


@dataclass
class ScheduledConditioning:
    """Text embeddings that may change from step to step (prompt editing), for a batch of prompts.

    `text_embeddings` (N, 77 * n, D) holds each distinct text once; `schedules[b]` lists batch item b's
    (until_step, row) pairs in step order: row `row` conditions 1-based steps up to `until_step`.
    """

    text_embeddings: torch.Tensor
    schedules: list[list[tuple[int, int]]]

    def at_step(self, i: int) -> torch.Tensor:
        """(B, 77 * n, D) for the sampler's 0-based step i, i.e. the schedule's step i + 1.

        This is the web UI's documented meaning ("[a|b]": a, b, a, b). Its implementation compares a
        0-based count of model calls with the 1-based steps, so there the first text lasts one call
        longer (a, a, b, a), and samplers calling the model twice per step (Heun) go by calls.
        """
        rows = [next((row for until, row in schedule if until >= i + 1), schedule[-1][1])
                for schedule in self.schedules]
        return self.text_embeddings[rows]

    @property
    def changes(self) -> bool:
        """Whether any prompt of the batch is conditioned differently at different steps."""
        return any(len({row for _, row in schedule}) > 1 for schedule in self.schedules)

    def __len__(self) -> int:
        return len(self.schedules)

    def to(self, *args, **kwargs) -> "ScheduledConditioning":
        return ScheduledConditioning(self.text_embeddings.to(*args, **kwargs), self.schedules)


def encode_prompt_schedules(text_encoder: torch.nn.Module, prompts: Sequence[str], steps: int, clip_skip: int = 1,
                            old_scheduling: bool = False) -> ScheduledConditioning:
    """The prompts' schedules for `steps` steps, every distinct text encoded once (one padded batch)."""
    if isinstance(prompts, str) or not prompts:
        raise InputError("encode_prompt_schedules takes a non-empty list of prompt strings")
    schedules = [prompt_schedule(p, steps, old_scheduling) for p in prompts]
    texts = list(dict.fromkeys(text for schedule in schedules for _, text in schedule))
    row = {text: i for i, text in enumerate(texts)}
    return ScheduledConditioning(
        encode_prompts(text_encoder, texts, clip_skip),
        [[(until, row[text]) for until, text in schedule] for schedule in schedules],
    )


def encode_conditioning(text_encoder: torch.nn.Module, prompts: Sequence[str], negative_prompts: Sequence[str],
                        steps: int, clip_skip: int = 1,
                        old_scheduling: bool = False) -> tuple[ScheduledConditioning, ScheduledConditioning]:
    """(cond, uncond) for classifier-free guidance: prompt and negative-prompt schedules, padded to one
    number of chunks so both halves run as one UNet batch. Without editing syntax, `at_step(i)` gives
    exactly `encode_prompts(text_encoder, negatives + prompts)` split in two."""
    if len(prompts) != len(negative_prompts):
        raise InputError(f"got {len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    both = encode_prompt_schedules(text_encoder, list(negative_prompts) + list(prompts), steps, clip_skip,
                                   old_scheduling)
    n = len(negative_prompts)
    return (ScheduledConditioning(both.text_embeddings, both.schedules[n:]),
            ScheduledConditioning(both.text_embeddings, both.schedules[:n]))
