"""CLIP's byte-level BPE tokenizer: text -> the token ids SD's text encoders read.

Radford et al. 2021 ("Learning Transferable Visual Models From Natural Language Supervision") train
CLIP on byte-pair encoding (Sennrich et al. 2016) over UTF-8 bytes, with 48,894 merges learned on
lower-cased text. The ids here are those of OpenAI CLIP and open_clip for any text:

    a photo of a cat  ->  49406 320 1125 539 320 2368 49407

Vocabulary layout (49,408 ids): 0-255 the 256 bytes as printable characters, 256-511 the same with
the end-of-word mark `</w>`, 512-49405 one id per merge in merge order, 49406 `<start_of_text>`,
49407 `<end_of_text>`.

Before splitting, CLIP cleans text with `ftfy.fix_text`, `html.unescape` twice, whitespace
collapsing and lower-casing, and splits words with a `regex` pattern over Unicode letters (\\p{L})
and numbers (\\p{N}). Neither ftfy nor regex is a dependency here: `_fix_text` redoes the parts of
ftfy that change ordinary text, and `pretokenize` the split, from `unicodedata` categories. What
ftfy does that is not redone is mojibake repair (text decoded with the wrong codec, like "cafÃ©"),
so such text keeps its wrong characters. Letters assigned after this Python's Unicode version
(`unicodedata.unidata_version`) count as punctuation.
"""

from __future__ import annotations

import functools
import gzip
import html
import html.entities
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .errors import InputError

VOCAB_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 48894  # the merges CLIP uses: 49152 ids - 256 bytes - 2 special tokens
START_TOKEN, END_TOKEN = "<start_of_text>", "<end_of_text>"
START_ID, END_ID = 49406, 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77  # 75 text tokens between the start and end tokens
CHUNK_LENGTH = CONTEXT_LENGTH - 2  # text tokens one context holds: a prompt chunk (prompts.py)
END_OF_WORD = "</w>"


# -- text clean-up (the parts of ftfy.fix_text that change ordinary text) ---------------------------

_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")  # only entities ending in ';' are unambiguous
_ANSI_ESCAPE_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")  # terminal colour codes
_SINGLE_QUOTES_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES_RE = re.compile("[\u201c-\u201f]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_LINE_BREAKS = {"\r\n": "\n", "\r": "\n", "\u2028": "\n", "\u2029": "\n", "\x85": "\n"}

# Latin typographic ligatures and legacy digraphs are split; ligatures of other scripts are kept.
_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
})

# Control characters nobody types on purpose (ASCII controls except tab/newlines/form feed,
# deprecated Arabic format controls, interlinear annotations, the object replacement character and
# the byte order mark); whitespace controls, joiners and direction marks stay.
_CONTROL_CHARS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)


@functools.lru_cache(maxsize=None)
def _entity_table() -> dict[str, str]:
    """HTML5 named entities ending in ';', plus all-caps spellings of lower-case ones (&EACUTE;)."""
    table = {}
    for name, char in html.entities.html5.items():
        if not name.endswith(";"):
            continue
        table["&" + name] = char
        upper = "&" + name.upper()
        if name == name.lower() and html.unescape(upper) == upper:
            table[upper] = char.upper()
    return table


def _unescape_entity(match: re.Match) -> str:
    entity = match.group(0)
    table = _entity_table()
    if entity in table:
        return table[entity]
    if entity.startswith("&#"):
        char = html.unescape(entity)
        return entity if ";" in char else char  # a reference only partly decoded stays as written
    return entity


@functools.lru_cache(maxsize=None)
def _width_table() -> dict[int, str]:
    """Fullwidth/halfwidth forms (U+FF01-U+FFEF) and the ideographic space to their plain forms."""
    table = {0x3000: " "}
    for code in range(0xFF01, 0xFFF0):
        plain = unicodedata.normalize("NFKC", chr(code))
        if plain != chr(code):
            table[code] = plain
    return table


