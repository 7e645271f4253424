"""Prompts the way the popular SD web UI (AUTOMATIC1111) reads them: emphasis, 75-token chunks, BREAK.

    parse_prompt_attention   "a (red:1.3) cat"  ->  [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]
    tokenize_weighted        -> chunks of 77 ids and 77 weights: [start, 75 tokens or padding, end]
    encode_prompts           -> text_embeddings (B, 77 * n_chunks, D), every chunk encoded on its own

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import InputError
from .tokenizer import END_ID, START_ID, Tokenizer, get_tokenizer

CHUNK_LENGTH = 75  # text tokens per chunk; with start and end tokens, CLIP's 77-token context
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


def tokenize_weighted(prompt: str, tokenizer: Optional[Tokenizer] = None,
                      pad_token_id: int = END_ID) -> list[PromptChunk]:
    """The prompt's chunks of 77 ids and weights, split as the web UI splits them.

    A chunk holds 75 tokens. When a token would overflow it and the last comma of the chunk is
    among its last 20 tokens, the words after that comma move to the next chunk (so a phrase stays
    together) and the chunk is padded. BREAK closes the current chunk. The empty prompt is one
    chunk of padding.
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
        for token in tokenizer.encode(text):
            if token == comma_id:
                last_comma = len(ids)
            elif len(ids) == CHUNK_LENGTH and last_comma != -1 and CHUNK_LENGTH - last_comma <= COMMA_BACKTRACK:
                moved = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close_chunk()
                ids, weights = moved
            if len(ids) == CHUNK_LENGTH:
                close_chunk()
            ids.append(token)
            weights.append(weight)
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
    Gradients flow (for training); inference callers wrap this in torch.no_grad().
    """
    if isinstance(prompts, str) or not prompts:
        raise InputError("encode_prompts takes a non-empty list of prompt strings")
    tokenizer = get_tokenizer()
    pad_token_id = text_encoder.config.pad_token_id
    unique = list(dict.fromkeys(prompts))
    chunked = [tokenize_weighted(p, tokenizer, pad_token_id) for p in unique]
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
