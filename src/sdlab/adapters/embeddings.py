"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): learned token vectors
that stand for a concept, used in prompts by name.

Files:
- web UI `.pt`: {"string_to_param": {"*": (n, D)}, "string_to_token", "name", "step", ...}; the original
  textual_inversion code stores `string_to_param` as a torch.nn.ParameterDict
- web UI `.safetensors`: {"emb_params": (n, D)}
- diffusers `learned_embeds.safetensors` / `.bin`: {token: (D,) or (n, D)}
D is the text encoder's width: 768 for SD 1.x (CLIP ViT-L/14), 1024 for SD 2.x (OpenCLIP ViT-H/14).
SDXL embeddings ({"clip_l", "clip_g"}) are refused.

Loading extends the text encoder's token-embedding lookup: ids from vocab_size (49408) up read the
embeddings' vectors, while the 49408 x D table is neither copied nor changed. A prompt names an
embedding by its name (the file stem of web UI files, the token of diffusers files, or `name=`);
prompts.tokenize_weighted matches the name's tokens, as the web UI does, and puts one id per vector
in their place, so an n-vector embedding occupies n token positions. A name that is a single word of
CLIP's vocabulary is refused: every use of that word would silently become the embedding.

Ids above 49407 also outrank the end token in `pooled()`'s argmax; SD's conditioning never pools.
"""

from __future__ import annotations

import os
import pickle
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..checkpoint.io import read_state_dict
from ..errors import CheckpointError, InputError
from ..hashes import file_sha256
from ..tokenizer import CHUNK_LENGTH, get_tokenizer

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
# text-encoder widths of the families an embedding may have been trained for, for error messages
_FAMILIES = {768: "SD 1.x (CLIP ViT-L/14)", 1024: "SD 2.x (OpenCLIP ViT-H/14)", 1280: "SDXL (OpenCLIP ViT-bigG)"}


@dataclass
class Embedding:
    name: str
    vectors: torch.Tensor  # (n, D)
    path: Optional[str] = None
    # the web UI's "TI hashes" value: 12 hex digits of the file's SHA-256 (its textual_inversion.py `shorthash`)
    shorthash: Optional[str] = None


# -- reading files --------------------------------------------------------------------------------------




def _read_pickle(path: Path) -> dict:
    try:
        # nn.ParameterDict: how the original textual_inversion code saved string_to_param
        with torch.serialization.safe_globals([nn.ParameterDict]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load {path}: it holds more than tensors and plain values, and "
                              "unpickling it could run code; use a .safetensors embedding") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt embedding file ({exc})") from exc
    if isinstance(data, torch.Tensor):
        return {"emb_params": data}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a textual-inversion embedding (found a {type(data).__name__})")
    return data


def _as_matrix(tensor, where: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2) or tensor.numel() == 0:
        raise CheckpointError(f"{where}: expected embedding vectors of shape (D,) or (n, D), got "
                              f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    return tensor.detach().reshape(-1, tensor.shape[-1]).clone()


def read_embeddings(source, name: Optional[str] = None) -> list[Embedding]:
    """The embeddings in a file (web UI .pt/.safetensors, diffusers learned_embeds) or state dict.

    Web UI files hold one embedding, named by the file stem; diffusers files one per token, named by
    the token. `name` renames a file's single embedding.
    """
    path = None
    if isinstance(source, dict):
        data, where = source, "embedding state dict"
    else:
        path = Path(source)
        where = str(path)
        if path.is_dir() or path.suffix.lower() not in EMBEDDING_SUFFIXES:
            raise InputError(f"{path}: an embedding is a {', '.join(EMBEDDING_SUFFIXES)} file")
        if path.suffix.lower() == ".safetensors":
            data, _ = read_state_dict(path)
        elif path.exists():
            data = _read_pickle(path)
        else:
            raise CheckpointError(f"embedding not found: {path}")
    if "clip_l" in data or "clip_g" in data:
        raise CheckpointError(f"{where} is an SDXL embedding (clip_l/clip_g vectors); sdlab runs SD 1.x and 2.x")
    stem = path.stem if path is not None else None
    if "string_to_param" in data:
        params = data["string_to_param"]
        if "*" not in params:
            raise CheckpointError(f"{where}: string_to_param has no '*' entry (keys: {', '.join(params)})")
        found = [(name or stem, _as_matrix(params["*"], where))]
    elif "emb_params" in data:
        found = [(name or stem, _as_matrix(data["emb_params"], where))]
    elif data and all(isinstance(v, torch.Tensor) for v in data.values()):
        if name is not None and len(data) > 1:
            raise InputError(f"{where} holds {len(data)} embeddings ({', '.join(data)}); name= renames only one")
        found = [(name or token, _as_matrix(vectors, f"{where}: {token}")) for token, vectors in data.items()]
    else:
        raise CheckpointError(f"{where} is not a textual-inversion embedding: no string_to_param, emb_params or "
                              f"token -> vector entries (keys: {', '.join(map(str, list(data)[:8]))})")
    if any(n is None for n, _ in found):
        raise InputError(f"{where}: give the embedding a name (name=...), prompts use it by name")
    shorthash = file_sha256(path)[:12] if path is not None else None
    return [Embedding(n, v, None if path is None else str(path), shorthash) for n, v in found]


def embedding_files(sources: Iterable) -> list:
    """Files, state dicts and Embeddings to load: folders are searched (recursively) for embedding files."""
    found = []
    for source in sources:
        if isinstance(source, (dict, Embedding)):
            found.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in EMBEDDING_SUFFIXES))
        else:
            found.append(path)
    return found


# -- the extended lookup ----------------------------------------------------------------------------------


class EmbeddingLookup:
    """The embeddings loaded onto one text encoder: their names' tokens and vector ids.

    `match(tokens, position)` is what prompts.tokenize_weighted asks at every token; names are tried
    longest first, so 'style-v2' wins over 'style' where both match.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.embeddings: dict[str, Embedding] = {}
        self.rows = torch.empty(0)  # (total vectors, D): row k is token id vocab_size + k
        self._ids: dict[str, list[int]] = {}
        self._by_first_token: dict[int, list[tuple[tuple[int, ...], str]]] = {}

    def rebuild(self) -> None:
        tokenizer = get_tokenizer()
        self._ids, self._by_first_token = {}, {}
        next_id = self.vocab_size
        for name, embedding in self.embeddings.items():
            self._ids[name] = list(range(next_id, next_id + len(embedding.vectors)))
            next_id += len(embedding.vectors)
            tokens = tuple(tokenizer.encode(name))
            self._by_first_token.setdefault(tokens[0], []).append((tokens, name))
        for candidates in self._by_first_token.values():
            candidates.sort(key=lambda item: -len(item[0]))
        vectors = [e.vectors.float() for e in self.embeddings.values()]
        self.rows = torch.cat(vectors) if vectors else torch.empty(0)

    def match(self, tokens: Sequence[int], position: int) -> Optional[tuple[list[int], int]]:
        for name_tokens, name in self._by_first_token.get(tokens[position], ()):
            if tuple(tokens[position:position + len(name_tokens)]) == name_tokens:
                return self._ids[name], len(name_tokens)
        return None


