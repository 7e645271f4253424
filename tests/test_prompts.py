"""Prompts as the SD web UI reads them: emphasis parsing, 75-token chunks, weighting, CFG padding."""

import pytest
import torch
from torch import nn

from sdlab.config import SD1, SD2, TextConfig
from sdlab.errors import InputError
from sdlab.prompts import (
    BREAK, apply_weights, encode_empty_chunk, encode_prompts, pad_cond_uncond, parse_prompt_attention,
    tokenize_weighted,
)
from sdlab.tokenizer import END_ID, START_ID, get_tokenizer

CAT, DOG, COMMA = 2368, 1929, 267  # 'cat</w>', 'dog</w>', ',</w>'


class TinyTextEncoder(nn.Module):
    """The text encoders' interface on a toy network: ids (B, 77) -> hidden states (B, 77, width)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.randn(config.context_length, config.width))
        self.layers = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(config.layers))
        self.final_layer_norm = nn.LayerNorm(config.width)
        # A learned bias, as in CLIP: the web UI's rescaling divides by the mean, which must not be ~0.
        nn.init.normal_(self.final_layer_norm.bias, mean=0.5)
        self.calls = []

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        self.calls.append(input_ids.shape[0])
        x = self.token_embedding(input_ids) + self.position_embedding
        x = x + x.cumsum(dim=1) / 10  # every position sees the ones before it, like causal attention
        for layer in self.layers[:len(self.layers) - (clip_skip - 1)]:
            x = x + torch.tanh(layer(x))
        return self.final_layer_norm(x)


@pytest.fixture(params=[SD1.text, SD2.text], ids=["sd1", "sd2"])
def encoder(request):
    torch.manual_seed(0)
    config = TextConfig(width=8, layers=3, heads=2, pad_token_id=request.param.pad_token_id)
    return TinyTextEncoder(config).eval()


def chunk_ids(prompt, pad_token_id=END_ID):
    return [c.ids for c in tokenize_weighted(prompt, get_tokenizer(), pad_token_id)]


# -- emphasis syntax (the web UI's documented examples) --------------------------------------------------


@pytest.mark.parametrize("prompt, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]),
])
def test_web_ui_examples(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("", [("", 1.0)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("((word:1.3))", [("word", 1.3 * 1.1)]),
    ("(word: 0.5 )", [("word", 0.5)]),
    ("(word:-1)", [("word", -1.0)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1.1)]),
    ("a) stray] closers", [("a) stray] closers", 1.0)]),
    ("word:1.2) with nothing open", [("word:1.2) with nothing open", 1.0)]),
    ("(word:1.2.3)", [("word:1.2.3)", 1.1)]),  # no number: text, and the '(' stays open
    ("time: 12:30", [("time: 12:30", 1.0)]),
    ("a \\\\ backslash", [("a \\ backslash", 1.0)]),
    ("\\(\\)\\[\\]", [("()[]", 1.0)]),
])
def test_emphasis_rules(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


def test_break_keyword():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]
    assert parse_prompt_attention("BREAKfast, break") == [("BREAKfast, break", 1.0)]


# -- chunks ----------------------------------------------------------------------------------------------


def test_plain_prompt_ids_equal_the_tokenizers():
    tokenizer = get_tokenizer()
    for pad in (END_ID, 0):
        (chunk,) = tokenize_weighted("a photo of a cat", tokenizer, pad)
        assert chunk.ids == tokenizer.tokenize("a photo of a cat", pad_token_id=pad)[0].tolist()
        assert chunk.weights == [1.0] * 77


def test_weights_follow_their_tokens():
    (chunk,) = tokenize_weighted("a (cat:1.5) and [dog]")
    assert chunk.ids[:6] == [START_ID, 320, CAT, 537, DOG, END_ID]
    assert chunk.weights[:6] == [1.0, 1.0, 1.5, 1.0, 1 / 1.1, 1.0]
    assert chunk.weights[6:] == [1.0] * 71


def test_empty_prompt_is_one_chunk_of_padding():
    assert chunk_ids("") == [[START_ID] + [END_ID] * 76]
    assert chunk_ids("", pad_token_id=0) == [[START_ID, END_ID] + [0] * 75]


def test_a_100_token_prompt_gives_two_chunks():
    chunks = chunk_ids("cat " * 100)
    assert len(chunks) == 2
    assert chunks[0] == [START_ID] + [CAT] * 75 + [END_ID]
    assert chunks[1] == [START_ID] + [CAT] * 25 + [END_ID] * 51


def test_75_tokens_fit_one_chunk_and_76_do_not():
    assert len(chunk_ids("cat " * 75)) == 1
    assert len(chunk_ids("cat " * 76)) == 2


def test_sd2_chunks_pad_with_zero_after_the_end_token():
    chunks = chunk_ids("cat " * 80, pad_token_id=0)
    assert chunks[1] == [START_ID] + [CAT] * 5 + [END_ID] + [0] * 70


def test_words_after_a_late_comma_move_to_the_next_chunk():
    # The comma is the 61st token: within the last 20 of the chunk, so the dogs move on together.
    chunks = chunk_ids("cat " * 60 + ", " + "dog " * 30)
    assert chunks[0] == [START_ID] + [CAT] * 60 + [COMMA] + [END_ID] * 15
    assert chunks[1] == [START_ID] + [DOG] * 30 + [END_ID] * 46


def test_an_early_comma_does_not_move_words():
    # The comma is the 51st token: 25 tokens from the chunk's end, too far to backtrack to.
    chunks = chunk_ids("cat " * 50 + ", " + "dog " * 30)
    assert chunks[0] == [START_ID] + [CAT] * 50 + [COMMA] + [DOG] * 24 + [END_ID]
    assert chunks[1] == [START_ID] + [DOG] * 6 + [END_ID] * 70


def test_break_starts_a_new_chunk():
    assert chunk_ids("a cat BREAK a dog") == [
        [START_ID, 320, CAT, END_ID] + [END_ID] * 73,
        [START_ID, 320, DOG, END_ID] + [END_ID] * 73,
    ]
    assert len(chunk_ids("a cat BREAK")) == 1  # nothing after it: no empty chunk
    assert len(chunk_ids("BREAK a cat")) == 2  # the web UI closes the (empty) first chunk


# -- weighting and encoding -------------------------------------------------------------------------------


def test_unweighted_prompts_are_exactly_the_encoders_output(encoder):
    pad = encoder.config.pad_token_id
    ids = get_tokenizer().tokenize(["a photo of a cat", "blurry"], pad_token_id=pad)
    expected = encoder(ids)
    assert torch.equal(encode_prompts(encoder, ["a photo of a cat", "blurry"]), expected)


def test_a_weighted_token_is_scaled_and_the_mean_restored(encoder):
    (chunk,) = tokenize_weighted("a (cat:1.5)", get_tokenizer(), encoder.config.pad_token_id)
    hidden = encoder(torch.tensor([chunk.ids]))
    out = encode_prompts(encoder, ["a (cat:1.5)"])
    assert out.mean().item() == pytest.approx(hidden.mean().item(), abs=1e-6)
    rescale = hidden.mean() / (hidden * torch.tensor(chunk.weights)[None, :, None]).mean()
    torch.testing.assert_close(out[0, 2], hidden[0, 2] * 1.5 * rescale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0, 1], hidden[0, 1] * rescale, rtol=1e-6, atol=1e-6)


def test_weighting_leaves_unweighted_prompts_of_the_batch_alone():
    hidden = torch.randn(2, 77, 8)
    weights = torch.ones(2, 77)
    weights[1, 3] = 1.3
    out = apply_weights(hidden, weights)
    assert torch.equal(out[0], hidden[0])
    assert not torch.equal(out[1], hidden[1])
    torch.testing.assert_close(out[1].mean(), hidden[1].mean())


def test_a_prompts_embedding_does_not_depend_on_its_batch(encoder):
    alone = encode_prompts(encoder, ["a (cat:1.5)"])
    batched = encode_prompts(encoder, ["[a dog]", "a (cat:1.5)"])
    torch.testing.assert_close(batched[1:], alone, rtol=1e-6, atol=1e-6)


def test_long_prompts_concatenate_chunk_encodings(encoder):
    pad = encoder.config.pad_token_id
    chunks = tokenize_weighted("cat " * 100, get_tokenizer(), pad)
    out = encode_prompts(encoder, ["cat " * 100])
    assert out.shape == (1, 154, 8)
    assert torch.equal(out[:, :77], encoder(torch.tensor([chunks[0].ids])))
    assert torch.equal(out[:, 77:], encoder(torch.tensor([chunks[1].ids])))


def test_a_batch_is_padded_to_its_longest_prompt_with_empty_chunks(encoder):
    out = encode_prompts(encoder, ["cat " * 100, "a dog"])
    assert out.shape == (2, 154, 8)
    torch.testing.assert_close(out[1, 77:], encode_empty_chunk(encoder)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:, :77], encode_prompts(encoder, ["a dog"]), rtol=0, atol=1e-6)


def test_clip_skip_reaches_the_encoder(encoder):
    ids = get_tokenizer().tokenize("a photo of a cat", pad_token_id=encoder.config.pad_token_id)
    skipped = encode_prompts(encoder, ["a photo of a cat"], clip_skip=2)
    assert torch.equal(skipped, encoder(ids, clip_skip=2))
    assert not torch.equal(skipped, encoder(ids))


def test_repeated_prompts_are_encoded_once(encoder):
    encoder.calls.clear()
    out = encode_prompts(encoder, ["blurry", "a cat", "blurry", "a cat"])
    assert encoder.calls == [2]
    assert torch.equal(out[0], out[2]) and torch.equal(out[1], out[3])


def test_no_prompts_is_an_input_error(encoder):
    with pytest.raises(InputError):
        encode_prompts(encoder, [])


def test_cond_and_uncond_of_different_lengths_are_padded_to_match(encoder):
    cond = encode_prompts(encoder, ["cat " * 160] * 2)  # 3 chunks
    uncond = encode_prompts(encoder, ["blurry"] * 2)  # 1 chunk
    empty = encode_empty_chunk(encoder)
    padded_cond, padded_uncond = pad_cond_uncond(cond, uncond, empty)
    assert torch.equal(padded_cond, cond)
    assert padded_uncond.shape == (2, 231, 8)
    assert torch.equal(padded_uncond, torch.cat([uncond, empty.expand(2, -1, -1), empty.expand(2, -1, -1)], dim=1))
    swapped_uncond, swapped_cond = pad_cond_uncond(uncond, cond, empty)
    assert torch.equal(swapped_uncond, padded_uncond) and torch.equal(swapped_cond, cond)


class OneEmbedding:
    """The lookup interface of adapters.embeddings for one two-vector embedding named 'my-style'."""

    def __init__(self):
        self.name = get_tokenizer().encode("my-style")

    def match(self, tokens, position):
        n = len(self.name)
        return ([49408, 49409], n) if list(tokens[position:position + n]) == self.name else None


def test_an_embedding_name_becomes_its_vector_ids():
    (chunk,) = tokenize_weighted("a (my-style:1.2) cat", get_tokenizer(), embeddings=OneEmbedding())
    assert chunk.ids[1:5] == [320, 49408, 49409, CAT]
    assert chunk.weights[1:5] == [1.0, 1.2, 1.2, 1.0]


def test_embedding_vectors_move_with_the_words_after_a_late_comma():
    chunks = tokenize_weighted("cat " * 70 + ", my-style dog dog dog", get_tokenizer(), embeddings=OneEmbedding())
    assert chunks[0].ids[1:72] == [CAT] * 70 + [COMMA] and chunks[0].ids[72:] == [END_ID] * 5
    assert chunks[1].ids[1:7] == [49408, 49409, DOG, DOG, DOG, END_ID]
