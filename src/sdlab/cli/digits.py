"""`sdlab digits train|draw|eval`: the digits demo (sdlab/digits/), lecture 3's digit-drawing model."""

from __future__ import annotations

import argparse
import os
import time

from .common import guidance_scale


def digit_option(text: str) -> int:
    if not (text.strip().isdigit() and 0 <= int(text) <= 9):
        raise argparse.ArgumentTypeError(f"a digit must be one of 0-9, got '{text}'")
    return int(text)


def positive_int(text: str) -> int:
    if not (text.strip().isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got '{text}'")
    return int(text)


def add_digits_command(commands) -> None:
    from ..digits import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_TRAINING_STEPS

    digits = commands.add_parser("digits", help="the digit-drawing demo: a tiny class-conditioned diffusion model "
                                                "on scikit-learn's 8x8 handwritten digits")
    actions = digits.add_subparsers(dest="action", required=True)

    train = actions.add_parser("train", help="train the digits model from scratch (needs scikit-learn; minutes on a CPU)")
    train.add_argument("-o", "--output", default="digits-model", metavar="DIR",
                       help="folder for sdlab-digits.safetensors (default: digits-model)")
    train.add_argument("--steps", type=positive_int, default=DEFAULT_TRAINING_STEPS,
                       help=f"training steps (default: {DEFAULT_TRAINING_STEPS})")
    train.add_argument("--batch-size", type=positive_int, default=128, help="digits per step (default: 128)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batches (default: 0)")
    train.set_defaults(run=cmd_train)

    draw = actions.add_parser("draw", help="draw digits with the shipped (or a trained) model")
    draw.add_argument("digits", type=digit_option, nargs="+", help="which digits to draw, 0-9")
    draw.add_argument("-o", "--output", required=True, help="the picture (.png, .jpg, .webp): one row per digit")
    draw.add_argument("--count", type=positive_int, default=1, help="drawings of each digit (default: 1)")
    draw.add_argument("--trajectory", metavar="FILE", default=None,
                      help="also write the denoising as an animated .gif/.webp: the noisy drawing and the predicted "
                           "clean one at every step")
    _add_sampling_options(draw, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS)
    draw.set_defaults(run=cmd_draw)

    evaluate = actions.add_parser("eval", help="grade drawings with a classifier trained on the real digits "
                                               "(needs scikit-learn)")
    evaluate.add_argument("--per-digit", type=positive_int, default=10, help="drawings of each digit (default: 10)")
    _add_sampling_options(evaluate, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS)
    evaluate.set_defaults(run=cmd_eval)


def _add_sampling_options(parser, guidance: float, sampler: str, steps: int) -> None:

    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a model `sdlab digits train` wrote, file or folder (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default: 0)")
    parser.add_argument("--cfg", type=guidance_scale, default=guidance,
                        help=f"classifier-free guidance scale; 1 is the conditional model alone (default: {guidance})")
    parser.add_argument("--sampler", default=sampler, help=f"any of `sdlab samplers` (default: {sampler})")
    parser.add_argument("--steps", type=positive_int, default=steps, help=f"sampling steps (default: {steps})")


def cmd_train(args) -> int:
    from ..digits.data import require_scikit_learn
    from ..digits.judge import agreement
    from ..digits.model import WEIGHTS_PATH, save_digits_model
    from ..digits.train import train_digits
    from ..errors import InputError

    require_scikit_learn()
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"{args.output} is a file; give a folder for the digits model")
    os.makedirs(args.output, exist_ok=True)
    started = time.perf_counter()
    report = lambda step, loss: print(f"step {step:>5}/{args.steps}  loss {loss:.4f}  "  # noqa: E731
                                      f"{time.perf_counter() - started:6.1f} s", flush=True)
    net, info = train_digits(args.steps, args.batch_size, seed=args.seed, log=report)
    path = os.path.join(args.output, WEIGHTS_PATH.name)
    save_digits_model(net, path, info)
    scores = agreement(net)
    print(f"{path}: trained in {info['seconds']:.0f} s; the classifier agrees with "
          f"{100 * sum(scores.values()) / len(scores):.0f}% of 100 drawings")
    return 0


def cmd_draw(args) -> int:
    from ..digits.draw import TrajectoryRecorder, draw_digits, grid_picture, save_animation
    from ..digits.model import load_digits_model
    from ..errors import InputError
    from ..outputs import format_of, save_image

    if format_of(args.output) is None:
        raise InputError(f"the picture must be a .png, .jpg or .webp file, got '{args.output}'")
    if args.trajectory and os.path.splitext(args.trajectory)[1].lower() not in (".gif", ".webp"):
        raise InputError(f"the trajectory must be a .gif or .webp file, got '{args.trajectory}'")
    net, _ = load_digits_model(args.model)
    wanted = [d for d in args.digits for _ in range(args.count)]
    recorder = TrajectoryRecorder() if args.trajectory else None
    drawings = draw_digits(net, wanted, args.seed, args.cfg, args.steps, args.sampler, callback=recorder)
    save_image(grid_picture(drawings, columns=args.count), args.output)
    print(args.output)
    if recorder is not None:
        print(save_animation(recorder.frames(drawings), args.trajectory))
    return 0


def cmd_eval(args) -> int:
    from ..digits.data import require_scikit_learn
    from ..digits.judge import agreement, train_judge
    from ..digits.model import load_digits_model

    require_scikit_learn()
    net, info = load_digits_model(args.model)
    classifier, held_out = train_judge(held_out=297)
    print(f"judge: an SVM on the real digits, {100 * held_out:.1f}% right on 297 held-out real digits")
    scores = agreement(net, args.per_digit, args.seed, args.cfg, args.steps, args.sampler, train_judge()[0])
    for digit, score in scores.items():
        print(f"  {digit}: {100 * score:5.1f}% of {args.per_digit} drawings read as {digit}")
    print(f"overall: {100 * sum(scores.values()) / len(scores):.1f}%")
    return 0
