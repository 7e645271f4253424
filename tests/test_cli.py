"""The `sdlab` command as a user meets it: images with parameters, and one clear line on bad input."""

import contextlib
import io
import json
import os
import re
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


def run_main(*args, stdin=None):
    """The same entry point's main() in this process, its output captured: (exit code, stdout, stderr).
    For what a command does and says; each run_cli pays a new interpreter importing torch (seconds on
    a small machine), so run_cli stays for the tests of the process itself."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            stdin_from(io.StringIO(stdin) if stdin is not None else sys.stdin):
        try:
            code = main(list(args))
        except SystemExit as exited:  # argparse's --version, --help and mistakes
            code = exited.code
    return 0 if code is None else code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def stdin_from(stream):
    saved, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = saved


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
    assert text.startswith("a red circle\nNegative prompt: blue\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 7, Size: 64x48")
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
    code, _, stderr = run_main("generate", "a cat", "-o", str(tmp_path / "x.png"), *args)
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
    code, _, stderr = run_main("generate", "  ", "--model", "demo", "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, stderr, "prompt is empty")


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage" * 10)
    code, _, stderr = run_main("generate", "a cat", "--model", str(corrupt), "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, stderr, "corrupt.safetensors")

    from safetensors.torch import save_file
    import torch

    foreign = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, str(foreign))
    code, _, stderr = run_main("generate", "a cat", "--model", str(foreign), "-o", str(tmp_path / "y.png"))
    assert_one_line_error(code, stderr, "LoRA")

    sdxl_like = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, str(sdxl_like))
    code, _, stderr = run_main("generate", "a cat", "--model", str(sdxl_like), "-o", str(tmp_path / "z.png"))
    assert_one_line_error(code, stderr, "SDXL")
    assert not list(tmp_path.glob("*.png"))


def test_tokenize_shows_ids_and_json():
    code, stdout, _ = run_main("tokenize", "Dreamshape", "a photo of a cat")
    assert code == 0
    assert "'Dreamshape': 2 tokens" in stdout
    code, stdout, _ = run_main("tokenize", "--json", "-", stdin="a photo of a cat\nhello\n")
    assert code == 0
    assert json.loads(stdout) == [[320, 1125, 539, 320, 2368], [3306]]


def test_samplers_lists_web_ui_names_and_aliases():
    code, stdout, _ = run_main("samplers")
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

    code, _, stderr = run_main("generate", "a cat <lora:missing:0.5>", "--model", "demo", "--steps", "2",
                              "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, stderr, "no LoRA file called 'missing'")
    code, _, stderr = run_main("generate", "a cat", "--model", "demo", "--lora", str(tmp_path / "nope.safetensors:0.7"),
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


# -- where images go: the web UI's numbered outputs folder, PNG/JPEG/WebP, grids, styles -----------------

TINY = ["--model", "demo", "--steps", "2", "--size", "32x32", "--quiet"]


def today_folder(root, kind="txt2img"):
    import datetime

    return root / "outputs" / kind / datetime.date.today().isoformat()


def test_without_o_images_are_numbered_in_the_outputs_folder_and_never_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = today_folder(tmp_path)
    assert main(["generate", "x", "--seed", "7", *TINY]) == 0
    assert main(["generate", "x", "--seed", "7", *TINY]) == 0
    assert sorted(os.listdir(folder)) == ["00000-7.png", "00001-7.png"]
    (folder / "00041-3.png").write_bytes(b"someone else's")  # numbering goes on from the highest, as the web UI's
    assert main(["generate", "x", "--seed", "5", "--batch", "2", *TINY]) == 0  # per-image noise: image i is seed + i
    assert {"00042-5.png", "00043-6.png"} <= set(os.listdir(folder))
    assert (folder / "00041-3.png").read_bytes() == b"someone else's"
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [f"wrote {os.path.join('outputs', 'txt2img', folder.name, name)}"
                            for name in ("00042-5.png", "00043-6.png")]
    assert Image.open(folder / "00042-5.png").text["parameters"].startswith("x\nSteps: 2")


def test_outdir_and_the_commands_subfolder(tmp_path, capsys):
    init = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(init)
    assert main(["img2img", "x", "--init", str(init), "--seed", "1", "--outdir", str(tmp_path / "mine"), *TINY]) == 0
    assert os.listdir(tmp_path / "mine" / "img2img" / today_folder(tmp_path).name) == ["00000-1.png"]


@pytest.mark.parametrize("args, name, pillow_format", [
    (["-o", "{tmp}/a.jpg"], "a.jpg", "JPEG"),
    (["-o", "{tmp}/a.webp"], "a.webp", "WEBP"),
    (["-o", "{tmp}/a.jpeg", "--format", "jpg"], "a.jpeg", "JPEG"),
    (["--format", "webp", "--outdir", "{tmp}/outputs"], "outputs/txt2img/{day}/00000-3.webp", "WEBP"),
])
def test_jpeg_and_webp_carry_the_parameters_in_exif(tmp_path, args, name, pillow_format):
    from sdlab.outputs import read_parameters

    day = today_folder(tmp_path).name
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["generate", "a cat", "--seed", "3", *TINY, *args]) == 0
    path = tmp_path / name.format(day=day)
    with Image.open(path) as image:
        assert image.format == pillow_format
        assert "parameters" not in image.info
    assert read_parameters(str(path)).startswith("a cat\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3, Size: 32x32")


@pytest.mark.parametrize("args, fragment", [
    (["-o", "{tmp}/a.gif"], "-o must name a .png, .jpg or .webp file"),
    (["-o", "{tmp}/a.png", "--format", "jpg"], "--format jpg but -o {tmp}/a.png is a .png file"),
    (["--outdir", "{tmp}/file.txt/sub"], "is a file, not a folder"),
])
def test_bad_output_options_are_one_line(tmp_path, capsys, args, fragment):
    (tmp_path / "file.txt").write_text("")
    code = main(["generate", "x", *TINY, *[a.format(tmp=tmp_path) for a in args]])
    assert_one_line_error(code, capsys.readouterr().err, fragment.format(tmp=tmp_path))
    assert os.listdir(tmp_path) == ["file.txt"]


def test_grid_tiles_the_batch_as_the_web_ui_and_carries_the_first_images_parameters(tmp_path):
    assert main(["generate", "x", "--seed", "4", "--batch", "3", "--grid", "--outdir", str(tmp_path), *TINY]) == 0
    folder = tmp_path / "txt2img" / today_folder(tmp_path).name
    assert sorted(os.listdir(folder)) == ["00000-4.png", "00001-5.png", "00002-6.png", "grid-00000.png"]
    with Image.open(folder / "grid-00000.png") as grid, Image.open(folder / "00000-4.png") as first:
        assert grid.size == (64, 64)  # 3 images: round(sqrt(3)) = 2 rows of 2
        assert grid.text["parameters"] == first.text["parameters"]
        assert grid.crop((0, 0, 32, 32)).tobytes() == first.convert("RGB").tobytes()

    assert main(["generate", "x", "--seed", "4", "--batch", "2", "--grid", "-o", str(tmp_path / "b.jpg"), *TINY]) == 0
    assert {"b.jpg", "b-1.jpg", "b-grid.png"} <= set(os.listdir(tmp_path))
    with Image.open(tmp_path / "b-grid.png") as grid:
        assert grid.size == (64, 32)


def test_styles_expand_the_prompt_written_into_the_image(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "styles.csv").write_text('name,prompt,negative_prompt\n'
                                         'film,"{prompt}, film grain",cartoon\n'
                                         'sharp,sharp focus,blurry\n', encoding="utf-8-sig")
    assert main(["generate", "a cat", "--negative", "dog", "--style", "film", "--style", "sharp", "-o", "s.png",
                 "--seed", "1", *TINY]) == 0
    text = Image.open(tmp_path / "s.png").text["parameters"]
    assert text.startswith("a cat, film grain, sharp focus\nNegative prompt: dog, cartoon, blurry\nSteps: 2")

    code = main(["generate", "a cat", "--style", "noir", "-o", "t.png", *TINY])
    assert_one_line_error(code, capsys.readouterr().err, "unknown style 'noir'; the styles file has: film, sharp")
    other = tmp_path / "other.csv"
    other.write_text("name,prompt,negative_prompt\nwarm,warm light,\n")
    assert main(["generate", "a cat", "--styles-file", str(other), "--style", "warm", "-o", "w.png", *TINY]) == 0
    assert Image.open(tmp_path / "w.png").text["parameters"].startswith("a cat, warm light\n")
    os.remove(tmp_path / "styles.csv")
    code = main(["generate", "a cat", "--style", "film", "-o", "u.png", *TINY])
    assert_one_line_error(code, capsys.readouterr().err, "--style needs a styles file")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["s.png", "w.png"]


# -- help and messages that say what the code does -----------------------------------------------------


def help_text(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_upscale_help_gives_the_cfg_it_uses(capsys, monkeypatch):
    assert "classifier-free guidance scale, 0 or more (default 9)" in help_text(capsys, "upscale")
    assert "classifier-free guidance scale, 0 or more (default 7)" in help_text(capsys, "generate")
    from sdlab.cli import build_parser

    assert build_parser().parse_args(["upscale", "low.png", "x"]).cfg == 9.0


def test_size_help_and_the_size_error_agree(capsys):
    assert "multiples of the model's VAE factor: 8 for SD models and the demo, 4 for the bundled model" in \
        help_text(capsys, "generate")
    assert main(["generate", "x", "--size", "66x64", "--steps", "1", "--quiet", "-o", "never.png"]) == 2
    assert "width 66 is not a multiple of 4" in capsys.readouterr().err


def test_demo_is_described_as_random_and_refused_as_a_training_base(capsys, tmp_path):
    assert "'demo': a tiny model with random weights that draws noise" in help_text(capsys, "generate")
    code = main(["train", "unet", "--data", "shapes", "--base", "demo", "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, "'demo' is not a base to train on: its weights are random")
    assert not (tmp_path / "run").exists()


def test_fine_tuning_help_names_the_bundled_base_and_the_adapters_flags(capsys):
    lora = " ".join(help_text(capsys, "train", "lora").split())
    assert "or 'bundled': the model that ships with sdlab" in lora and "(default: bundled)" in lora
    assert "--rank RANK r: the inner width of each adapter's up @ down (default: 4)" in lora
    ti = " ".join(help_text(capsys, "train", "textual-inversion").split())
    assert "--token TOKEN" in ti and "(default: my-concept)" in ti and "--vectors VECTORS" in ti
    unet = " ".join(help_text(capsys, "train", "unet").split())
    assert "(default: none: every part but the trained one starts fresh; unet needs one)" in unet
    assert "--rank" not in unet


def test_bundled_is_a_training_base_for_every_trainer(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code = main(["train", "unet", "--base", "bundled", "--data", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "run"), "--steps", "1", "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "no training images in")  # past the base, at the data


def test_top_help_lists_every_trainer_and_version(capsys):
    text = help_text(capsys)
    trainers = "vae, text, unet, lora, textual-inversion, dreambooth, inpaint, upscale, dpo"
    assert f"train a model part or adapter: {trainers}" in text
    code, stdout, _ = run_main("--version")
    assert code == 0 and stdout.strip() == "sdlab 0.1.0"


def test_eval_help_names_each_default_once(capsys):
    text = help_text(capsys, "eval", "shapes")
    assert "checkpoint (default: the bundled model)" in text and "(default: None)" not in text
    assert "images per sampling run (default: 16)" in text


def test_every_option_has_help():
    import argparse

    from sdlab.cli import build_parser

    def parsers(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    missing = [f"{name} {action.option_strings or action.dest}" for name, parser in parsers(build_parser(), "sdlab")
               for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []


@pytest.mark.parametrize("args, fragment", [
    (["generate", "x", "--cfg", "-3"], "argument --cfg: the CFG scale must be 0 or more, got -3"),
    (["generate", "x", "--lora", "{tmp}/nope.safetensors:0.5"],
     "argument --lora: LoRA file not found: {tmp}/nope.safetensors"),
    (["upscale", "low.png", "x", "--cfg=-1"], "the CFG scale must be 0 or more"),
])
def test_negative_cfg_and_missing_lora_are_one_line(capsys, tmp_path, args, fragment):
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_pointing_at_help(capsys, lambda: main(args), fragment.format(tmp=tmp_path), f"sdlab {args[0]}")


def test_a_folder_given_as_an_image_says_so(tmp_path, capsys):
    code = main(["img2img", "x", "--init", str(tmp_path), "-o", str(tmp_path / "x.png"), *TINY])
    assert_one_line_error(code, capsys.readouterr().err, f"init image {tmp_path} is a directory; give an image file")
    code = main(["upscale", str(tmp_path), "x", "-o", str(tmp_path / "x.png"), "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "is a directory; give an image file")


def test_tokenize_shows_what_the_encoder_receives_of_a_weighted_prompt():
    code, stdout, _ = run_main("tokenize", "(red:1.3) circle")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0] == "'(red:1.3) circle': 8 tokens as written"
    assert "encoder input (weights applied): red×1.3 circle" in lines
    assert "  2 tokens in 1 chunk of 75" in lines
    code, stdout, _ = run_main("tokenize", "--json", "(red:1.3) circle")
    assert json.loads(stdout) == [[263, 736, 281, 272, 269, 274, 264, 7117]], "--json keeps its id lists"


# -- seeds: every image's parameters make it again ---------------------------------------------------------


def rerun_arguments(parameters: str, model: str) -> list[str]:
    """`sdlab generate` arguments from an image's parameters alone, as a web UI user re-runs a picture."""
    from sdlab.infotext import parse_infotext

    fields = parse_infotext(parameters)
    args = ["generate", fields["Prompt"], "--model", model, "--steps", fields["Steps"], "--sampler", fields["Sampler"],
            "--cfg", fields["CFG scale"], "--seed", fields["Seed"], "--size", fields["Size"],
            "--noise", fields["Noise"]]
    if fields["Negative prompt"]:
        args += ["--negative", fields["Negative prompt"]]
    if "Variation seed strength" in fields:
        args += ["--subseed", fields["Variation seed"], "--subseed-strength", fields["Variation seed strength"]]
    if "Seed resize from" in fields:
        args += ["--seed-resize-from", fields["Seed resize from"]]
    return args


