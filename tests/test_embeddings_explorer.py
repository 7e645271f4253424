"""`sdlab embeddings`: nearest tokens sorted by cosine similarity without the word itself, a labelled map,
and projector files that round-trip with one vector per metadata line; on the bundled model's encoder."""

import os

import pytest
import torch
from PIL import Image

import sdlab
from sdlab.cli import main
from sdlab.inside.embeddings import (
    contextual_vectors, default_export_words, export_projector, nearest_to_word, read_projector, token_table,
    word_token_ids,
)
from sdlab.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def text_encoder():
    return sdlab.load(device="cpu").text_encoder


def test_nearest_tokens_are_sorted_and_leave_out_the_word(text_encoder):
    ids, neighbours = nearest_to_word(text_encoder, "red", k=10)
    assert ids == get_tokenizer().encode("red")
    assert len(neighbours) == 10
    scores = [n.score for n in neighbours]
    assert scores == sorted(scores, reverse=True)
    assert all(n.token_id not in ids for n in neighbours)
    table = token_table(text_encoder)
    best = torch.nn.functional.cosine_similarity(table, table[ids[0]][None], dim=1)
    best[ids[0]] = -2
    assert neighbours[0].token_id == int(best.argmax())
    assert neighbours[0].score == pytest.approx(float(best.max()), abs=1e-6)


def test_a_word_of_several_tokens_uses_their_mean_and_leaves_all_of_them_out(text_encoder):
    ids, neighbours = nearest_to_word(text_encoder, "circlesquaretriangle", k=20)
    assert len(ids) > 1
    assert not {n.token_id for n in neighbours} & set(ids)


def test_export_round_trips_with_one_vector_per_label(text_encoder, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("red\nblue\n\ncircle\ncirclesquaretriangle\n")
    from sdlab.inside.embeddings import read_word_file

    rows = export_projector(text_encoder, str(tmp_path / "out"), read_word_file(str(words)),
                            ["a red circle"])
    vectors, labels = read_projector(str(tmp_path / "out"))
    assert rows == len(labels) == vectors.shape[0] == 4 + 5  # 4 words; start, a, red, circle, end
    assert labels[:4] == ["red", "blue", "circle", "circlesquaretriangle"]
    assert labels[4:] == [f"{t} · a red circle" for t in ["<start_of_text>", "a", "red", "circle", "<end_of_text>"]]
    table = token_table(text_encoder)
    assert torch.allclose(vectors[0], table[word_token_ids("red")[0]], rtol=1e-5, atol=1e-5)
    assert torch.allclose(vectors[3], table[word_token_ids("circlesquaretriangle")].mean(0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(vectors[4:], contextual_vectors(text_encoder, "a red circle")[1], rtol=1e-5, atol=1e-5)
    # the projector's format: tab-separated numbers, no header; a single metadata column has no header either
    first = (tmp_path / "out" / "vectors.tsv").read_text().splitlines()[0].split("\t")
    assert len(first) == table.shape[1] and float(first[0]) == pytest.approx(float(vectors[0, 0]))


def test_default_export_is_the_commonest_whole_words():
    words = default_export_words(50)
    assert len(words) == 50 and words[0][0] == "the"
    assert all(len(ids) == 1 and "\t" not in label for label, ids in words)


def test_map_command_writes_a_labelled_png(tmp_path):
    out = tmp_path / "map.png"
    assert main(["embeddings", "map", "red", "green", "blue", "circle", "-o", str(out), "--device", "cpu"]) == 0
    image = Image.open(out)
    assert image.size == (768, 768)
    assert len(set(image.convert("L").getdata())) > 2  # dots and labels on the white square


@pytest.mark.parametrize("argv, message", [
    (["embeddings", "map", "red", "-o", "{tmp}/map.png"], "at least two words"),
    (["embeddings", "map", "red", " ", "-o", "{tmp}/map.png"], "has no tokens"),
    (["embeddings", "nearest", "red", "-k", "0"], "-k must be 1 or more"),
    (["embeddings", "export", "-o", "{tmp}/out", "--words", "{tmp}/missing.txt"], "cannot read the word file"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []
