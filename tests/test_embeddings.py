"""Textual-inversion embeddings: the web UI's and diffusers' files give diffusers' conditioning, by name,
with as many token positions as vectors, without touching the token table; bad files fail clearly."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import sdlab
from sdlab.adapters.embeddings import (
    embedding_lookup, load_embeddings, loaded_embeddings, read_embeddings, ti_hashes, unload_embeddings,
    used_embeddings,
)
from sdlab.errors import CheckpointError, InputError
from sdlab.prompts import encode_prompts, tokenize_weighted
from sdlab.tokenizer import END_ID, VOCAB_SIZE, get_tokenizer

from test_pipeline_parity import tiny_diffusers_sd

TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # models this small run faster on one thread than on two fighting over two cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request, tmp_path_factory):
    """diffusers' tiny pipeline (the reference) and sdlab's text encoder loaded from the same folder."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = tiny_diffusers_sd(folder, request.param, "epsilon")
    return reference, sdlab.load(str(folder)).text_encoder


@pytest.fixture
def fresh(models):
    reference, text_encoder = models
    yield reference, text_encoder
    unload_embeddings(text_encoder)  # diffusers' unloading is slow: each test gives the reference its own token


def vectors(n, width, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write(path, fmt, vecs, token="my-style"):
    if fmt == "webui-pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs}, "name": token, "step": 1500,
                    "sd_checkpoint": "0123456789", "sd_checkpoint_name": "model"}, path)
    elif fmt == "webui-safetensors":
        save_file({"emb_params": vecs.contiguous()}, str(path))
    elif fmt == "diffusers-safetensors":
        save_file({token: vecs.contiguous()}, str(path))
    elif fmt == "diffusers-bin":
        torch.save({token: vecs[0] if len(vecs) == 1 else vecs}, path)  # diffusers' own files hold (D,)
    return path


FORMATS = {  # format -> file name (web UI files are named by their stem, diffusers files by their token)
    "webui-pt": "{token}.pt",
    "webui-safetensors": "{token}.safetensors",
    "diffusers-safetensors": "learned_embeds.safetensors",
    "diffusers-bin": "learned_embeds.bin",
}


@pytest.mark.parametrize("fmt, n", [(fmt, 3) for fmt in FORMATS] + [("diffusers-bin", 1), ("webui-pt", 1)])
def test_same_conditioning_as_diffusers(fresh, tmp_path, fmt, n):
    reference, text_encoder = fresh
    token = f"style-{fmt}-{n}"
    path = write(tmp_path / FORMATS[fmt].format(token=token), fmt, vectors(n, text_encoder.config.width), token)
    (embedding,) = load_embeddings(text_encoder, path)
    assert embedding.name == token and embedding.vectors.shape == (n, text_encoder.config.width)
    reference.load_textual_inversion(str(path), token=token)

    prompt = f"a {token} photo of a cat, {token}"
    with torch.no_grad():
        expected, _ = reference.encode_prompt(prompt, "cpu", 1, False)
        ours = encode_prompts(text_encoder, [prompt])
    torch.testing.assert_close(ours, expected, rtol=0, atol=TOLERANCE)


def test_an_embedding_takes_one_position_per_vector(fresh):
    _, text_encoder = fresh
    load_embeddings(text_encoder, {"emb_params": vectors(3, text_encoder.config.width)}, name="three-vec")
    lookup = embedding_lookup(text_encoder)
    (chunk,) = tokenize_weighted("a three-vec cat", get_tokenizer(), END_ID, lookup)
    tokenizer = get_tokenizer()
    a, cat = tokenizer.encode("a")[0], tokenizer.encode("cat")[0]
    assert chunk.ids[:6] == [49406, a, VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2, cat]


def test_embedding_vectors_reach_the_encoder_unchanged(fresh):
    _, text_encoder = fresh
    vecs = vectors(2, text_encoder.config.width)
    load_embeddings(text_encoder, {"emb_params": vecs}, name="two-vec")
    table = text_encoder.token_embedding
    ids = torch.tensor([[49406, VOCAB_SIZE, VOCAB_SIZE + 1, END_ID]])
    out = table(ids)
    assert torch.equal(out[0, 1:3], vecs)
    assert torch.equal(out[0, 0], table.weight[49406])


def test_an_embedding_that_does_not_fit_moves_whole_to_the_next_chunk(fresh):
    _, text_encoder = fresh
    load_embeddings(text_encoder, {"emb_params": vectors(4, text_encoder.config.width)}, name="four-vec")
    chunks = tokenize_weighted("cat " * 73 + "four-vec", get_tokenizer(), END_ID, embedding_lookup(text_encoder))
    assert len(chunks) == 2
    assert chunks[0].ids[74:] == [END_ID] * 3  # 73 cats, then padding: the 4 vectors do not fit in 2 places
    assert chunks[1].ids[1:5] == [VOCAB_SIZE + i for i in range(4)]