_LOOKUPS: "weakref.WeakKeyDictionary[nn.Module, EmbeddingLookup]" = weakref.WeakKeyDictionary()


def embedding_lookup(text_encoder: nn.Module) -> Optional[EmbeddingLookup]:
    """The embeddings loaded onto `text_encoder`, or None."""
    lookup = _LOOKUPS.get(text_encoder)
    return lookup if lookup is not None and lookup.embeddings else None


def loaded_embeddings(text_encoder: nn.Module) -> dict[str, Embedding]:
    lookup = _LOOKUPS.get(text_encoder)
    return dict(lookup.embeddings) if lookup is not None else {}


def _extended_forward(table: nn.Embedding, lookup: EmbeddingLookup):
    """`table`'s forward with ids >= vocab_size read from the lookup's rows."""
    vocab_size = table.num_embeddings

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        extra = input_ids >= vocab_size
        base = type(table).forward(table, input_ids.masked_fill(extra, 0))  # (B, T, D)
        if not extra.any():
            return base
        index = (input_ids - vocab_size).clamp(min=0)
        if int(index.max()) >= len(lookup.rows):
            raise InputError(f"token id {int(input_ids.max())} is beyond the {len(lookup.rows)} loaded "
                             "embedding vectors")
        rows = lookup.rows.to(base.device, base.dtype)[index]
        return torch.where(extra[..., None], rows, base)

    return forward