@functools.lru_cache(maxsize=None)
def _c1_table() -> dict[int, str]:
    """C1 controls (U+80-U+9F) read as the Windows-1252 characters browsers show for those bytes."""
    table = {}
    for code in range(0x80, 0xA0):
        try:
            table[code] = bytes([code]).decode("cp1252")
        except UnicodeDecodeError:
            pass  # the five bytes cp1252 leaves undefined stay as they are
    return table


def _join_surrogates(text: str) -> str:
    if not _SURROGATE_RE.search(text):
        return text

    def join(match: re.Match) -> str:
        high, low = (ord(c) for c in match.group(0))
        return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))

    return _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(join, text))


def _fix_segment(text: str, unescape_entities: bool) -> str:
    """One line through ftfy's fixes, in ftfy's order, repeated until nothing changes."""
    while True:
        before = text
        if unescape_entities:
            text = _ENTITY_RE.sub(_unescape_entity, text)
        text = text.translate(_c1_table())
        text = text.translate(_LIGATURES)
        text = text.translate(_width_table())
        text = _SINGLE_QUOTES_RE.sub("'", _DOUBLE_QUOTES_RE.sub('"', text))
        for old, new in _LINE_BREAKS.items():
            text = text.replace(old, new)
        text = _join_surrogates(text)
        text = _ANSI_ESCAPE_RE.sub("", text)
        text = text.translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def _fix_text(text: str) -> str:
    """ftfy.fix_text without mojibake repair. Lines are fixed one by one; once a line contains '<'
    (so the text may be HTML, where entities are markup), entities are left alone from there on."""
    fixed = []
    unescape_entities = True
    for line in re.split(r"(?<=\n)", text):
        if "<" in line:
            unescape_entities = False
        fixed.append(_fix_segment(line, unescape_entities))
    return "".join(fixed)


def clean_text(text: str) -> str:
    """CLIP's clean-up: fix the text, decode HTML entities twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).lower()


# -- splitting into words ----------------------------------------------------------------------------

# CLIP's pattern:  special tokens | 's|'t|'re|'ve|'m|'ll|'d | \p{L}+ | \p{N} | [^\s\p{L}\p{N}]+
# matched case-insensitively, first alternative wins, unmatched characters are skipped.
_SPECIAL_TOKENS = (START_TOKEN, END_TOKEN)
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
# \s in the `regex` module is Unicode White_Space. U+0345 (combining ypogegrammeni) case-folds to a
# Greek letter, so under IGNORECASE it matches neither the letter class nor its complement: skipped.
_SKIPPED = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000\u0345") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)
_CASE_FOLD = str.maketrans({"ſ": "s", "\u212a": "k"})  # IGNORECASE equates long s with s, Kelvin with k


def _char_kind(char: str) -> str:
    """'L' letter, 'N' number, ' ' skipped, 'P' anything else (punctuation, symbols, marks)."""
    if char in _SKIPPED:
        return " "
    major = unicodedata.category(char)[0]
    return major if major in "LN" else "P"


def _literal_at(text: str, pos: int, literal: str) -> bool:
    return text[pos:pos + len(literal)].lower().translate(_CASE_FOLD) == literal


def pretokenize(text: str) -> list[str]:
    """Split cleaned text into the words BPE runs on, exactly as CLIP's regular expression does."""
    words = []
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        literal = None
        if char == "<":
            literal = next((s for s in _SPECIAL_TOKENS if _literal_at(text, pos, s)), None)
        elif char == "'":
            literal = next((c for c in _CONTRACTIONS if _literal_at(text, pos + 1, c)), None)
            literal = None if literal is None else "'" + literal
        if literal is not None:
            words.append(text[pos:pos + len(literal)])
            pos += len(literal)
            continue
        kind = _char_kind(char)
        stop = pos + 1
        if kind in "LP":  # letters and punctuation come in runs, numbers one digit at a time
            while stop < end and _char_kind(text[stop]) == kind:
                stop += 1
        if kind != " ":
            words.append(text[pos:stop])
        pos = stop
    return words


