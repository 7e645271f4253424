"""`sdlab img2img`, `sdlab inpaint`, `sdlab outpaint`: PNGs whose parameters say how to make them again,
and one clear line for bad input."""

import os

import numpy as np
import pytest
from PIL import Image

from sdlab.cli import main
from sdlab.infotext import parse_infotext
from test_cli import assert_one_line_error, assert_one_line_pointing_at_help, run_cli
from test_img2img import sample_image


@pytest.fixture
def files(tmp_path):
    """An init image and a mask (white box) on disk; outputs go to tmp_path/out."""
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    sample_image(64, 48, seed=1).save(init)
    box = Image.new("L", (64, 48), 0)
    box.paste(255, (16, 16, 48, 32))
    box.save(mask)
    (tmp_path / "out").mkdir()
    return init, mask, tmp_path / "out"


def parameters(path) -> dict:
    with Image.open(path) as image:
        return parse_infotext(image.text["parameters"])


BASE = ["--model", "demo", "--steps", "2", "--seed", "3", "--quiet"]


def test_img2img_writes_the_strength_and_resize_mode(files):
    init, _, out = files
    assert main(["img2img", "a red disc", "--init", str(init), "--strength", "0.5", "--size", "32x32",
                 "--resize-mode", "crop", "-o", str(out / "a.png"), *BASE]) == 0
    fields = parameters(out / "a.png")
    assert fields["Prompt"] == "a red disc" and fields["Size"] == "32x32" and fields["Seed"] == "3"
    assert fields["Denoising strength"] == "0.5" and fields["Resize mode"] == "Crop and resize"
    assert os.listdir(out) == ["a.png"]


def test_inpaint_writes_every_mask_option_in_the_web_ui_names(files, capsys):
    init, mask, out = files
    assert main(["inpaint", "a cat", "--init", str(init), "--mask", str(mask), "--mask-blur", "2", "--only-masked",
                 "--padding", "8", "--fill", "latent-noise", "--invert-mask", "--size", "32x32",
                 "-o", str(out / "b.png"), *BASE]) == 0
    fields = parameters(out / "b.png")
    assert fields["Denoising strength"] == "0.75" and fields["Mask blur"] == "2"
    assert fields["Inpaint area"] == "Only masked" and fields["Masked area padding"] == "8"
    assert fields["Mask mode"] == "Inpaint not masked" and fields["Masked content"] == "latent noise"
    with Image.open(out / "b.png") as image:
        assert image.size == (64, 48), "only-masked keeps the image's size"


def test_inpaint_keeps_the_unmasked_pixels(files):
    init, mask, out = files
    assert main(["inpaint", "x", "--init", str(init), "--mask", str(mask), "--mask-blur", "0", "--strength", "1",
                 "-o", str(out / "c.png"), *BASE]) == 0
    ours = np.asarray(Image.open(out / "c.png")).astype(int)
    original = np.asarray(Image.open(init)).astype(int)
    assert np.array_equal(ours[:16], original[:16]) and np.array_equal(ours[32:], original[32:])
    assert np.abs(ours[16:32, 16:48] - original[16:32, 16:48]).mean() > 10


def test_mask_of_another_size_is_a_warning_line(files, tmp_path, capsys):
    init, _, out = files
    small = tmp_path / "small.png"
    box = Image.new("L", (32, 24), 0)
    box.paste(255, (8, 8, 24, 16))
    box.save(small)
    assert main(["inpaint", "x", "--init", str(init), "--mask", str(small), "-o", str(out / "d.png"), *BASE]) == 0
    err = capsys.readouterr().err
    assert "sdlab: warning: the mask is 32x24 but the image is 64x48; stretching the mask to the image" in err


def test_outpaint_writes_the_extended_canvas(files):
    init, _, out = files
    assert main(["outpaint", "a beach", "--init", str(init), "--extend", "left=16,bottom=16",
                 "-o", str(out / "e.png"), *BASE]) == 0
    with Image.open(out / "e.png") as image:
        assert image.size == (80, 64)
    fields = parameters(out / "e.png")
    assert fields["Outpaint extend"] == "left=16,right=0,top=0,bottom=16" and fields["Size"] == "80x64"
    assert fields["Denoising strength"] == "0.8" and fields["Masked content"] == "original"


@pytest.mark.parametrize("command, extra, fragment", [
    ("img2img", ["--init", "{missing}"], "init image not found"),
    ("img2img", ["--init", "{broken}"], "cannot read init image"),
    ("img2img", ["--init", "{init}", "--strength", "1.5"], "denoising strength must be a number from 0"),
    ("inpaint", ["--init", "{init}", "--mask", "{black}"], "nothing to inpaint"),
    ("inpaint", ["--init", "{init}", "--mask", "{missing}"], "mask not found"),
    ("outpaint", ["--init", "{init}", "--extend", "up=64"], "unknown side"),
    ("outpaint", ["--init", "{init}", "--extend", "left=64", "--size", "64x64"], "leave out --size"),
])
def test_bad_input_is_one_line(files, tmp_path, capsys, command, extra, fragment):
    init, _, out = files
    black = tmp_path / "black.png"
    Image.new("L", (64, 48), 0).save(black)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    paths = {"missing": tmp_path / "missing.png", "broken": broken, "init": init, "black": black}
    args = [arg.format(**paths) for arg in extra]
    code = main([command, "x", *args, "-o", str(out / "x.png"), *BASE])
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert os.listdir(out) == []


def test_the_installed_command_refuses_a_missing_init_in_one_line(tmp_path):
    code, _, stderr = run_cli("img2img", "x", "--init", str(tmp_path / "nowhere.png"), "--model", "demo",
                             "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, stderr, "init image not found")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, fragment, command", [
    (["img2img", "x", "--init", "in.png", "--strength", "half"], "invalid float value: 'half'", "sdlab img2img"),
    (["img2img", "x", "--init", "in.png", "--resize-mode", "zoom"], "invalid choice: 'zoom'", "sdlab img2img"),
    (["inpaint", "x", "--init", "in.png"], "the following arguments are required: --mask", "sdlab inpaint"),
    (["inpaint", "x", "--init", "in.png", "--mask", "m.png", "--size", "0x64"], "size must be positive",
     "sdlab inpaint"),
    (["outpaint", "x", "--init", "in.png", "--extend", "left=64", "--overlap", "x"], "invalid int value: 'x'",
     "sdlab outpaint"),
])
def test_argument_mistakes_are_one_line_pointing_at_the_commands_help(capsys, args, fragment, command):
    assert_one_line_pointing_at_help(capsys, lambda: main(args), fragment, command)


def test_without_o_each_command_has_its_outputs_subfolder(files, tmp_path):
    import datetime

    init, mask, _ = files
    outdir = tmp_path / "outputs"
    for command, extra in [("img2img", []), ("inpaint", ["--mask", str(mask)]), ("outpaint", ["--extend", "left=16"])]:
        assert main([command, "x", "--init", str(init), *extra, "--outdir", str(outdir), *BASE]) == 0
        assert os.listdir(outdir / command / datetime.date.today().isoformat()) == ["00000-3.png"]


def test_a_folder_given_as_the_mask_says_so(files, tmp_path, capsys):
    init, _, out = files
    code = main(["inpaint", "x", "--init", str(init), "--mask", str(tmp_path), "-o", str(out / "m.png"), *BASE])
    assert_one_line_error(code, capsys.readouterr().err, f"mask {tmp_path} is a directory; give an image file")
