"""`sdlab edit "SOURCE" --to "TARGET"`: prompt-to-prompt, the source and its edit side by side."""

from __future__ import annotations

import argparse
import os
import time

from ..errors import InputError
from .common import add_generation_options, load_for, prepare_generation, run_and_save
from .generate import generation_kwargs

EDIT_SAMPLER = "DPM++ 2M"  # deterministic: a source and its edit must see the same noise at every step


def reweight_option(text: str) -> tuple[str, float]:
    """`--reweight WORD=FACTOR`."""
    word, sep, factor = text.rpartition("=")
    try:
        value = float(factor)
    except ValueError:
        value = None
    if not sep or not word.strip() or value is None:
        raise argparse.ArgumentTypeError(f"--reweight takes WORD=FACTOR, e.g. red=0.5, got '{text}'")
    return word.strip(), value


def add_edit_command(commands) -> None:
    parser = commands.add_parser("edit", help="prompt-to-prompt: edit a picture by editing its prompt")
    add_generation_options(parser, cfg=7.0)
    parser.set_defaults(sampler=EDIT_SAMPLER)
    parser.add_argument("--to", default=None, metavar="TARGET",
                        help="the edited prompt (default: the source again, for --reweight alone)")
    parser.add_argument("--reweight", action="append", default=[], type=reweight_option, metavar="WORD=FACTOR",
                        help="scale a word's attention in the edit, e.g. red=0 or fluffy=2; repeatable")
    parser.add_argument("--cross-steps", type=float, default=0.8,
                        help="fraction of the steps that use the source's cross-attention (default 0.8)")
    parser.add_argument("--self-steps", type=float, default=0.4,
                        help="fraction of the steps that use the source's self-attention (default 0.4)")
    parser.add_argument("--blend", nargs="+", default=[], metavar="WORD",
                        help="change only where these words are read (local blending), e.g. --blend circle")
    parser.add_argument("--refine", action="store_true",
                        help="the target adds or removes words: align the shared ones instead of a word swap")
    parser.add_argument("--save-each", action="store_true",
                        help="with -o: also write STEM-source.EXT and STEM-edit.EXT")
    parser.set_defaults(run=cmd_edit, output_kind="txt2img")


def cmd_edit(args) -> int:
    from ..inside.prompt_to_prompt import build_edit, check_fraction, EditOptions

    prepare_generation(args)
    if args.batch != 1:
        raise InputError("edit makes one source and one edited picture; leave out --batch")
    if args.grid:
        raise InputError("edit writes its pictures side by side already; leave out --grid")
    if args.save_each and args.output is None:
        raise InputError("--save-each names its files after -o; give -o FILE")
    check_fraction(args.cross_steps, "--cross-steps")
    check_fraction(args.self_steps, "--self-steps")
    settings = dict(reweight=dict(args.reweight), cross_steps=args.cross_steps, self_steps=args.self_steps,
                    blend=tuple(args.blend), refine=args.refine)
    # the words are checked before the model loads: a typo costs nothing
    build_edit(args.prompt, EditOptions(target=args.to or args.prompt, **settings), 1, args.steps)
    started = time.perf_counter()
    pipe = load_for(args)
    return run_and_save(args, started, lambda step: pipe.edit(args.prompt, args.to, args.negative, callback=step,
                                                              **settings, **generation_kwargs(args)),
                        args.steps, save=save_edit)


def save_edit(args, result) -> list[str]:
    """The source and its edit side by side (the edit's parameters, which record the source and the edit),
    and with --save-each each alone; without -o, numbered in the outputs folder."""
    from ..inside.prompt_to_prompt import side_by_side
    from ..outputs import day_folder, format_of, save_image, save_numbered

    source, edited = result.images
    sheet = side_by_side([source, edited])
    if args.output is None:
        folder = day_folder(args.outdir, args.output_kind)
        return [save_numbered(sheet, folder, result.infotexts[1], result.seeds[1], fmt=args.format or "png")]
    paths = [save_image(sheet, args.output, result.infotexts[1])]
    if args.save_each:
        stem, ext = os.path.splitext(args.output)
        fmt = format_of(args.output)
        paths.append(save_image(source, f"{stem}-source{ext}", result.infotexts[0], fmt))
        paths.append(save_image(edited, f"{stem}-edit{ext}", result.infotexts[1], fmt))
    return paths
