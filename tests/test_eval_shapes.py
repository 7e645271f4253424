"""`sdlab eval shapes`: the seeded caption set, the per-group table, and the command."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from sdlab.cli import main
from sdlab.shapes.dataset import parse_caption, render, scene_from_caption
from sdlab.shapes.evaluation import evaluate, format_table, paraphrased, table, wilson_interval, write_report


class RenderingPipe:
    """Stands in for a model: draws each prompt with the dataset's renderer (optionally the wrong one)."""

    def __init__(self, wrong: bool = False):
        self.wrong, self.calls = wrong, []

    def txt2img(self, prompts, **kwargs):
        self.calls.append(kwargs)
        rng = np.random.default_rng(kwargs["seed"])
        canvas = (kwargs.get("width", 64), kwargs.get("height", 64))
        aspect = canvas[0] / canvas[1]
        images = []
        for prompt in prompts:
            if self.wrong:  # same layout, every colour swapped for another
                meaning = parse_caption(prompt)
                swap = {"red": "green", "green": "blue", "blue": "red", "yellow": "purple", "purple": "orange",
                        "orange": "yellow"}
                objects = tuple((swap.get(c, "red"), s, z) for c, s, z in meaning.objects)
                prompt_scene = scene_from_caption(prompt, rng, aspect)
                prompt_scene = prompt_scene.__class__(prompt_scene.background, tuple(
                    o.__class__(objects[i][0], o.shape, o.size, o.side, o.center)
                    for i, o in enumerate(prompt_scene.objects)), prompt_scene.position, prompt_scene.relation)
                images.append(render(prompt_scene, canvas))
            else:
                images.append(render(scene_from_caption(prompt, rng, aspect), canvas))
        seed = kwargs["seed"]
        return SimpleNamespace(images=images, seeds=[seed + i for i in range(len(prompts))])

    def hires_fix(self, prompts, hires_scale, **kwargs):
        """Draws at the hires fix's larger size, as the second pass returns it."""
        width, height = kwargs.pop("width", 64), kwargs.pop("height", 64)
        self.calls.append({"hires_scale": hires_scale})
        return self.txt2img(prompts, width=round(width * hires_scale), height=round(height * hires_scale), **kwargs)


def test_ground_truth_images_pass_and_wrong_colours_fail():
    judged = evaluate(RenderingPipe(), n=20, seed=3, batch_size=8)
    rates = table(judged)
    assert set(rates) == {"single", "relation", "held_out", "paraphrased"}
    assert len(judged) == 40 and [j.seed for j in judged[:20]] == list(range(3, 23))
    for group in rates.values():
        assert group["all"] >= 0.9
    wrong = table(evaluate(RenderingPipe(wrong=True), n=20, seed=3, batch_size=8, with_paraphrases=False))
    assert all(group["colour"] == 0.0 for group in wrong.values())
    assert all(group["shape"] >= 0.9 for group in wrong.values())


def test_each_image_is_reproducible_alone_with_the_web_ui_noise():
    pipe = RenderingPipe()
    evaluate(pipe, n=5, seed=0, batch_size=2, with_paraphrases=False, steps=7, guidance_scale=3.0, sampler="Euler")
    assert [call["seed"] for call in pipe.calls] == [0, 2, 4]
    assert all(call["noise"] == "a1111-cpu" and call["steps"] == 7 and call["guidance_scale"] == 3.0
               and call["sampler"] == "Euler" for call in pipe.calls)


def test_paraphrases_keep_the_meaning_in_other_words():
    captions = [("single", "a large red circle on the left"), ("relation", "a blue square above a yellow triangle"),
                ("single", "a small green triangle at the bottom on a black background")]
    out = paraphrased(captions, seed=0)
    assert out == paraphrased(captions, seed=0)
    for (_, caption), (group, other) in zip(captions, out):
        assert group == "paraphrased"
        a, b = parse_caption(caption), parse_caption(other)
        assert a.background == b.background
        if a.relation is None:
            assert (a.objects, a.position) == (b.objects, b.position)
        else:  # "A above B" may come back as "B below A"
            assert {a.objects, b.objects} in ({a.objects}, {a.objects, tuple(reversed(a.objects))})


def test_table_lists_each_attribute_per_group():
    rates = {"single": {"all": 0.5, "colour": 1.0, "size": 0.75}, "relation": {"all": 0.25, "colour": 1.0, "relation": 0.5}}
    text = format_table(rates, {"single": 4, "relation": 4})
    lines = text.splitlines()
    assert "single (4)" in lines[0] and "relation (4)" in lines[0]
    assert any(line.startswith("size") and "75.0%" in line and line.rstrip().endswith("-") for line in lines)
    assert lines[-2].startswith("all")
    # 2 of 4 and 1 of 4: Wilson's 95% intervals, 15-85% and 5-70%
    assert lines[-1].split() == ["all,", "95%", "CI", "15-85%", "5-70%"]