def _check(embedding: Embedding, width: int) -> None:
    where = f"embedding '{embedding.name}'" + (f" ({embedding.path})" if embedding.path else "")
    n, d = embedding.vectors.shape
    if d != width:
        made_for = _FAMILIES.get(d, f"a {d}-wide text encoder")
        this = _FAMILIES.get(width, f"{width} wide")
        raise InputError(f"{where} has {d}-wide vectors, made for {made_for}; this model's text encoder is "
                         f"{this}. Use an embedding trained for this model family")
    if n > CHUNK_LENGTH:
        raise InputError(f"{where} has {n} vectors; a prompt chunk holds at most {CHUNK_LENGTH}")
    tokens = get_tokenizer().encode(embedding.name)
    if not tokens:
        raise InputError(f"{where}: the name has no tokens to write in a prompt; choose a name with letters or digits")
    if len(tokens) == 1:
        word = get_tokenizer().decode(tokens)
        raise InputError(
            f"{where}: the name is the ordinary word '{word}', so every '{word}' in a prompt would become the "
            "embedding; load it under a distinct name (name=..., or rename the file, e.g. "
            f"'{embedding.name}-embedding')"
        )


def load_embeddings(text_encoder: nn.Module, sources: Iterable, name: Optional[str] = None) -> list[Embedding]:
    """Read and register embeddings (files, folders, state dicts, Embedding objects) on `text_encoder`.

    Everything is read and checked before anything is registered; a name loaded before is replaced.
    `name` renames the single embedding of a single source.
    """
    embeddings: list[Embedding] = []
    for source in embedding_files([sources] if isinstance(sources, (str, os.PathLike, dict, Embedding)) else sources):
        embeddings.extend([source] if isinstance(source, Embedding) else read_embeddings(source, name))
    table = text_encoder.token_embedding
    seen: dict[str, Embedding] = {}
    for embedding in embeddings:
        _check(embedding, table.embedding_dim)
        if embedding.name in seen:
            raise InputError(f"two embeddings are named '{embedding.name}' ({seen[embedding.name].path} and "
                             f"{embedding.path}); rename one")
        seen[embedding.name] = embedding
    lookup = _LOOKUPS.get(text_encoder)
    if lookup is None:
        lookup = _LOOKUPS[text_encoder] = EmbeddingLookup(table.num_embeddings)
    lookup.embeddings.update(seen)
    lookup.rebuild()
    table.forward = _extended_forward(table, lookup)
    return embeddings


def unload_embeddings(text_encoder: nn.Module, names: Optional[Iterable[str]] = None) -> None:
    """Forget the named embeddings (all when None); with none left the lookup is the plain table again."""
    lookup = _LOOKUPS.get(text_encoder)
    if lookup is None:
        return
    for name in list(lookup.embeddings) if names is None else names:
        if name not in lookup.embeddings:
            raise InputError(f"no embedding named '{name}' is loaded; loaded: {', '.join(lookup.embeddings) or 'none'}")
        del lookup.embeddings[name]
    lookup.rebuild()
    if not lookup.embeddings:
        table = text_encoder.token_embedding
        if "forward" in vars(table):
            del table.forward
        del _LOOKUPS[text_encoder]


# -- infotext ----------------------------------------------------------------------------------------------


def used_embeddings(text_encoder: nn.Module, prompts: Iterable[str]) -> list[Embedding]:
    """The loaded embeddings whose names occur in the prompts, in order of first use."""
    lookup = embedding_lookup(text_encoder)
    if lookup is None:
        return []
    by_ids = {tuple(ids): name for name, ids in lookup._ids.items()}
    used: dict[str, Embedding] = {}
    for prompt in prompts:
        tokens = get_tokenizer().encode(prompt)
        position = 0
        while position < len(tokens):
            hit = lookup.match(tokens, position)
            if hit is None:
                position += 1
                continue
            name = by_ids[tuple(hit[0])]
            used.setdefault(name, lookup.embeddings[name])
            position += hit[1]
    return list(used.values())


def ti_hashes(embeddings: Iterable[Embedding]) -> Optional[str]:
    """The web UI's `TI hashes` field, 'name: hash12, ...' (':' and ',' dropped from names), or None."""
    entries = [f"{e.name.replace(':', '').replace(',', '')}: {e.shorthash}" for e in embeddings if e.shorthash]
    return ", ".join(entries) or None