def assert_each_image_is_its_parameters_alone(paths, tmp_path):
    for i, path in enumerate(paths):
        parameters = Image.open(path).text["parameters"]
        again = tmp_path / f"again-{i}.png"
        assert main([*rerun_arguments(parameters, "demo"), "--quiet", "-o", str(again)]) == 0
        assert Image.open(again).tobytes() == Image.open(path).tobytes(), parameters
        alone = re.sub(r", Batch size: \d+, Batch pos: \d+", "", parameters)
        assert Image.open(again).text["parameters"] == alone


def test_every_png_of_a_default_batch_reproduces_its_image_as_a_single_run(tmp_path):
    out = tmp_path / "batch.png"
    assert main(["generate", "a red circle", "--negative", "blue", "--seed", "7", "--batch", "3", "-o", str(out),
                 *TINY]) == 0
    paths = [out, tmp_path / "batch-1.png", tmp_path / "batch-2.png"]
    seeds = [int(Image.open(p).text["parameters"].split("Seed: ")[1].split(",")[0]) for p in paths]
    assert seeds == [7, 8, 9]
    assert len({Image.open(p).tobytes() for p in paths}) == 3
    assert_each_image_is_its_parameters_alone(paths, tmp_path)


def test_variation_seeds_and_batch_count_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "v.png"
    assert main(["generate", "x", "--seed", "3", "--batch", "2", "--n-iter", "2", "--subseed", "40",
                 "--subseed-strength", "0.3", "--seed-resize-from", "48x16", "-o", str(out), *TINY]) == 0
    paths = [out] + [tmp_path / f"v-{i}.png" for i in range(1, 4)]
    texts = [Image.open(p).text["parameters"] for p in paths]
    assert all("Seed: 3," in t and "Variation seed strength: 0.3, Seed resize from: 48x16" in t for t in texts)
    assert [t.split("Variation seed: ")[1].split(",")[0] for t in texts] == ["40", "41", "42", "43"]
    assert_each_image_is_its_parameters_alone(paths[2:], tmp_path)
    main(["generate", "x", "--n-iter", "0", *TINY, "-o", str(tmp_path / "z.png")])
    assert capsys.readouterr().err.strip().endswith("batch count (n_iter) must be a positive integer, got 0")


def test_a_lora_given_on_the_command_line_is_written_into_the_prompt_as_a_tag(tmp_path):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "tiny-ink.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 64) * 0.1,
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(256, 2) * 0.1},
              str(lora))
    out = tmp_path / "l.png"
    code = main(["generate", "a cat", "--lora", f"{lora}:0.7", "--seed", "2", "-o", str(out), *TINY])
    assert code == 0
    text = Image.open(out).text["parameters"]
    assert text.startswith("a cat <lora:tiny-ink:0.7>\n"), text
    assert "Lora hashes: " in text
    again = tmp_path / "again.png"
    assert main([*rerun_arguments(text, "demo"), "--lora-dir", str(tmp_path), "--quiet", "-o", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
    assert Image.open(again).text["parameters"] == text
