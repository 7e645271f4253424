"""Saved images as the web UI saves them: its folder and numbering, never overwriting, and the
generation parameters where its readers look for them (PNG text chunk, JPEG/WebP EXIF UserComment)."""

import datetime
import os
import struct

import pytest
from PIL import Image

from sdlab.errors import InputError
from sdlab.outputs import (day_folder, encode_image, grid_rows, image_grid, next_number, read_parameters,
                           read_user_comment, save_image, save_numbered, user_comment)

INFOTEXT = ('a red circle, (sharp:1.2), 日本 ✓\nNegative prompt: blue\n'
            'Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 31, Size: 16x16')


def picture(colour="red", size=(16, 16)):
    return Image.new("RGB", size, colour)


def piexif_user_comment(data: bytes) -> str:
    """The UserComment of a JPEG's or WebP's EXIF, read the way piexif reads it: walk the TIFF
    structure to the Exif IFD (tag 0x8769) and its UserComment (tag 0x9286, type UNDEFINED), then
    `UserComment.load`: an 8-byte character code and, for UNICODE, UTF-16 big-endian."""
    if data.startswith(b"\xff\xd8"):  # JPEG: the APP1 segment "Exif\0\0" + TIFF
        at = 2
        while data[at + 1] != 0xE1:
            at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        tiff = data[at + 4 + 6:]
    else:  # WebP: the RIFF chunk "EXIF" holds TIFF (with or without "Exif\0\0")
        tiff = data[data.index(b"EXIF") + 8:]
        tiff = tiff[6:] if tiff.startswith(b"Exif") else tiff
    order = {b"MM": ">", b"II": "<"}[tiff[:2]]

    def entries(offset):
        count = struct.unpack(order + "H", tiff[offset:offset + 2])[0]
        for i in range(count):
            yield struct.unpack(order + "HHII", tiff[offset + 2 + 12 * i:offset + 14 + 12 * i])

    ifd0 = struct.unpack(order + "I", tiff[4:8])[0]
    exif_ifd = next(value for tag, _, _, value in entries(ifd0) if tag == 0x8769)
    tag, kind, count, offset = next(e for e in entries(exif_ifd) if e[0] == 0x9286)
    assert kind == 7  # UNDEFINED, as piexif writes UserComment
    raw = tiff[offset:offset + count]
    assert raw[:8] == b"UNICODE\0"
    return raw[8:].decode("utf_16_be")