# -- byte-pair encoding ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def byte_to_char() -> dict[int, str]:
    """A printable character for each byte, so BPE works on strings without whitespace or controls.

    The 188 bytes that are printable Latin-1 characters stand for themselves; the other 68 take the
    code points 256, 257, ... in byte order. Dict order is vocabulary order (ids 0-255).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


@functools.lru_cache(maxsize=None)
def _load_vocab(path: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(token string -> id, merge pair -> rank), read once per process (a tenth of a second: part of
    every generation's start-up, so the 48,894 merge lines are split and counted without a Python loop
    per line where one will do)."""
    with gzip.open(path, "rb") as file:
        lines = file.read().decode("utf-8").split("\n", NUM_MERGES + 1)[1:NUM_MERGES + 1]  # line 0: a version header
    merges = [tuple(line.split(" ")) for line in lines]
    byte_chars = list(byte_to_char().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + [a + b for a, b in merges] + list(_SPECIAL_TOKENS)
    return dict(zip(tokens, range(len(tokens)))), dict(zip(merges, range(len(merges))))


class Tokenizer:
    """CLIP BPE with a per-word cache. The vocabulary file is read on first use, not on creation."""

    start_id = START_ID
    end_id = END_ID
    vocab_size = VOCAB_SIZE

    def __init__(self, vocab_path: Union[str, Path] = VOCAB_PATH):
        self.vocab_path = Path(vocab_path)
        self._word_cache: dict[str, tuple[int, ...]] = {}
        self._id_to_token: Optional[list[str]] = None

    @property
    def vocab(self) -> dict[str, int]:
        return _load_vocab(self.vocab_path)[0]

    def _bpe(self, word: str) -> list[str]:
        """Merge the word's symbols, lowest-ranked adjacent pair first, until no pair is a merge."""
        ranks = _load_vocab(self.vocab_path)[1]
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, NUM_MERGES))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._word_cache.get(word)
        if ids is None:
            if word in _SPECIAL_TOKENS:
                ids = (self.vocab[word],)
            else:
                to_char = byte_to_char()
                as_chars = "".join(to_char[b] for b in word.encode("utf-8"))
                ids = tuple(self.vocab[token] for token in self._bpe(as_chars))
            self._word_cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without start and end tokens."""
        return [i for word in pretokenize(clean_text(text)) for i in self._word_ids(word)]

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Vocabulary entries for display, e.g. 'dream</w>'. Non-ASCII bytes show as their stand-ins."""
        if self._id_to_token is None:
            self._id_to_token = list(self.vocab)
        return [self._id_to_token[int(i)] for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: words separated by single spaces (cleaning and case are not undone)."""
        from_char = {char: byte for byte, char in byte_to_char().items()}
        chars = "".join(self.token_strings(ids))
        text = bytes(from_char[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def tokenize(self, texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH,
                 pad_token_id: int = END_ID, truncate: bool = True):
        """(B, context_length) LongTensor: start token, text, end token, then `pad_token_id`.

        SD1 pads with the end token (49407), SD2/OpenCLIP with 0 (TextConfig.pad_token_id). Text
        longer than context_length - 2 tokens is cut and the end token kept last, unless `truncate`
        is False, which raises InputError instead.
        """
        import torch  # here, so `sdlab tokenize` starts without loading torch

        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = self.encode(text)
            if len(ids) > context_length - 2:
                if not truncate:
                    raise InputError(f"text has {len(ids)} tokens, more than {context_length - 2}; shorten it")
                ids = ids[:context_length - 2]
            ids = [self.start_id, *ids, self.end_id]
            rows.append(ids + [pad_token_id] * (context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (its vocabulary and word cache are shared by every caller)."""
    return Tokenizer()
