"""CLIP BPE tokenizer: the same ids as open_clip's tokenizer (the SD2 reference) for any text.

open_clip is a test oracle only; its package __init__ needs torchvision, so its tokenizer module is
loaded from its file. `regex` (a dev dependency) is the oracle for CLIP's word-splitting pattern.
"""

import importlib.util
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from sdlab.errors import InputError
from sdlab.tokenizer import (
    END_ID, START_ID, VOCAB_SIZE, Tokenizer, clean_text, get_tokenizer, pretokenize,
)

# find_spec locates the package without running its __init__.
OPEN_CLIP_TOKENIZER = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "tokenizer.py"


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer_oracle", OPEN_CLIP_TOKENIZER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


TEXTS = [
    # prompts
    "a photo of a cat", "A PHOTO OF A CAT", "Dreamshape", "dreamshape",
    "masterpiece, best quality, 1girl, solo, looking at viewer, highres",
    "(masterpiece:1.2), [blurry], ((detailed)), (worst quality:0.7)",
    "portrait of an astronaut riding a horse on mars, trending on artstation, 8k, octane render",
    "score_9, score_8_up, rating_safe, BREAK, 2girls",
    # contractions and apostrophes
    "don't stop, it's mine, we're here, they've gone, I'm ok, you'll see, he'd go",
    "DON'T IT'S WE'RE", "'s 't 're 've 'm 'll 'd", "rock 'n' roll", "''s", "o'clock l'amour",
    # numbers
    "1234567890", "3.14159 -42 +7 1e10 0x1F 1,000,000", "½ ¾ ² ³ ① Ⅻ ٣ ४ 〇", "2023-01-01T12:00:00Z",
    # accents and scripts
    "café crème brûlée naïve façade jalapeño Ærøskøbing straße", "Ångström ÉCOLE ÑANDÚ", "İstanbul ıı",
    "Ελληνικά κείμενο", "Русский язык и ЁЖИК", "日本語のテキスト", "中文字符测试", "한국어 텍스트",
    "ｆｕｌｌｗｉｄｔｈ　ＴＥＸＴ１２３！", "ﾊﾝｶｸ ｶﾀｶﾅ", "ไทย ภาษา", "हिन्दी पाठ", "ᚠᚢᚦᚨᚱᚲ",
    "e\u0301 composes with NFC, é does not change", "Zalgo z̷̢a̸l̶g̵o̴", "ﬁne ﬂour eﬃcient",
    # emoji
    "🐱 cat 😀😀 👍🏽", "👨\u200d👩\u200d👧 family", "🏳️\u200d🌈 ❤️ ✨🔥", "\ud83d\ude00 as a surrogate pair",
    # right to left
    "שלום עולם", "مرحبا بالعالم", "\u200fmixed \u200edirection\u202b text\u202c",
    # punctuation and symbols
    "hello!!! ... ??? ;-) <3 :D", "a--b__c~~d", "\"quoted\" 'single' `back`",
    "curly “quotes” and ‘single’ — dashes – … ellipsis", "[(){}]<>/\\|@#$%^&*", "© 2023 ™ ® ° ± × ÷ « »",
    "price: 5€ £3 ¥100 ₹", "\x93smart quotes as C1 controls\x94",
    # HTML entities (CLIP unescapes twice, and ftfy once more per line until a line has '<')
    "&amp; &lt;tag&gt; &quot;q&quot; &#39;s &#x27; &nbsp;x", "Tom &amp;amp; Jerry", "&amp;amp;amp;lt;",
    "&EACUTE;cole &NTILDE;", "fish &amp chips", "<b>bold</b> &amp; more", "&#128512; &#xFF21; &#0;",
    "line one &amp;amp;lt;\n<tag> &amp;amp;lt;\nnext &amp;amp;",
    # whitespace and control characters
    "", " ", "\n\n", "  leading and trailing  ", "many     spaces\tand\ttabs\r\nand\nnewlines",
    "\u3000ideographic\u3000space", "nbsp\xa0here", "zero\u200bwidth", "line\u2028separator",
    "bell\x07 esc\x1b[31mred\x1b[0m del\x7f", "\ufeffBOM start", "nul\x00char",
    # special tokens written as text
    "<start_of_text> hi <end_of_text>", "<START_OF_TEXT>", "x<end_of_text>y", "!<end_of_text>",
    # long
    "a photo of a cat, " * 40,
]