def test_the_wilson_interval_matches_its_formula_and_stays_in_0_1():
    low, high = wilson_interval(17, 30)  # the shipped model's two-object rate, 56.7%
    assert (round(low, 3), round(high, 3)) == (0.392, 0.726)
    assert wilson_interval(30, 30)[1] == 1.0 and wilson_interval(0, 30)[0] == 0.0
    assert 0.88 < wilson_interval(30, 30)[0] < 0.89  # all right on 30 captions still allows 88.6%


def test_eval_command_writes_its_table_report_and_sheet(tmp_path, capsys):
    code = main(["eval", "shapes", "--model", "demo", "-n", "3", "--steps", "2", "--no-paraphrases",
                 "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "attribute" in out and "colour" in out and "single (" in out
    report = json.loads((tmp_path / "results.json").read_text())
    assert len(report["images"]) == 3 and report["settings"]["steps"] == 2
    assert (tmp_path / "sheet.png").is_file()
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_wide_canvas_is_asked_for_and_judged_per_axis(tmp_path):
    pipe = RenderingPipe()
    judged = evaluate(pipe, n=20, seed=3, batch_size=8, with_paraphrases=False, width=96, height=64)
    assert all(call["width"] == 96 and call["height"] == 64 for call in pipe.calls)
    assert judged[0].image.size == (96, 64) and table(judged)["relation"]["all"] >= 0.9
    plain = RenderingPipe()
    evaluate(plain, n=2, with_paraphrases=False)
    assert all("width" not in call and "height" not in call for call in plain.calls)  # the model's own size
    write_report(judged, str(tmp_path), {})
    assert (tmp_path / "sheet.png").is_file()


def test_the_hires_fix_is_asked_for_and_judged_at_its_larger_size():
    pipe = RenderingPipe()
    judged = evaluate(pipe, n=8, seed=2, batch_size=4, with_paraphrases=False,
                      hires=dict(hires_scale=2, hires_strength=0.5))
    assert [call for call in pipe.calls if "hires_scale" in call] == [{"hires_scale": 2}] * 2
    assert judged[0].image.size == (128, 128) and table(judged)["single"]["all"] == 1.0


def test_eval_command_runs_the_hires_fix_and_says_so(capsys):
    code = main(["eval", "shapes", "--model", "demo", "-n", "2", "--steps", "2", "--no-paraphrases", "--quiet",
                 "--size", "32", "--hires-scale", "2", "--hires-strength", "0.4"])
    out = capsys.readouterr().out
    assert code == 0 and "2 images, 64x64 (hires fix 2x, strength 0.4, latent)" in out


@pytest.mark.parametrize("kind", ["shapes", "inpaint", "outpaint"])
def test_an_out_folder_that_is_a_file_is_refused_before_any_work(kind, capsys, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    assert main(["eval", kind, "--model", "demo", "--out", str(blocker / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sdlab: error: --out {blocker / 'report'}: {blocker} is a file, not a folder"


@pytest.mark.parametrize("flags, message", [(["-n", "0"], "--captions must be at least 1"),
                                            (["--batch", "0"], "--batch must be at least 1"),
                                            (["--size", "96x"], "--size takes N or WxH")])
def test_eval_command_refuses_bad_numbers_in_one_line(flags, message, capsys):
    assert main(["eval", "shapes", "--model", "demo", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# -- inpainting and upscaling -------------------------------------------------------------------------


class EditingPipe:
    """Answers each inpainting case with the intended picture, or (`lazy`) with its input unchanged, or
    (`recolour`) with the inserted object in another colour."""

    def __init__(self, n, seed, lazy=False, recolour=False):
        import dataclasses

        from sdlab.shapes.edit_eval import edit_cases

        self.lazy = lazy
        self.answers = {}
        for case in edit_cases(n, seed):
            scene = case.scene
            if case.task == "erase":
                kept = next(o for o in scene.objects if (o.colour, o.shape) == case.kept)
                scene = scene.__class__(scene.background, (kept,), None, None)
            elif recolour:
                wrong = next(c for c in ("red", "green", "blue") if c not in (case.edited[0], case.kept[0]))
                scene = dataclasses.replace(scene, objects=tuple(
                    dataclasses.replace(o, colour=wrong) if (o.colour, o.shape) == case.edited else o
                    for o in scene.objects))
            self.answers[(case.prompt, case.image.tobytes())] = render(scene)

    def inpaint(self, prompt, image, mask, **kwargs):
        assert kwargs["strength"] == 1.0 and kwargs["noise"] == "a1111-cpu"
        answer = image if self.lazy else self.answers[(prompt, image.tobytes())]
        return SimpleNamespace(images=[answer])


def test_inpainting_cases_pass_when_the_edit_is_made_and_fail_when_it_is_not():
    from sdlab.shapes.edit_eval import edit_cases, evaluate_inpainting

    cases = edit_cases(6, seed=1)
    assert [c.task for c in cases[:2]] == ["erase", "insert"] and len(cases) == 12
    for case in cases:
        inside = np.asarray(case.mask) > 127
        assert 0.02 < inside.mean() < 0.5  # the mask covers one object, not the scene
    assert evaluate_inpainting(EditingPipe(6, 1), n=6, seed=1) == {"erase": 1.0, "appears": 1.0, "insert": 1.0}
    assert evaluate_inpainting(EditingPipe(6, 1, lazy=True), n=6, seed=1) == {"erase": 0.0, "appears": 0.0, "insert": 0.0}
    recoloured = evaluate_inpainting(EditingPipe(6, 1, recolour=True), n=6, seed=1)
    assert recoloured["appears"] == recoloured["insert"] == 0.0


class OutpaintingPipe:
    """Answers each outpainting case with its whole scene drawn, or (`lazy`) with the picture and an empty
    margin, or (`reshape`) with every object in another shape."""

    def __init__(self, n, seed, lazy=False, reshape=False):
        import dataclasses

        from sdlab.shapes.edit_eval import OUTPAINT_CANVAS, outpaint_cases

        other = {"circle": "square", "square": "triangle", "triangle": "circle"}
        self.calls, self.answers = [], {}
        for case in outpaint_cases(n, seed):
            scene = case.scene
            if lazy:
                scene = dataclasses.replace(scene, objects=tuple(o for o in scene.objects
                                                                 if (o.colour, o.shape) == case.kept), relation=None)
            if reshape:
                scene = dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, shape=other[o.shape])
                                                                 for o in scene.objects))
            self.answers[(case.prompt, case.image.tobytes())] = render(scene, OUTPAINT_CANVAS)

    def outpaint(self, prompt, image, extend, **kwargs):
        assert kwargs["noise"] == "a1111-cpu" and "strength" not in kwargs  # outpaint's own default
        self.calls.append(extend)
        return SimpleNamespace(images=[self.answers[(prompt, image.tobytes())]])


def test_outpainting_cases_keep_one_object_and_leave_the_other_to_the_margin():
    from sdlab.shapes.check import analyse
    from sdlab.shapes.edit_eval import OutpaintCase, evaluate_outpainting, judge_outpaint, outpaint_cases

    cases = outpaint_cases(8, seed=3)
    assert [c.side for c in cases[:4]] == ["right", "left", "right", "left"] and len(cases) == 8
    assert cases == outpaint_cases(8, seed=3) and cases != outpaint_cases(8, seed=4)
    for case in cases:
        found = analyse(case.image).objects
        assert case.image.size == (64, 64) and [(o.colour, o.shape) for o in found] == [case.kept]
    pipe = OutpaintingPipe(8, 3)
    assert evaluate_outpainting(pipe, n=8, seed=3) == {"appears": 1.0, "outpaint": 1.0}
    assert pipe.calls[:2] == [{"right": 32}, {"left": 32}]
    assert evaluate_outpainting(OutpaintingPipe(8, 3, lazy=True), n=8, seed=3) == {"appears": 0.0, "outpaint": 0.0}
    assert evaluate_outpainting(OutpaintingPipe(8, 3, reshape=True), n=8, seed=3) == {"appears": 0.0, "outpaint": 0.0}
    # the added object on the other side of the canvas than the margin is not "appears"
    case = cases[0]
    drawn = OutpaintingPipe(8, 3).answers[(case.prompt, case.image.tobytes())]
    mirrored = OutpaintCase(case.prompt, case.image, "left", case.kept, case.added, case.scene)
    assert judge_outpaint(case, drawn)["appears"] and not judge_outpaint(mirrored, drawn)["appears"]


def test_upscaling_psnr_compares_with_bicubic_on_the_same_scenes():
    from PIL import Image

    from sdlab.shapes.edit_eval import evaluate_upscaling, psnr

    black, grey = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (255, 255, 255))
    assert psnr(black, grey) == 0.0 and psnr(black, black) == float("inf")

    class Bicubic:
        def upscale(self, image, prompt, **kwargs):
            return SimpleNamespace(images=[image.resize((image.width * 4, image.height * 4), Image.BICUBIC)])

    class Nearest:
        def upscale(self, image, prompt, **kwargs):
            return SimpleNamespace(images=[image.resize((image.width * 4, image.height * 4), Image.NEAREST)])

    same = evaluate_upscaling(Bicubic(), n=3, seed=0)
    assert same["model"] == same["bicubic"] and 15 < same["bicubic"] < 40
    assert same["model_median"] == same["bicubic_median"] and 15 < same["bicubic_median"] < 40
    assert evaluate_upscaling(Nearest(), n=3, seed=0)["model"] < same["bicubic"]


def test_eval_upscale_inpaint_and_outpaint_commands_print_their_figures(capsys, tmp_path):
    """The bundled sibling models, one scene and one sampler step each: the commands' own lines."""
    assert main(["eval", "upscale", "-n", "1", "--steps", "1", "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("PSNR against the 128 px render, mean (median) of 1 scenes: model ") and "bicubic" in line
    assert main(["eval", "inpaint", "-n", "1", "--steps", "1", "--quiet", "--out", str(tmp_path / "ip")]) == 0
    out = capsys.readouterr().out
    assert "erase" in out and "insert, loose" in out and "insert, strict" in out
    assert (tmp_path / "ip" / "sheet.png").is_file()
    # one scene: a rate of 0 or 100% says little, and the interval says so
    assert out.count("(95% interval 0-79%)") + out.count("(95% interval 21-100%)") == 3, out
    assert main(["eval", "outpaint", "-n", "1", "--steps", "1", "--quiet", "--out", str(tmp_path / "op")]) == 0
    out = capsys.readouterr().out
    assert "outpaint, loose" in out and "outpaint, strict" in out and f"wrote {tmp_path / 'op' / 'sheet.png'}" in out
    from PIL import Image

    with Image.open(tmp_path / "op" / "sheet.png") as sheet:
        assert sheet.width > 10 * 96 * 2  # ten columns of 96 px pictures at zoom 2
    assert out.count("(95% interval 0-79%)") + out.count("(95% interval 21-100%)") == 2, out


def test_every_evaluation_samples_as_the_commands_do_by_default():
    """The evaluations measure what a user gets: `generate`, `inpaint` and `upscale`'s default sampler."""
    import inspect

    from sdlab.cli import build_parser
    from sdlab.shapes import edit_eval

    parser = build_parser()
    defaults = {parser.parse_args(command).sampler for command in (
        ["generate", "a red circle"], ["inpaint", "a", "--init", "in.png", "--mask", "mask.png"], ["upscale", "in.png", "a"],
        ["outpaint", "a", "--init", "in.png", "--extend", "left=32"],
        ["eval", "shapes"], ["eval", "inpaint"], ["eval", "outpaint"], ["eval", "upscale"])}
    functions = (evaluate, edit_eval.evaluate_inpainting, edit_eval.evaluate_outpainting, edit_eval.evaluate_upscaling)
    defaults |= {inspect.signature(f).parameters["sampler"].default for f in functions}
    assert defaults == {"Euler a"}


def test_the_hires_upscaler_choices_and_defaults_are_the_pipelines():
    from sdlab.cli.upscale import HIRES_STRENGTH, HIRES_UPSCALER, HIRES_UPSCALER_CHOICES
    from sdlab.pipelines.hires import HIRES_UPSCALERS
    from sdlab.pipelines.options import HiresOptions

    assert set(HIRES_UPSCALER_CHOICES) == set(HIRES_UPSCALERS)
    assert (HIRES_STRENGTH, HIRES_UPSCALER) == (HiresOptions.hires_strength, HiresOptions.hires_upscaler)


@pytest.mark.parametrize("command", [["eval", "shapes", "--model", "demo"], ["generate", "a cat", "--model", "demo"]])
@pytest.mark.parametrize("flags, named", [(["--hires-strength", "0.3"], "--hires-strength sets"),
                                          (["--hires-upscaler", "lanczos"], "--hires-upscaler sets")])
def test_a_second_pass_option_without_hires_scale_is_refused_in_one_line(command, flags, named, capsys, tmp_path):
    out = tmp_path / "x.png"
    assert main([*command, *flags, *(["-o", str(out)] if command[0] == "generate" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "add --hires-scale" in err and "\n" not in err and not out.exists()
