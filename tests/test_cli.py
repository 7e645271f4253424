"""The `sdlab` command as a user meets it: images with parameters, and one clear line on bad input."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from sdlab.cli import main


def run_cli(*args, stdin=None):
    """Run the real entry point in a subprocess, as a user's shell would."""
    proc = subprocess.run(
        [sys.executable, "-m", "sdlab", *args], capture_output=True, text=True, input=stdin, timeout=300,
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(code, stderr, fragment):
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("sdlab: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert fragment in lines[0], lines[0]


def test_generate_with_demo_model_writes_png_with_parameters(tmp_path):
    out = tmp_path / "demo.png"
    code, stdout, stderr = run_cli("generate", "a red circle", "--model", "demo", "--steps", "3",
                                   "--seed", "7", "--size", "64x48", "-o", str(out), "--negative", "blue")
    assert code == 0, stderr
    with Image.open(out) as image:
        assert image.size == (64, 48)
        text = image.text["parameters"]
    assert text.startswith("a red circle\nNegative prompt: blue\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 7, Size: 64x48")
    assert "Model: sdlab-demo-random" in text
    assert os.listdir(tmp_path) == ["demo.png"]


def test_same_seed_same_image_and_batch_files(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        assert main(["generate", "x", "--model", "demo", "--steps", "2", "--seed", "3", "--size", "32x32",
                     "--batch", "2", "--quiet", "-o", str(path)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["a-1.png", "a.png", "b-1.png", "b.png"]
    assert Image.open(a).tobytes() == Image.open(b).tobytes()
    assert Image.open(a).tobytes() != Image.open(tmp_path / "a-1.png").tobytes()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "/nonexistent/model.safetensors"], "not found"),
        (["--model", "demo", "--sampler", "warp drive"], "unknown sampler"),
        (["--model", "demo", "--size", "65x64"], "multiple of 8"),
        (["--model", "demo", "--steps", "0"], "steps"),
        (["--model", "demo", "--noise", "quantum"], "noise"),
        (["--model", "demo", "--size", "0x64"], "size must be positive"),
        (["--model", "demo", "--cfg", "abc"], "invalid float value: 'abc'"),
    ],
)
def test_bad_generation_input_is_one_line(tmp_path, args, fragment):
    code, _, stderr = run_cli("generate", "a cat", "-o", str(tmp_path / "x.png"), *args)
    assert_one_line_error(code, stderr, fragment)
    assert os.listdir(tmp_path) == []


def assert_one_line_pointing_at_help(capsys, run, fragment, command):
    """A mistake argparse catches: one line naming it and the command's --help, exit 2, no usage dump."""
    with pytest.raises(SystemExit) as exited:
        run()
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert_one_line_error(2, stderr, fragment)
    assert stderr.strip().endswith(f"; see `{command} --help`"), stderr


@pytest.mark.parametrize(
    "args, fragment, command",
    [
        (["generate", "x", "--cfg", "abc"], "argument --cfg: invalid float value: 'abc'", "sdlab generate"),
        (["generate", "x", "--size", "big"], "size must look like 512x512, got 'big'", "sdlab generate"),
        (["generate", "x", "--size", "0x64"], "size must be positive", "sdlab generate"),
        (["generate", "x", "--size", "64x0"], "size must be positive", "sdlab generate"),
        (["generate", "x", "--size=-8x64"], "size must be positive", "sdlab generate"),
        (["generate", "x", "--bogus"], "unrecognized arguments: --bogus", "sdlab generate"),
        (["generate"], "the following arguments are required: prompt", "sdlab generate"),
        (["upscale", "low.png", "x", "--size", "0x0"], "size must be positive", "sdlab upscale"),
        (["train", "unet", "--steps", "x"], "argument --steps: invalid int value: 'x'", "sdlab train unet"),
        (["train", "unet", "--nope"], "unrecognized arguments: --nope", "sdlab train unet"),
        (["train"], "the following arguments are required", "sdlab train"),
        (["eval", "shapes", "-n", "x"], "invalid int value: 'x'", "sdlab eval shapes"),
        (["generat", "x"], "invalid choice: 'generat'", "sdlab"),
        ([], "the following arguments are required: command", "sdlab"),
    ],
)
def test_argument_mistakes_are_one_line_pointing_at_the_commands_help(capsys, args, fragment, command):
    assert_one_line_pointing_at_help(capsys, lambda: main(args), fragment, command)


def test_the_training_module_points_at_its_own_help(capsys):
    """`python -m sdlab.training` (what torchrun starts) reports argument mistakes the same way."""
    from sdlab.cli.train import main as train_main

    assert_one_line_pointing_at_help(capsys, lambda: train_main(["unet", "--steps", "x"]),
                                     "invalid int value: 'x'", "python -m sdlab.training train unet")


def test_empty_prompt_without_negative_is_refused(tmp_path):
    code, _, stderr = run_cli("generate", "  ", "--model", "demo", "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, stderr, "prompt is empty")


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage" * 10)
    code, _, stderr = run_cli("generate", "a cat", "--model", str(corrupt), "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, stderr, "corrupt.safetensors")

    from safetensors.torch import save_file
    import torch

    foreign = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, str(foreign))
    code, _, stderr = run_cli("generate", "a cat", "--model", str(foreign), "-o", str(tmp_path / "y.png"))
    assert_one_line_error(code, stderr, "LoRA")

    sdxl_like = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, str(sdxl_like))
    code, _, stderr = run_cli("generate", "a cat", "--model", str(sdxl_like), "-o", str(tmp_path / "z.png"))
    assert_one_line_error(code, stderr, "SDXL")
    assert not list(tmp_path.glob("*.png"))


def test_tokenize_shows_ids_and_json():
    code, stdout, _ = run_cli("tokenize", "Dreamshape", "a photo of a cat")
    assert code == 0
    assert "'Dreamshape': 2 tokens" in stdout
    code, stdout, _ = run_cli("tokenize", "--json", "-", stdin="a photo of a cat\nhello\n")
    assert code == 0
    assert json.loads(stdout) == [[320, 1125, 539, 320, 2368], [3306]]


def test_samplers_lists_web_ui_names_and_aliases():
    code, stdout, _ = run_cli("samplers")
    assert code == 0
    assert "DPM++ 2M Karras" in stdout and "dpmpp_2m_karras" in stdout and "euler_a" in stdout


def test_embeddings_loras_and_prompt_editing_from_the_command_line(tmp_path):
    import torch
    from safetensors.torch import save_file

    embedding = tmp_path / "sdlabstyle.safetensors"
    save_file({"emb_params": torch.randn(2, 64)}, str(embedding))  # the demo text encoder is 64 wide
    out = tmp_path / "emb.png"
    assert main(["generate", "a sdlabstyle cat, [red:blue:0.5]", "--model", "demo", "--embedding", str(embedding),
                 "--steps", "2", "--size", "32x32", "--seed", "1", "--quiet", "-o", str(out)]) == 0
    text = Image.open(out).text["parameters"]
    assert text.startswith("a sdlabstyle cat, [red:blue:0.5]\n")  # the prompt as written, editing syntax kept
    assert 'TI hashes: "sdlabstyle: ' in text

    code, _, stderr = run_cli("generate", "a cat <lora:missing:0.5>", "--model", "demo", "--steps", "2",
                              "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, stderr, "no LoRA file called 'missing'")
    code, _, stderr = run_cli("generate", "a cat", "--model", "demo", "--lora", str(tmp_path / "nope.safetensors:0.7"),
                              "-o", str(tmp_path / "y.png"))
    assert_one_line_error(code, stderr, "not found")


def test_out_of_memory_is_one_line_not_a_traceback(monkeypatch, capsys):
    import sdlab.cli.info as cli

    def exhausted(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1099511627776 bytes")

    monkeypatch.setattr(cli, "cmd_samplers", exhausted)
    assert main(["samplers"]) == 1
    assert capsys.readouterr().err.startswith("sdlab: error: out of memory; try a smaller --size")

    def broken(args):
        raise RuntimeError("a programming error, not the user's")

    monkeypatch.setattr(cli, "cmd_samplers", broken)
    with pytest.raises(RuntimeError, match="programming error"):
        main(["samplers"])