def test_user_comment_is_what_piexif_dumps_with_unicode_encoding():
    assert user_comment("ab") == b"UNICODE\0\x00a\x00b"
    assert read_user_comment(user_comment(INFOTEXT)) == INFOTEXT
    assert read_user_comment(b"ASCII\0\0\0plain") == "plain"


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.jpeg", "a.webp"])
def test_every_format_carries_the_parameters_back(tmp_path, name):
    path = str(tmp_path / name)
    assert save_image(picture(), path, INFOTEXT) == path
    assert read_parameters(path) == INFOTEXT
    with Image.open(path) as image:
        assert image.format == {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[name.split(".")[1]]
        if image.format == "PNG":
            assert image.text["parameters"] == INFOTEXT
        else:
            assert read_user_comment(image.getexif().get_ifd(0x8769)[0x9286]) == INFOTEXT
    if not name.endswith(".png"):
        assert piexif_user_comment((tmp_path / name).read_bytes()) == INFOTEXT


def test_an_image_without_parameters_reads_none_and_bad_paths_are_one_line(tmp_path):
    picture().save(tmp_path / "plain.png")
    picture().save(tmp_path / "plain.jpg")
    assert read_parameters(str(tmp_path / "plain.png")) is None
    assert read_parameters(str(tmp_path / "plain.jpg")) is None
    with pytest.raises(InputError, match="image not found"):
        read_parameters(str(tmp_path / "missing.png"))
    with pytest.raises(InputError, match="is a directory"):
        read_parameters(str(tmp_path))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        read_parameters(str(tmp_path / "junk.png"))


def test_save_image_replaces_atomically_and_refuses_unknown_extensions(tmp_path):
    path = str(tmp_path / "out.png")
    save_image(picture("red"), path, "first")
    save_image(picture("blue"), path, "second")
    assert read_parameters(path) == "second"
    assert os.listdir(tmp_path) == ["out.png"], "no temporary file left behind"
    with pytest.raises(InputError, match=r"\.png, \.jpg or \.webp"):
        save_image(picture(), str(tmp_path / "out.gif"))
    with pytest.raises(InputError, match="output folder does not exist"):
        save_image(picture(), str(tmp_path / "nowhere" / "out.png"))


def test_day_folder_is_the_web_uis_layout():
    expected = os.path.join("outputs", "txt2img", "2026-12-07")
    assert day_folder("outputs", "txt2img", datetime.date(2026, 12, 7)) == expected
    assert day_folder("o", "extras").endswith(datetime.date.today().isoformat())
    with pytest.raises(ValueError):
        day_folder("o", "painting")


def test_numbers_continue_after_the_highest_in_the_folder(tmp_path):
    assert next_number(str(tmp_path / "missing")) == 0
    for name in ["00003-7.png", "00011-2.jpg", "notes.txt", "grid-00040.png", "00005.webp"]:
        (tmp_path / name).write_bytes(b"")
    assert next_number(str(tmp_path)) == 12, "grids and other files do not count for images"
    assert next_number(str(tmp_path), "grid") == 41
    path = save_numbered(picture(), str(tmp_path), INFOTEXT, seed=31)
    assert os.path.basename(path) == "00012-31.png" and read_parameters(path) == INFOTEXT
    assert os.path.basename(save_numbered(picture(), str(tmp_path), seed=31, fmt="jpg")) == "00013-31.jpg"
    assert os.path.basename(save_numbered(picture(), str(tmp_path), prefix="grid")) == "grid-00041.png"


def test_save_numbered_makes_the_folder_and_never_overwrites(tmp_path, monkeypatch):
    folder = str(tmp_path / "outputs" / "txt2img" / "2026-12-07")
    assert save_numbered(picture(), folder, seed=1).endswith("00000-1.png")
    # another process takes the name between the choice of number and the write: the next number is used
    import sdlab.outputs as outputs

    (tmp_path / "outputs" / "txt2img" / "2026-12-07" / "00001-1.png").write_bytes(b"theirs")
    monkeypatch.setattr(outputs, "next_number", lambda folder, prefix="": 1)
    path = save_numbered(picture(), folder, seed=1)
    assert path.endswith("00002-1.png")
    assert (tmp_path / "outputs" / "txt2img" / "2026-12-07" / "00001-1.png").read_bytes() == b"theirs"
    assert sorted(os.listdir(folder)) == ["00000-1.png", "00001-1.png", "00002-1.png"]


def test_grid_is_the_web_uis_near_square_layout():
    assert [grid_rows(n) for n in (1, 2, 3, 4, 5, 6, 7, 9, 10)] == [1, 1, 2, 2, 2, 2, 3, 3, 3]
    colours = ["red", "green", "blue", "white", "yellow"]
    grid = image_grid([picture(c, (8, 6)) for c in colours])
    assert grid.size == (3 * 8, 2 * 6)  # 5 images: 2 rows of 3, the last spot black
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((8, 0)) == (0, 128, 0)
    assert grid.getpixel((0, 6)) == (255, 255, 255) and grid.getpixel((8, 6)) == (255, 255, 0)
    assert grid.getpixel((16, 6)) == (0, 0, 0)
    assert image_grid([picture()], rows=1).size == (16, 16)


def test_png_bytes_keep_the_text_chunk():
    data = encode_image(picture(), "png", INFOTEXT)
    assert b"tEXt" in data or b"iTXt" in data
    with pytest.raises(InputError, match="png, jpg, webp"):
        encode_image(picture(), "gif")


def test_parameters_too_long_for_a_jpeg_are_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="too long for a JPEG"):
        save_image(picture(), str(tmp_path / "long.jpg"), "x" * 40000)
    save_image(picture(), str(tmp_path / "long.webp"), "x" * 40000)
    assert read_parameters(str(tmp_path / "long.webp")) == "x" * 40000
    assert os.listdir(tmp_path) == ["long.webp"]
