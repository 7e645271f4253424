"""The text encoder's token embeddings up close: nearest tokens, a 2-D map, and files for the
TensorFlow embedding projector (projector.tensorflow.org), as lecture 1 shows "woman", "lady" and
"girl" sitting together.

The token-embedding table (vocab, width) is the encoder's first layer: one learned vector per entry of
CLIP's BPE vocabulary, looked up before any position or context is added. Closeness is cosine
similarity. A word the tokenizer splits into several tokens is represented by the mean of its
tokens' vectors (the table has no single vector for it), and all of its tokens are left out of its
neighbours. The contextual vectors are the encoder's output for a prompt (final LayerNorm applied):
what the UNet's cross-attention reads, one vector per token position, each shaped by its neighbours.

Projector files (the "Load" dialog of projector.tensorflow.org): `vectors.tsv` holds one vector per
line, its numbers tab-separated, no header; `metadata.tsv` one label per line in the same order, and
with a single column no header line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from ..outputs import write_file
from ..tokenizer import Tokenizer, get_tokenizer

DEFAULT_EXPORT_COUNT = 10000  # whole-word tokens exported when no word list is given


@dataclass(frozen=True)
class Neighbour:
    token_id: int
    token: str  # the vocabulary entry, e.g. 'red</w>' (a word's last token ends in </w>)
    score: float  # cosine similarity to the query, -1 to 1


def token_table(text_encoder: torch.nn.Module) -> torch.Tensor:
    """(vocab, width) float32 on the CPU: the encoder's token embeddings (CLIP and OpenCLIP alike)."""
    return text_encoder.token_embedding.weight.detach().float().cpu()


def word_token_ids(word: str, tokenizer: Tokenizer | None = None) -> list[int]:
    """The token ids of `word`; InputError when it has none (blank or only characters CLIP drops)."""
    ids = (tokenizer or get_tokenizer()).encode(word)
    if not ids:
        raise InputError(f"'{word}' has no tokens; give a word made of letters or digits")
    return ids


def word_vector(table: torch.Tensor, word: str, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """(width,) the vector of `word`: its token's row, or the mean of its tokens' rows when it has several."""
    return table[word_token_ids(word, tokenizer)].mean(dim=0)


def nearest_tokens(table: torch.Tensor, query: torch.Tensor, k: int = 10,
                   exclude: Sequence[int] = (), tokenizer: Tokenizer | None = None) -> list[Neighbour]:
    """The `k` rows of `table` most cosine-similar to `query`, best first, leaving out the ids in `exclude`."""
    if k < 1:
        raise InputError(f"k must be 1 or more, got {k}")
    tokenizer = tokenizer or get_tokenizer()
    scores = torch.nn.functional.cosine_similarity(table, query[None, :].to(table), dim=1)  # (vocab,)
    scores[list(exclude)] = float("-inf")
    # rows beyond the vocabulary (added textual-inversion vectors) have no token to name
    scores[len(tokenizer.vocab):] = float("-inf")
    top = torch.topk(scores, min(k, len(tokenizer.vocab) - len(set(exclude))))
    tokens = tokenizer.token_strings(top.indices.tolist())
    return [Neighbour(int(i), token, float(s)) for i, token, s in zip(top.indices, tokens, top.values)]


def nearest_to_word(text_encoder: torch.nn.Module, word: str, k: int = 10) -> tuple[list[int], list[Neighbour]]:
    """(the word's token ids, its k nearest other tokens), for `sdlab embeddings nearest`."""
    table = token_table(text_encoder)
    ids = word_token_ids(word)
    return ids, nearest_tokens(table, table[ids].mean(dim=0), k, exclude=ids)


def contextual_vectors(text_encoder: torch.nn.Module, prompt: str) -> tuple[list[str], torch.Tensor]:
    """(labels, (n, width) vectors): the encoder's output at the prompt's start token, each of its tokens
    and its end token; the padding after them is left out."""
    tokenizer = get_tokenizer()
    ids = tokenizer.tokenize(prompt, pad_token_id=text_encoder.config.pad_token_id, truncate=False)  # (1, 77)
    count = len(tokenizer.encode(prompt)) + 2
    device = next(text_encoder.parameters()).device
    with torch.no_grad():
        hidden = text_encoder(ids.to(device))[0, :count].float().cpu()  # (count, width)
    return [_display(token) for token in tokenizer.token_strings(ids[0, :count].tolist())], hidden


def _display(token: str) -> str:
    """A vocabulary entry as a label: a word's last token without its end-of-word mark ('red</w>' -> 'red')."""
    return token[:-4] if token.endswith("</w>") else token


def pca_2d(vectors: torch.Tensor) -> torch.Tensor:
    """(n, 2): the vectors' coordinates along their two directions of largest variance (PCA by SVD)."""
    if vectors.shape[0] < 2:
        raise InputError("a map needs at least two words")
    centred = vectors.double() - vectors.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:2].T).float()


