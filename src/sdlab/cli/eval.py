"""`sdlab eval shapes`: how well a model draws what `shapes` captions say, attribute by attribute."""

from __future__ import annotations

import sys
import time

from ..config import DEFAULT_SAMPLER
from ..errors import InputError
from .common import DefaultsHelpFormatter, add_self_attention_scale_option
from .upscale import HIRES_STRENGTH, HIRES_UPSCALER, HIRES_UPSCALER_CHOICES, resolve_hires_options
from .saving import check_output_folder


def add_eval_command(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a model")
    kinds = evaluate.add_subparsers(dest="eval_kind", required=True)
    shapes = kinds.add_parser("shapes", help="generate seeded `shapes` captions and judge the images from pixels",
                              formatter_class=DefaultsHelpFormatter)
    shapes.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    shapes.add_argument("-n", "--captions", type=int, default=100, help="canonical captions (about 50%% single objects, "
                        "30%% relations, 20%% held-out colour-shape pairs)")
    add_run_options(shapes, cmd_eval_shapes, seed_help="seed of the captions and of image 0 (image i: seed + i)")
    shapes.add_argument("--batch", type=int, default=16, help="images per sampling run")
    shapes.add_argument("--no-paraphrases", action="store_true", help="skip the paraphrased second pass")
    shapes.add_argument("--size", default=None, help="image size, N or WxH, e.g. 128 or 96x64 (default: the model's "
                        "resolution); a canvas that is not square is judged with positions per axis")
    shapes.add_argument("--out", default=None, help="folder for results.json and sheet.png (every image with its verdict)")
    add_self_attention_scale_option(shapes, "the UNet's self-attention logits times S, as `sdlab generate` takes it")
    hires = shapes.add_argument_group("hires fix", "judge the hires fix's pictures: generate at --size, enlarge, "
                                      "repaint part-way at the larger size (as `sdlab generate --hires-scale`)")
    hires.add_argument("--hires-scale", type=float, default=None,
                       help="enlarge by this factor (e.g. 2) and judge the second pass; off when not given")
    hires.add_argument("--hires-strength", type=float, default=None,
                       help=f"denoising strength of the second pass (default: {HIRES_STRENGTH})")
    hires.add_argument("--hires-upscaler", default=None, choices=HIRES_UPSCALER_CHOICES,
                       help="enlarge the latents (bilinear or nearest-exact) or the decoded pixels (lanczos) "
                            f"(default: {HIRES_UPSCALER})")

    inpaint = kinds.add_parser("inpaint", help="erase a shape / paint one where the mask is, judged from pixels",
                               formatter_class=DefaultsHelpFormatter)
    inpaint.add_argument("--model", default=None, help="checkpoint (default: the bundled inpainting model)")
    inpaint.add_argument("-n", "--cases", type=int, default=20, help="scenes; each gives one erase and one insert case")
    inpaint.add_argument("--out", default=None, help="folder for sheet.png (every picture, framed green when it passes)")
    outpaint = kinds.add_parser("outpaint", help="grow a 64 px picture to 96 x 64 and paint the caption's other "
                                "shape in the margin, judged from pixels", formatter_class=DefaultsHelpFormatter)
    outpaint.add_argument("--model", default=None, help="checkpoint (default: the bundled inpainting model)")
    outpaint.add_argument("-n", "--cases", type=int, default=20, help="scenes (the margin on the right, then the left)")
    outpaint.add_argument("--out", default=None, help="folder for sheet.png (every picture, framed green when the "
                          "whole caption is right)")
    add_self_attention_scale_option(outpaint, "the UNet's self-attention logits times S, as `sdlab outpaint` takes it")
    upscale = kinds.add_parser("upscale", help="32 -> 128 px: PSNR against the 128 px render, and bicubic's",
                               formatter_class=DefaultsHelpFormatter)
    upscale.add_argument("--model", default=None, help="checkpoint (default: the bundled upscaler)")
    upscale.add_argument("-n", "--cases", type=int, default=10, help="scenes")
    upscale.add_argument("--noise-level", type=int, default=20, help="noise added to the small image, 0-350")
    add_run_options(inpaint, cmd_eval_inpaint)
    add_run_options(outpaint, cmd_eval_outpaint)
    add_run_options(upscale, cmd_eval_upscale)


def add_run_options(parser, run, seed_help: str = "seed of the scenes and of case 0 (case i: seed + i)") -> None:
    """The sampling and device options every `sdlab eval` kind shares."""
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER,
                        help="sampler name, see `sdlab samplers`; the default is the one `sdlab generate`, "
                             "`inpaint` and `upscale` use")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: detected)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fastest safe for the device)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _load_and_evaluate(args, task: str, total: int, evaluate):
    """Load `args.model` (the bundled model for `task` by default), run evaluate(pipe, progress) under a
    progress bar of `total` images; (pipe, its result)."""
    from .. import load
    from ..progress import ProgressBar

    pipe = load(args.model, device=args.device, dtype=args.dtype, task=task)
    bar = None if args.quiet else ProgressBar(total, "evaluating ")
    try:
        return pipe, evaluate(pipe, None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()


def cmd_eval_shapes(args) -> int:
    from ..shapes.evaluation import GROUPS, evaluate, format_table, table, write_report

    if args.captions < 1:
        raise InputError(f"--captions must be at least 1, got {args.captions}")
    if args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")
    width, height = _image_size(args.size)
    resolve_hires_options(args)
    if args.out:
        check_output_folder(args.out, "--out")
    started = time.perf_counter()
    total = args.captions * (1 if args.no_paraphrases else 2)
    pipe, judged = _load_and_evaluate(args, "txt2img", total, lambda pipe, progress: evaluate(
        pipe, args.captions, args.seed, steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler,
        batch_size=args.batch, with_paraphrases=not args.no_paraphrases, progress=progress,
        width=width, height=height, hires=_hires_settings(args), self_attention_scale=args.self_attention_scale))
    counts = {g: sum(j.group == g for j in judged) for g in GROUPS}
    size = f", {judged[0].image.width}x{judged[0].image.height}" if judged else ""
    if args.hires_scale is not None:
        size += f" (hires fix {args.hires_scale:g}x, strength {args.hires_strength:g}, {args.hires_upscaler})"
    if args.self_attention_scale != 1:
        size += f", self-attention scale {args.self_attention_scale:g}"
    print(f"{pipe.model_name}: {len(judged)} images{size}, {args.steps} steps {args.sampler}, CFG {args.cfg}, seed {args.seed}")
    print(format_table(table(judged), counts))
    if args.out:
        write_report(judged, args.out, {key: getattr(args, key) for key in
                                        ("model", "captions", "seed", "steps", "cfg", "sampler", "batch", "size",
                                         "hires_scale", "hires_strength", "hires_upscaler", "self_attention_scale")})
        print(f"wrote {args.out}/results.json and {args.out}/sheet.png")
    print(f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


def _hires_settings(args):
    """The hires fix's settings for evaluate(), or None when --hires-scale is not given."""
    if args.hires_scale is None:
        return None
    return dict(hires_scale=args.hires_scale, hires_strength=args.hires_strength, hires_upscaler=args.hires_upscaler)


def _image_size(text):
    """--size N or WxH -> (width, height); (None, None) when unset."""
    if text is None:
        return None, None
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"--size takes N or WxH in pixels, e.g. 128 or 96x64; got '{text}'")
    return int(parts[0]), int(parts[-1])


def _run_edit_eval(args, task: str, total: int, evaluate):
    if args.cases < 1:
        raise InputError(f"--cases must be at least 1, got {args.cases}")
    if getattr(args, "out", None):  # inpaint and outpaint write a contact sheet there at the end
        check_output_folder(args.out, "--out")
    started = time.perf_counter()
    pipe, result = _load_and_evaluate(args, task, total, evaluate)
    print(f"{pipe.model_name}: {args.cases} scenes, {args.steps} steps {args.sampler}, CFG {args.cfg}, seed {args.seed}")
    print(f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    return result


def _rate(rates: dict, key: str, cases: int) -> str:
    """A pass rate over `cases` with its 95% Wilson interval."""
    from ..shapes.evaluation import wilson_interval

    low, high = wilson_interval(round(rates[key] * cases), cases)
    return f"{rates[key] * 100:.1f}% (95% interval {low * 100:.0f}-{high * 100:.0f}%)"


def cmd_eval_inpaint(args) -> int:
    from ..shapes.edit_eval import evaluate_inpainting

    judged = []
    rates = _run_edit_eval(args, "inpaint", 2 * args.cases, lambda pipe, progress: evaluate_inpainting(
        pipe, args.cases, args.seed, steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler, progress=progress,
        judged=judged))
    print(f"erase (masked shape becomes background): {_rate(rates, 'erase', args.cases)}")
    print(f"insert, loose (the asked-for shape appears in the mask, the other stays): {_rate(rates, 'appears', args.cases)}")
    print(f"insert, strict (both shapes, their relation and the background right): {_rate(rates, 'insert', args.cases)}")
    _write_sheet(args.out, judged)
    return 0


def _write_sheet(out, judged) -> None:
    """--out DIR: the evaluated pictures' contact sheet."""
    if out:
        from ..shapes.evaluation import write_sheet

        print(f"wrote {write_sheet(judged, out)}")


def cmd_eval_outpaint(args) -> int:
    from ..shapes.edit_eval import evaluate_outpainting

    judged = []
    rates = _run_edit_eval(args, "inpaint", args.cases, lambda pipe, progress: evaluate_outpainting(
        pipe, args.cases, args.seed, steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler, progress=progress,
        judged=judged, self_attention_scale=args.self_attention_scale))
    print(f"outpaint, loose (the asked-for shape appears in the margin, the other stays): "
          f"{_rate(rates, 'appears', args.cases)}")
    print(f"outpaint, strict (both shapes, their relation and the background right): {_rate(rates, 'outpaint', args.cases)}")
    _write_sheet(args.out, judged)
    return 0


def cmd_eval_upscale(args) -> int:
    from ..shapes.edit_eval import evaluate_upscaling

    psnr = _run_edit_eval(args, "upscale", args.cases, lambda pipe, progress: evaluate_upscaling(
        pipe, args.cases, args.seed, steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler,
        noise_level=args.noise_level, progress=progress))
    print(f"PSNR against the 128 px render, mean (median) of {args.cases} scenes: model {psnr['model']:.2f} "
          f"({psnr['model_median']:.2f}) dB, bicubic {psnr['bicubic']:.2f} ({psnr['bicubic_median']:.2f}) dB")
    return 0
