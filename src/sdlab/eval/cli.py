"""`sdlab eval shapes`: how well a model draws what `shapes` captions say, attribute by attribute."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import InputError


def add_eval_command(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a model")
    kinds = evaluate.add_subparsers(dest="eval_kind", required=True)
    shapes = kinds.add_parser("shapes", help="generate seeded `shapes` captions and judge the images from pixels",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shapes.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    shapes.add_argument("-n", "--captions", type=int, default=100, help="canonical captions (about 50%% single objects, "
                        "30%% relations, 20%% held-out colour-shape pairs)")
    shapes.add_argument("--seed", type=int, default=0, help="seed of the captions and of image 0 (image i: seed + i)")
    shapes.add_argument("--steps", type=int, default=20)
    shapes.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    shapes.add_argument("--sampler", default="DPM++ 2M")
    shapes.add_argument("--batch", type=int, default=16, help="images per sampling run")
    shapes.add_argument("--no-paraphrases", action="store_true", help="skip the paraphrased second pass")
    shapes.add_argument("--out", default=None, help="folder for results.json and sheet.png (every image with its verdict)")
    shapes.add_argument("--device", default=None)
    shapes.add_argument("--dtype", default=None)
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    shapes.set_defaults(run=cmd_eval_shapes)


def cmd_eval_shapes(args) -> int:
    from .. import load
    from ..progress import ProgressBar
    from .shapes_eval import GROUPS, evaluate, format_table, table, write_report

    if args.captions < 1:
        raise InputError(f"--captions must be at least 1, got {args.captions}")
    if args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")
    started = time.perf_counter()
    pipe = load(args.model, device=args.device, dtype=args.dtype)
    total = args.captions * (1 if args.no_paraphrases else 2)
    bar = None if args.quiet else ProgressBar(total, "evaluating ")
    try:
        judged = evaluate(pipe, args.captions, args.seed, steps=args.steps, guidance_scale=args.cfg,
                          sampler=args.sampler, batch_size=args.batch, with_paraphrases=not args.no_paraphrases,
                          progress=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    counts = {g: sum(j.group == g for j in judged) for g in GROUPS}
    print(f"{pipe.config.name}: {len(judged)} images, {args.steps} steps {args.sampler}, CFG {args.cfg}, seed {args.seed}")
    print(format_table(table(judged), counts))
    if args.out:
        write_report(judged, args.out, {key: getattr(args, key) for key in
                                        ("model", "captions", "seed", "steps", "cfg", "sampler", "batch")})
        print(f"wrote {args.out}/results.json and {args.out}/sheet.png")
    print(f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0
