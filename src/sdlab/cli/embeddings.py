"""`sdlab embeddings nearest|map|export`: the text encoder's token embeddings (sdlab/inside/embeddings.py)."""

from __future__ import annotations

import os

from ..errors import InputError


def add_embeddings_command(commands) -> None:
    embeddings = commands.add_parser(
        "embeddings", help="explore the text encoder's token embeddings: nearest tokens, a 2-D map, projector files")
    actions = embeddings.add_subparsers(dest="action", required=True)

    nearest = actions.add_parser("nearest", help="the tokens whose embeddings are most cosine-similar to a word's")
    nearest.add_argument("word", help="a word; one the tokenizer splits into several tokens is their mean vector")
    nearest.add_argument("-k", type=int, default=10, help="how many neighbours to list (default: 10)")
    _add_model_option(nearest)
    nearest.set_defaults(run=cmd_nearest)

    word_map = actions.add_parser("map", help="a labelled 2-D PCA map of words' token embeddings (a PNG)")
    word_map.add_argument("words", nargs="*", help="two or more words to place on the map")
    word_map.add_argument("--contextual", metavar="PROMPT", default=None,
                          help="map the prompt's contextual vectors (the encoder's output per token) instead")
    word_map.add_argument("-o", "--output", required=True, help="the PNG to write")
    _add_model_option(word_map)
    word_map.set_defaults(run=cmd_map)

    export = actions.add_parser(
        "export", help="write vectors.tsv and metadata.tsv for the TensorFlow embedding projector "
                       "(projector.tensorflow.org, 'Load')")
    export.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the two files (created)")
    export.add_argument("--words", metavar="FILE", default=None,
                        help="one word per line (default: the vocabulary's 10,000 commonest whole-word tokens, "
                             "unless --contextual is given)")
    export.add_argument("--contextual", metavar="PROMPT", action="append", default=[],
                        help="also write the prompt's contextual vectors, one per token; repeatable")
    _add_model_option(export)
    export.set_defaults(run=cmd_export)


def _add_model_option(parser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint file or diffusers folder whose text encoder to read (default: the bundled "
                             "model; its tokens are CLIP's, its embeddings learned from shapes captions)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps ... (default: the best available)")


def _text_encoder(args):
    from .. import load

    return load(args.model, device=args.device).text_encoder


def cmd_nearest(args) -> int:
    from ..inside.embeddings import nearest_to_word
    from ..tokenizer import get_tokenizer

    if args.k < 1:
        raise InputError(f"-k must be 1 or more, got {args.k}")
    ids, neighbours = nearest_to_word(_text_encoder(args), args.word, args.k)
    tokens = get_tokenizer().token_strings(ids)
    if len(ids) > 1:
        print(f"'{args.word}' is {len(ids)} tokens ({' '.join(tokens)}); using the mean of their vectors")
    print(f"nearest tokens to {' '.join(tokens)} by cosine similarity:")
    for neighbour in neighbours:
        print(f"  {neighbour.score:7.4f}  {neighbour.token_id:>6}  {neighbour.token}")
    return 0


def cmd_map(args) -> int:
    from ..inside.embeddings import contextual_map, word_map, word_token_ids
    from ..outputs import format_of, save_image

    if format_of(args.output) is None:
        raise InputError(f"the map must be a .png, .jpg or .webp file, got '{args.output}'")
    if args.contextual is not None:
        if args.words:
            raise InputError("give words or --contextual PROMPT, not both")
        image = contextual_map(_text_encoder(args), args.contextual)
    else:
        if len(args.words) < 2:
            raise InputError("give at least two words to map")
        for word in args.words:
            word_token_ids(word)  # refuse a word without tokens before the model loads
        image = word_map(_text_encoder(args), args.words)
    save_image(image, args.output)
    print(args.output)
    return 0


def cmd_export(args) -> int:
    from ..inside.embeddings import default_export_words, export_projector, read_word_file

    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"{args.output} is a file; give a folder for vectors.tsv and metadata.tsv")
    if args.words is not None:
        words = read_word_file(args.words)
    else:
        words = [] if args.contextual else default_export_words()
    rows = export_projector(_text_encoder(args), args.output, words, args.contextual)
    print(f"{rows} vectors: {os.path.join(args.output, 'vectors.tsv')}, {os.path.join(args.output, 'metadata.tsv')}")
    return 0