def draw_map(points: torch.Tensor, labels: Sequence[str], size: int = 768, title: str = "") -> Image.Image:
    """A white square with a labelled dot per point, the points scaled to fill it (axes: PC1 right, PC2 up)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, size // 48))
    margin = size // 8
    low, high = points.min(dim=0).values, points.max(dim=0).values
    span = (high - low).clamp(min=1e-8)
    inner = size - 2 * margin
    draw.line([(margin // 2, size - margin // 2), (size - margin // 2, size - margin // 2)], fill="#bbb")
    draw.line([(margin // 2, margin // 2), (margin // 2, size - margin // 2)], fill="#bbb")
    draw.text((size - margin // 2 - 4, size - margin // 2 + 2), "PC1", fill="#888", font=font, anchor="ra")
    draw.text((margin // 2 + 4, margin // 2), "PC2", fill="#888", font=font, anchor="la")
    if title:
        draw.text((size // 2, 8), title, fill="#444", font=font, anchor="ma")
    for (x, y), label in zip(((points - low) / span).tolist(), labels):
        px, py = margin + x * inner, size - margin - y * inner
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill="#d33")
        left_of_dot = px > size * 0.7  # labels near the right edge go left of their dot, to stay on the picture
        draw.text((px - 7 if left_of_dot else px + 7, py), label, fill="black", font=font,
                  anchor="rm" if left_of_dot else "lm")
    return image


def word_map(text_encoder: torch.nn.Module, words: Sequence[str], size: int = 768) -> Image.Image:
    """The 2-D PCA map of the words' token-embedding vectors, each dot labelled with its word."""
    table = token_table(text_encoder)
    vectors = torch.stack([word_vector(table, word) for word in words])
    return draw_map(pca_2d(vectors), list(words), size, "token embeddings, 2-D PCA")


def contextual_map(text_encoder: torch.nn.Module, prompt: str, size: int = 768) -> Image.Image:
    """The 2-D PCA map of a prompt's contextual vectors, each dot labelled with its token."""
    labels, vectors = contextual_vectors(text_encoder, prompt)
    return draw_map(pca_2d(vectors), labels, size, f"contextual vectors of '{prompt}', 2-D PCA")


def default_export_words(count: int = DEFAULT_EXPORT_COUNT) -> list[tuple[str, list[int]]]:
    """The first `count` whole-word tokens of the vocabulary, as (label, [id]). CLIP's BPE vocabulary
    lists its merges in the order they were learned, most frequent first, so these are the commonest words."""
    tokenizer = get_tokenizer()
    entries = tokenizer.token_strings(range(len(tokenizer.vocab)))
    words = [(entry[:-4], [i]) for i, entry in enumerate(entries[512:], start=512) if entry.endswith("</w>")]
    return words[:count]


def read_word_file(path: str) -> list[tuple[str, list[int]]]:
    """(word, its token ids) for each non-blank line of a word file."""
    try:
        with open(path, encoding="utf-8") as file:
            words = [line.strip() for line in file if line.strip()]
    except OSError as error:
        raise InputError(f"cannot read the word file {path}: {error.strerror}") from None
    if not words:
        raise InputError(f"the word file {path} has no words; write one word per line")
    return [(word, word_token_ids(word)) for word in words]


def projector_rows(vectors: torch.Tensor, labels: Sequence[str]) -> tuple[str, str]:
    """(vectors.tsv text, metadata.tsv text) for the embedding projector: one row per vector and label."""
    if len(labels) != vectors.shape[0]:
        raise ValueError(f"{vectors.shape[0]} vectors but {len(labels)} labels")
    vector_lines = ["\t".join(f"{v:.6g}" for v in row) for row in vectors.tolist()]
    # a tab or newline inside a label would shift every later row
    label_lines = [" ".join(label.split()) or "(blank)" for label in labels]
    return "\n".join(vector_lines) + "\n", "\n".join(label_lines) + "\n"


def export_projector(text_encoder: torch.nn.Module, out_dir: str, words: Sequence[tuple[str, list[int]]] = (),
                     prompts: Sequence[str] = ()) -> int:
    """Write `vectors.tsv` and `metadata.tsv` into `out_dir` (created if missing): the token-embedding
    vectors of `words` ((label, token ids) pairs; a word of several tokens gets their mean), then the
    contextual vectors of each prompt's tokens, labelled 'token · prompt'. Returns the number of rows."""
    table = token_table(text_encoder)
    labels = [label for label, _ in words]
    rows = [table[ids].mean(dim=0) for _, ids in words]
    for prompt in prompts:
        tokens, hidden = contextual_vectors(text_encoder, prompt)
        labels += [f"{token} · {prompt}" for token in tokens]
        rows += list(hidden)
    if not rows:
        raise InputError("nothing to export: give --words FILE, --contextual PROMPT, or neither for the vocabulary")
    vectors_text, metadata_text = projector_rows(torch.stack(rows), labels)
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomically(os.path.join(out_dir, "vectors.tsv"), vectors_text)
    write_text_atomically(os.path.join(out_dir, "metadata.tsv"), metadata_text)
    return len(rows)


def read_projector(out_dir: str) -> tuple[torch.Tensor, list[str]]:
    """((n, width) vectors, n labels) back from the files export_projector wrote."""
    with open(os.path.join(out_dir, "vectors.tsv"), encoding="utf-8") as file:
        vectors = torch.tensor([[float(v) for v in line.split("\t")] for line in file.read().splitlines()])
    with open(os.path.join(out_dir, "metadata.tsv"), encoding="utf-8") as file:
        labels = file.read().splitlines()
    return vectors, labels


def write_text_atomically(path: str, text: str) -> None:
    """Write under a temporary name in the same folder, then rename: a reader sees the old file or the new one."""
    write_file(text.encode("utf-8"), path)
