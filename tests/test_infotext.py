"""PNG parameters in the web UI's format: written atomically, readable by its parser's rules."""

import os

import pytest
from PIL import Image

from sdlab.errors import InputError
from sdlab.infotext import format_infotext, parse_infotext
from sdlab.outputs import save_image as save_png


def test_format_matches_the_web_ui_layout():
    text = format_infotext(
        "a red circle", "blurry",
        {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 42, "Size": "512x512",
         "Model hash": None, "Model": "v1-5-pruned-emaonly"},
    )
    assert text == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly"
    )


def test_no_negative_line_when_empty_and_values_with_commas_are_quoted():
    text = format_infotext("p", "", {"Steps": 5, "Model": "a, b: c", "CFG scale": 7.5})
    assert text.splitlines() == ["p", 'Steps: 5, Model: "a, b: c", CFG scale: 7.5']


def test_parse_round_trip_multiline_prompt():
    params = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 6.5, "Seed": 1, "Size": "64x64",
              "Model": "x, y"}
    text = format_infotext("line one\nline two, (big:1.2)", "neg\nmore", params)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two, (big:1.2)"
    assert parsed["Negative prompt"] == "neg\nmore"
    assert parsed["Sampler"] == "DPM++ 2M Karras"
    assert parsed["CFG scale"] == "6.5"
    assert parsed["Model"] == "x, y"


def test_save_png_writes_parameters_chunk_atomically(tmp_path):
    path = tmp_path / "out.png"
    save_png(Image.new("RGB", (8, 8), "red"), str(path), "a\nSteps: 1, Sampler: Euler, Seed: 3")
    with Image.open(path) as image:
        assert image.text["parameters"] == "a\nSteps: 1, Sampler: Euler, Seed: 3"
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_save_png_refuses_missing_folder_and_leaves_nothing(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        save_png(Image.new("RGB", (8, 8)), str(tmp_path / "nope" / "out.png"), "x")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def explode(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", explode)
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (8, 8)), str(tmp_path / "out.png"), "x")
    assert os.listdir(tmp_path) == []


def test_variation_seed_fields_round_trip_in_the_web_uis_words():
    params = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 5, "Size": "64x64", "Model": "m",
              "Variation seed": 123, "Variation seed strength": 0.35, "Seed resize from": "512x768",
              "RNG": "CPU", "Noise": "per-image"}
    text = format_infotext("a <lora:ink:0.7> cat", "", params)
    assert "Variation seed: 123, Variation seed strength: 0.35, Seed resize from: 512x768, RNG: CPU" in text
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a <lora:ink:0.7> cat"
    assert {key: parsed[key] for key in ("Variation seed", "Variation seed strength", "Seed resize from", "Noise")} \
        == {"Variation seed": "123", "Variation seed strength": "0.35", "Seed resize from": "512x768",
            "Noise": "per-image"}


def test_field_names_with_hyphens_and_slashes_are_read_as_the_web_ui_reads_them():
    """The web UI's field pattern allows '-' and '/' in a name after its first character; a name that
    holds one must not lose its first words (it read 'attention scale' for 'Self-attention scale')."""
    text = "a red circle\nSteps: 20, Self-attention scale: 2, Hires CFG/steps: 7, Seed: 1"
    fields = parse_infotext(text)
    assert fields["Self-attention scale"] == "2" and fields["Hires CFG/steps"] == "7" and fields["Seed"] == "1"
    assert "attention scale" not in fields
