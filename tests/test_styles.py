"""Prompt styles read from a web UI styles.csv and applied as the web UI applies them."""

import pytest

from sdlab.errors import InputError
from sdlab.styles import Style, apply_styles, load_styles, merge_prompt


@pytest.fixture
def styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    # the web UI writes a byte-order mark and quotes fields with commas
    path.write_text('name,prompt,negative_prompt\n'
                    'cinematic,"{prompt}, film grain, dramatic light",cartoon\n'
                    'sharp,"highly detailed, sharp focus","blurry, lowres"\n'
                    'empty,,\n', encoding="utf-8-sig")
    return str(path)


def test_load_styles_reads_the_web_uis_file(styles_file):
    styles = load_styles(styles_file)
    assert list(styles) == ["cinematic", "sharp", "empty"]
    assert styles["cinematic"] == Style("cinematic", "{prompt}, film grain, dramatic light", "cartoon")
    assert styles["empty"] == Style("empty", "", "")


def test_the_old_two_column_format_is_read(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("name, text\nwarm, warm colours\n")
    assert load_styles(str(path)) == {"warm": Style("warm", "warm colours", "")}


def test_prompt_placeholder_or_appended_with_a_comma():
    assert merge_prompt("{prompt}, film grain", "a cat") == "a cat, film grain"
    assert merge_prompt("sharp focus", "a cat ") == "a cat, sharp focus"
    assert merge_prompt("sharp focus", "") == "sharp focus"
    assert merge_prompt("", "a cat") == "a cat"


def test_styles_apply_in_order_to_prompt_and_negative(styles_file):
    styles = load_styles(styles_file)
    assert apply_styles("a cat", "", ["cinematic", "sharp"], styles) == (
        "a cat, film grain, dramatic light, highly detailed, sharp focus", "cartoon, blurry, lowres")
    assert apply_styles("a cat", "dog", ["sharp", "cinematic"], styles) == (
        "a cat, highly detailed, sharp focus, film grain, dramatic light", "dog, blurry, lowres, cartoon")
    assert apply_styles("a cat", "dog", [], styles) == ("a cat", "dog")


def test_unknown_style_names_the_known_ones(styles_file):
    with pytest.raises(InputError, match="unknown style 'noir'; the styles file has: cinematic, empty, sharp"):
        apply_styles("a cat", "", ["sharp", "noir"], load_styles(styles_file))


def test_bad_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="styles file not found"):
        load_styles(str(tmp_path / "missing.csv"))
    with pytest.raises(InputError, match="is a directory"):
        load_styles(str(tmp_path))
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("title,body\na,b\n")
    with pytest.raises(InputError, match="needs the columns name,prompt,negative_prompt"):
        load_styles(str(wrong))