# Random texts from these pools stay clear of what looks like mojibake (which ftfy repairs and sdlab,
# by design, does not); every other clean-up and splitting rule is exercised.
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n\r  \u3000\xa0\u2028\u200b",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "éèêëàâäôöûüçñøå", "日本語中文字한국어カタカナひらがな",
    "😀🐱🎨🌈👍🏽👨\u200d👩\u200d👧✨🔥", "עברית العربية فارسی", "ΑΒΓαβγδεζηθΩωДЖЗжзщЯя", "ﬁﬂﬃＡＢＣａｂｃ１２３！？",
    "\x00\x07\x1b\x7f\ufeff\u200e\u200f\u202a\u2066", "ͅſKİıǅǈ", "\u0301\u0308\u0327",
]
PIECES = ["&amp;", "&lt;", "&quot;", "&#39;", "&nbsp;", "&eacute;", "&amp;amp;", "&not", "'s", "'re", "'LL",
          "<start_of_text>", "<end_of_text>", "\033[31m", "don't", "masterpiece", "(", ")", ":1.2", "BREAK"]


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 30)):
            if rng.random() < 0.25:
                parts.append(rng.choice(PIECES))
            else:
                pool = rng.choice(POOLS)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
            parts.append(" " if rng.random() < 0.5 else "")
        texts.append("".join(parts))
    return texts


def test_the_cat_example_has_clips_ids(tokenizer):
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    ids = tokenizer.tokenize("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [START_ID, 320, 1125, 539, 320, 2368, END_ID]


def test_dreamshape_is_two_tokens(tokenizer):
    ids = tokenizer.encode("Dreamshape")
    assert len(ids) == 2
    assert tokenizer.token_strings(ids) == ["dream", "shape</w>"]


def test_vocabulary_layout(tokenizer):
    assert len(tokenizer.vocab) == VOCAB_SIZE == 49408
    assert (START_ID, END_ID) == (49406, 49407)
    assert tokenizer.token_strings([START_ID, END_ID]) == ["<start_of_text>", "<end_of_text>"]
    assert tokenizer.token_strings([0, 256, 267]) == ["!", "!</w>", ",</w>"]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_open_clip(text, tokenizer, reference):
    assert tokenizer.encode(text) == reference.encode(text)


def test_ids_equal_open_clip_on_random_texts(tokenizer, reference):
    mismatches = [t for t in random_texts(300, seed=0) if tokenizer.encode(t) != reference.encode(t)]
    assert mismatches == []


@pytest.mark.parametrize("text", ["a photo of a cat", "hello!!! 日本語 😀", "café, straße", "don't <end_of_text>"])
def test_decode_equals_open_clip(text, tokenizer, reference):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == reference.decode(ids).strip()


def test_clean_text_lowercases_and_collapses_whitespace():
    assert clean_text("  Tom &amp;amp; JERRY\n\n\tＯＫ  ") == "tom & jerry ok"


def test_pretokenize_matches_clips_regular_expression_on_every_character():
    import regex

    pattern = regex.compile(
        r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    # Characters this Python's Unicode tables know; newer letters are documented as punctuation.
    chars = [chr(c) for c in range(0x110000)
             if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    rng = random.Random(0)
    rng.shuffle(chars)
    extras = ["'s", "'S", "'ſ", "'re", "'LL", "<start_of_text>", "<END_OF_TEXT>", "<ſtart_of_text>", " ", "'"]
    text = "".join(c + rng.choice(extras) if rng.random() < 0.1 else c for c in chars)
    assert pretokenize(text) == pattern.findall(text)


def test_sd2_padding_equals_open_clip(tokenizer, reference):
    texts = ["a photo of a cat", "", "Dreamshape " * 100, "日本語 😀"]
    assert torch.equal(tokenizer.tokenize(texts, pad_token_id=0), reference(texts))


def test_sd1_pads_with_the_end_token(tokenizer):
    ids = tokenizer.tokenize(["a cat", "a photo of a dog"])  # TextConfig().pad_token_id == 49407
    assert ids[0].tolist() == [START_ID, 320, 2368] + [END_ID] * 74
    assert ids[1, 6:].eq(END_ID).all()


def test_empty_text_is_start_and_end(tokenizer):
    assert tokenizer.encode("") == []
    assert tokenizer.tokenize("", pad_token_id=0)[0].tolist() == [START_ID, END_ID] + [0] * 75


def test_long_text_is_cut_to_77_with_the_end_token_last(tokenizer):
    text = "a photo of a cat " * 30  # 150 tokens
    ids = tokenizer.tokenize(text, pad_token_id=0)[0]
    assert ids.shape == (77,)
    assert ids[0] == START_ID and ids[-1] == END_ID
    assert ids[1:76].tolist() == tokenizer.encode(text)[:75]


def test_long_text_without_truncation_is_an_input_error(tokenizer):
    with pytest.raises(InputError, match="150 tokens"):
        tokenizer.tokenize("a photo of a cat " * 30, truncate=False)
    assert tokenizer.tokenize("a cat " * 37, truncate=False).shape == (1, 77)  # 74 tokens fit


def test_one_shared_tokenizer_per_process():
    assert get_tokenizer() is get_tokenizer()


def test_encoding_needs_neither_torch_nor_a_vocab_read_at_import():
    # `sdlab tokenize` must start fast: importing and encoding load no torch, and creating a
    # Tokenizer reads nothing (a missing vocabulary file only matters once text is encoded).
    code = (
        "import sys, sdlab.tokenizer as t\n"
        "t.Tokenizer('/nonexistent/vocab.txt.gz')\n"
        "assert t.get_tokenizer().encode('a photo of a cat') == [320, 1125, 539, 320, 2368]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