def test_the_token_table_is_neither_copied_nor_changed_and_unload_restores_it(fresh):
    _, text_encoder = fresh
    table = text_encoder.token_embedding
    pointer, before = table.weight.data_ptr(), table.weight.detach().clone()
    keys = list(text_encoder.state_dict())
    prompt = ["a my-style cat"]
    plain = encode_prompts(text_encoder, prompt)
    load_embeddings(text_encoder, {"emb_params": vectors(2, text_encoder.config.width)}, name="my-style")
    assert table.weight.data_ptr() == pointer and torch.equal(table.weight, before)
    assert list(text_encoder.state_dict()) == keys
    assert not torch.equal(encode_prompts(text_encoder, prompt), plain)
    unload_embeddings(text_encoder)
    assert loaded_embeddings(text_encoder) == {} and "forward" not in vars(table)
    assert torch.equal(encode_prompts(text_encoder, prompt), plain)


def test_the_longest_matching_name_wins(fresh):
    _, text_encoder = fresh
    width = text_encoder.config.width
    load_embeddings(text_encoder, [{"emb_params": vectors(1, width)}], name="style-v")
    load_embeddings(text_encoder, [{"emb_params": vectors(2, width, seed=1)}], name="style-v-two")
    (chunk,) = tokenize_weighted("style-v-two", get_tokenizer(), END_ID, embedding_lookup(text_encoder))
    ids = loaded_embeddings(text_encoder)
    assert set(ids) == {"style-v", "style-v-two"}
    assert chunk.ids[1:4] == [VOCAB_SIZE + 1, VOCAB_SIZE + 2, END_ID]


def test_a_name_that_is_an_ordinary_word_is_refused(fresh):
    _, text_encoder = fresh
    with pytest.raises(InputError, match="ordinary word 'cat'.*distinct name"):
        load_embeddings(text_encoder, {"emb_params": vectors(1, text_encoder.config.width)}, name="cat")
    assert loaded_embeddings(text_encoder) == {}


def test_an_embedding_for_another_width_is_refused_and_nothing_is_loaded(fresh, tmp_path):
    _, text_encoder = fresh
    width = text_encoder.config.width
    good = write(tmp_path / "good-one.pt", "webui-pt", vectors(1, width))
    wrong = write(tmp_path / "other-family.safetensors", "webui-safetensors", vectors(1, width + 32))
    with pytest.raises(InputError, match=f"other-family.*{width + 32}-wide vectors.*{width} wide"):
        load_embeddings(text_encoder, [good, wrong])
    assert loaded_embeddings(text_encoder) == {}


def test_an_sd1_embedding_on_sd2_names_both_families(fresh):
    _, text_encoder = fresh
    embedding = read_embeddings({"emb_params": torch.zeros(1, 768)}, name="sd-one-style")[0]
    if text_encoder.config.width == 768:
        pytest.fail("the tiny encoders are narrower than SD's")
    with pytest.raises(InputError, match=r"SD 1\.x"):
        load_embeddings(text_encoder, [embedding])


def test_sdxl_and_unknown_files_are_refused(tmp_path):
    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(sdxl))
    with pytest.raises(CheckpointError, match="SDXL"):
        read_embeddings(sdxl)
    odd = tmp_path / "odd.pt"
    torch.save({"weights": [1, 2, 3], "name": "odd"}, odd)
    with pytest.raises(CheckpointError, match="not a textual-inversion embedding"):
        read_embeddings(odd)


class NotAllowed:
    pass


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "payload": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        read_embeddings(path)


def test_the_original_textual_inversion_parameter_dict_loads(tmp_path):
    path = tmp_path / "original.pt"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(2, 8))})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "x"}, path)
    (embedding,) = read_embeddings(path)
    assert embedding.name == "original" and torch.equal(embedding.vectors, torch.ones(2, 8))


def test_ti_hashes_lists_the_embeddings_a_prompt_uses(fresh, tmp_path):
    _, text_encoder = fresh
    width = text_encoder.config.width
    used = write(tmp_path / "my-style.pt", "webui-pt", vectors(1, width))
    unused = write(tmp_path / "other-style.safetensors", "webui-safetensors", vectors(1, width))
    load_embeddings(text_encoder, tmp_path)  # a folder
    assert set(loaded_embeddings(text_encoder)) == {"my-style", "other-style"}
    found = used_embeddings(text_encoder, ["a my-style cat", "blurry, [my-style:dog:3]"])
    assert [e.name for e in found] == ["my-style"]
    assert ti_hashes(found) == f"my-style: {hashlib.sha256(used.read_bytes()).hexdigest()[:12]}"
    assert unused.exists()
