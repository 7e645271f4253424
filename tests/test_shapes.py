"""The `shapes` dataset follows /work/shared/specs/shapes-dataset.md, and its checker reads it back."""

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from sdlab.shapes import dataset as shapes
from sdlab.shapes.dataset import (BACKGROUNDS, COLOURS, HELD_OUT, INVERSE_RELATION, POSITIONS, RELATIONS, SIZES,
                               Scene, SceneObject, ShapesDataset, canonical_caption, evaluation_captions,
                               paraphrase, parse_caption, render, sample_scene, scene_from_caption,
                               training_example)
from sdlab.errors import InputError
from sdlab.shapes.check import analyse, check, summarize

FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def pixels(scene, size=64):
    return np.asarray(render(scene, size)).astype(np.int64)


def alone(scene, obj):
    return Scene(scene.background, (obj,))


def coverage_from_colour(image, scene, obj):
    """Each pixel's share of `obj`, recovered from its colour: pixel = (1 - a) background + a colour."""
    background, colour = np.array(BACKGROUNDS[scene.background]), np.array(COLOURS[obj.colour])
    return (image - background) @ (colour - background) / float((colour - background) @ (colour - background))


@pytest.fixture(scope="module")
def training_stream():
    return [training_example(0, i) for i in range(5000)]


def test_the_contract_numbers_are_the_spec():
    assert BACKGROUNDS == {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
    assert COLOURS == {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220),
                       "yellow": (240, 220, 30), "purple": (140, 50, 190), "orange": (245, 130, 20)}
    assert SIZES == {"small": 0.22, "large": 0.40} and shapes.SIZE_JITTER == 0.03
    assert POSITIONS == {"on the left": (0.27, 0.5), "on the right": (0.73, 0.5), "at the top": (0.5, 0.27),
                         "at the bottom": (0.5, 0.73), "in the center": (0.5, 0.5)}
    assert shapes.POSITION_JITTER == 0.04
    assert set(RELATIONS) == {"to the left of", "to the right of", "above", "below"}
    assert HELD_OUT == {("purple", "triangle"), ("orange", "square")}


@pytest.mark.parametrize("size", [64, 128])
def test_interiors_and_background_are_exact_palette_colours(size):
    for scene in scenes(150, seed=size):
        image = pixels(scene, size)
        assert (image[[0, -1]] == BACKGROUNDS[scene.background]).all()
        assert (image[:, [0, -1]] == BACKGROUNDS[scene.background]).all()
        drawn = np.zeros(image.shape[:2], bool)
        for obj in scene.objects:
            # around the centroid, which for a triangle lies side/6 below its box centre
            x = int(obj.center[0] * size)
            y = int((obj.center[1] + (obj.side / 6 if obj.shape == "triangle" else 0)) * size)
            assert (image[y - 1:y + 2, x - 1:x + 2] == COLOURS[obj.colour]).all()
            half = obj.side * size / 2
            drawn[math.floor(obj.center[1] * size - half):math.ceil(obj.center[1] * size + half),
                  math.floor(obj.center[0] * size - half):math.ceil(obj.center[0] * size + half)] = True
        assert (image[~drawn] == BACKGROUNDS[scene.background]).all(), "nothing outside the bounding boxes"


@pytest.mark.parametrize("size", [64, 128])
def test_shapes_fill_their_box_as_circle_square_and_upright_triangle(size):
    for scene in scenes(100, seed=size + 1):
        for obj in scene.objects:
            image = pixels(alone(scene, obj), size)
            alpha = coverage_from_colour(image, scene, obj)
            ys, xs = np.nonzero((image != BACKGROUNDS[scene.background]).any(-1))
            # the anti-aliased box spans the nominal side to within a pixel
            assert xs.max() - xs.min() + 1 >= obj.side * size - 1
            assert ys.max() - ys.min() + 1 >= obj.side * size - 1
            assert abs((xs.max() + xs.min() + 1) / 2 - obj.center[0] * size) <= 1
            assert abs((ys.max() + ys.min() + 1) / 2 - obj.center[1] * size) <= 1
            # supersampling puts each edge within half a sample of its place: side +- 1/SUPERSAMPLE px
            quantisation = 2 / (shapes.SUPERSAMPLE * obj.side * size)
            fill = alpha.sum() / (obj.side * size) ** 2
            assert fill == pytest.approx(FILL[obj.shape], rel=quantisation + 0.005)
            share_above_middle = np.clip(obj.center[1] * size - np.arange(size), 0, 1)
            above = alpha.sum(axis=1) @ share_above_middle / alpha.sum()
            assert above == pytest.approx(0.25 if obj.shape == "triangle" else 0.5, abs=0.02)  # apex up


def test_edges_are_anti_aliased():
    scene = Scene("black", (SceneObject("red", "circle", "large", 0.4, (0.5, 0.5)),))
    image = pixels(scene)
    levels = {tuple(p) for p in image.reshape(-1, 3)}
    assert len(levels) > 6, "edge pixels mix background and colour"


def test_sizes_and_positions_stay_within_their_jitter():
    for scene in scenes(3000, seed=3):
        for obj in scene.objects:
            assert abs(obj.side - SIZES[obj.size]) <= shapes.SIZE_JITTER
        if len(scene.objects) == 1:
            px, py = POSITIONS[scene.position]
            (cx, cy) = scene.objects[0].center
            assert abs(cx - px) <= shapes.POSITION_JITTER and abs(cy - py) <= shapes.POSITION_JITTER


def test_two_objects_follow_the_relation_geometry():
    pairs = [s for s in scenes(3000, seed=4) if len(s.objects) == 2]
    assert {s.relation for s in pairs} == set(RELATIONS)
    for scene in pairs:
        first, second = scene.objects
        axis, sign = RELATIONS[scene.relation]
        assert first.colour != second.colour
        assert first.size == second.size == "small"
        assert sign * (first.center[axis] - second.center[axis]) >= 0.35
        assert abs(first.center[1 - axis] - second.center[1 - axis]) <= 0.12


def test_objects_never_touch_each_other_or_the_border():
    for scene in scenes(400, seed=5):
        masks = []
        for obj in scene.objects:
            image = pixels(alone(scene, obj))
            mask = (image != BACKGROUNDS[scene.background]).any(-1)
            assert not (mask[[0, -1]].any() or mask[:, [0, -1]].any())
            masks.append(mask)
        if len(masks) == 2:
            padded, n = np.pad(masks[0], 1), masks[0].shape[0]
            grown = np.any([padded[dy:dy + n, dx:dx + n] for dy in range(3) for dx in range(3)], axis=0)
            assert not (grown & masks[1]).any(), "at least one background pixel between the objects"


def test_any_size_renders():
    scene = scenes(1, seed=6)[0]
    for size in (1, 7, 33, 200):
        assert render(scene, size).size == (size, size)
    with pytest.raises(InputError):
        render(scene, 0)


def test_training_stream_never_shows_held_out_pairs(training_stream):
    for scene, caption, _ in training_stream:
        assert not {(o.colour, o.shape) for o in scene.objects} & HELD_OUT
        assert not {(c, s) for c, s, _ in parse_caption(caption).objects} & HELD_OUT
        assert not re.search(r"purple triangle|orange (square|box)", caption)


def test_training_stream_mix(training_stream):
    n = len(training_stream)
    single = sum(len(s.objects) == 1 for s, _, _ in training_stream) / n
    canonical = sum(c in (canonical_caption(s, True), canonical_caption(s, False))
                    for s, c, _ in training_stream) / n
    stated = sum(parse_caption(c).background is not None for _, c, _ in training_stream) / n
    assert single == pytest.approx(0.6, abs=0.03)
    assert 0.45 <= canonical <= 0.6  # half canonical, plus the paraphrases that happen to read canonically
    assert stated == pytest.approx(0.5, abs=0.03)
    objects = [o for s, _, _ in training_stream for o in s.objects]
    assert {o.colour for o in objects} == set(COLOURS) and {o.shape for o in objects} == set(FILL)
    assert {s.position for s, _, _ in training_stream} - {None} == set(POSITIONS)
    assert {s.background for s, _, _ in training_stream} == set(BACKGROUNDS)


def test_canonical_caption_forms():
    one = Scene("gray", (SceneObject("red", "circle", "large", 0.41, (0.26, 0.52)),), position="on the left")
    two = Scene("white", (SceneObject("blue", "square", "small", 0.2, (0.5, 0.2)),
                          SceneObject("yellow", "triangle", "small", 0.23, (0.45, 0.7))), relation="above")
    assert canonical_caption(one, False) == "a large red circle on the left"
    assert canonical_caption(one, True) == "a large red circle on the left on a gray background"
    assert canonical_caption(two, False) == "a blue square above a yellow triangle"
    assert canonical_caption(two, True) == "a blue square above a yellow triangle on a white background"
    colour, shape, size = "|".join(COLOURS), "circle|square|triangle", "small|large"
    single = rf"a ({size}) ({colour}) ({shape}) ({'|'.join(POSITIONS)})"
    pair = rf"a ({colour}) ({shape}) ({'|'.join(RELATIONS)}) a ({colour}) ({shape})"
    for scene in scenes(500, seed=7):
        assert re.fullmatch(rf"({single}|{pair})( on a (white|black|gray) background)?",
                            canonical_caption(scene, True))


def same_meaning(a, b):
    if a.relation is not None and a.relation != b.relation:  # "A above B" says what "B below A" says
        a = shapes.Meaning(a.objects[::-1], None, INVERSE_RELATION[a.relation], a.background)
    return a == b


def test_paraphrases_keep_the_meaning_in_other_words():
    rng = np.random.default_rng(8)
    texts = set()
    for scene in scenes(1000, seed=8):
        with_background = bool(rng.integers(2))
        text = paraphrase(scene, rng, with_background)
        texts.add(text)
        assert same_meaning(parse_caption(text), scene.meaning(with_background)), text
    words = " ".join(texts)
    for synonym in ("box", "ball", "at the left side", "left of", "grey", "big", "under", "in the middle"):
        assert synonym in words


def test_a_mirrored_caption_states_the_inverse_relation_in_the_same_words():
    assert shapes.mirrored_caption("a blue square over a red circle") == "a blue square under a red circle"
    assert (shapes.mirrored_caption("a red ball to the left of a green box on a grey background")
            == "a red ball to the right of a green box on a grey background")
    assert shapes.mirrored_caption("a red ball left of a green box") == "a red ball right of a green box"
    assert shapes.mirrored_caption("a small red circle on the left") is None
    rng = np.random.default_rng(3)
    for scene in scenes(300, seed=3):
        if scene.relation is None:
            continue
        text = paraphrase(scene, rng, bool(rng.integers(2)))
        meaning, mirrored = parse_caption(text), parse_caption(shapes.mirrored_caption(text))
        assert mirrored.objects == meaning.objects and mirrored.background == meaning.background
        assert mirrored.relation == INVERSE_RELATION[meaning.relation], text


def test_unreadable_captions_are_rejected():
    for caption in ("a red circle somewhere", "a large red circle", "a red circle above a red square",
                    "a large red circle on the left above a blue square", "a blue square", ""):
        with pytest.raises(InputError):
            parse_caption(caption)


def test_dataset_is_deterministic_per_seed_and_differs_across_seeds():
    data = ShapesDataset(size=32, seed=0, length=6)
    image, caption = data[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and isinstance(caption, str)
    again = ShapesDataset(size=32, seed=0)[3]
    assert torch.equal(image, again[0]) and caption == again[1]
    streamed = list(data)
    assert len(streamed) == len(data) == 6 and torch.equal(streamed[3][0], image)
    other = [ShapesDataset(size=32, seed=1)[i] for i in range(6)]
    assert [c for _, c in other] != [c for _, c in streamed]
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
    assert [c for _, c in loader] == [c for _, c in streamed], "workers split indices, order is kept"
    with pytest.raises(TypeError):
        len(ShapesDataset())


def test_evaluation_captions_cover_singles_relations_and_held_out_pairs():
    tagged = evaluation_captions(200, seed=0)
    assert len(tagged) == 200 and tagged == evaluation_captions(200, seed=0)
    assert tagged != evaluation_captions(200, seed=1)
    by = {c: [parse_caption(t) for k, t in tagged if k == c] for c in ("single", "relation", "held_out")}
    assert len(by["single"]) == 100 and len(by["relation"]) == 60 and len(by["held_out"]) == 40
    singles = [(m.objects[0], m.position) for m in by["single"]]
    assert {o[2] for o, _ in singles} == set(SIZES) and {p for _, p in singles} == set(POSITIONS)
    assert {o[0] for o, _ in singles} == set(COLOURS) and {o[1] for o, _ in singles} == set(FILL)
    assert {m.relation for m in by["relation"]} == set(RELATIONS)
    held = [{(c, s) for c, s, _ in m.objects} & HELD_OUT for m in by["held_out"]]
    assert all(held) and set().union(*held) == HELD_OUT
    assert any(len(m.objects) == 2 for m in by["held_out"]) and any(len(m.objects) == 1 for m in by["held_out"])
    assert not any({(c, s) for c, s, _ in m.objects} & HELD_OUT for m in by["single"] + by["relation"])
    assert {m.background for ms in by.values() for m in ms} == {None} | set(BACKGROUNDS)


def test_scene_from_caption_draws_what_the_caption_says():
    rng = np.random.default_rng(9)
    for _, caption in evaluation_captions(120, seed=2):
        scene = scene_from_caption(caption, rng)
        meaning = parse_caption(caption)
        assert scene.meaning(meaning.background is not None) == meaning
        if meaning.background is not None:
            assert canonical_caption(scene, True) == caption


CANVASES = [(96, 64), (64, 96), (128, 64), (128, 96)]


def test_a_square_canvas_given_as_a_pair_is_the_spec_render_bit_for_bit():
    for index in range(40):
        scene, caption, image = training_example(2, index, 64)
        assert np.array_equal(np.asarray(render(scene, (64, 64))), np.asarray(image))
        assert training_example(2, index, (64, 64))[1] == caption


@pytest.mark.parametrize("canvas", CANVASES)
def test_a_wide_or_tall_canvas_keeps_positions_per_axis_and_sides_of_the_shorter_side(canvas):
    width, height = canvas
    rng = np.random.default_rng(20)
    for _ in range(200):
        scene = sample_scene(rng, aspect=width / height)
        image = pixels(scene, canvas)
        assert image.shape == (height, width, 3)
        for obj in scene.objects:
            mask = coverage_from_colour(pixels(alone(scene, obj), canvas), scene, obj) > 0.5
            ys, xs = np.nonzero(mask)
            box_w, box_h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            expected = obj.side * min(width, height)
            assert abs(box_w - expected) <= 2 and abs(box_h - expected) <= 2  # circles stay round
            assert not (mask[[0, -1]].any() or mask[:, [0, -1]].any()), "clear of the border"
            cx, cy = (xs.min() + xs.max() + 1) / 2 / width, (ys.min() + ys.max() + 1) / 2 / height
            assert abs(cx - obj.center[0]) <= 1.5 / width and abs(cy - obj.center[1]) <= 1.5 / height
        if len(scene.objects) == 1:
            px, py = POSITIONS[scene.position]
            assert abs(scene.objects[0].center[0] - px) <= shapes.POSITION_JITTER
            assert abs(scene.objects[0].center[1] - py) <= shapes.POSITION_JITTER


@pytest.mark.parametrize("canvas", CANVASES)
def test_checker_judges_wide_and_tall_canvases_like_square_ones(canvas):
    rng = np.random.default_rng(21)
    aspect = canvas[0] / canvas[1]
    results = [check(render(scene_from_caption(c, rng, aspect), canvas), c) for _, c in evaluation_captions(60, seed=4)]
    assert summarize(results)["all"] >= 0.99
    scene = scene_from_caption("a large red circle on the left", rng, aspect)
    assert not check(render(scene, canvas), "a large red circle on the right")["all"]
    with pytest.raises(InputError):
        render(scene, (64, 0))


def ground_truth(n, seed, size=64):
    return [(render(s, size), canonical_caption(s, True), s) for s in scenes(n, seed)]


@pytest.mark.parametrize("size, n", [(64, 300), (128, 80)])
def test_checker_passes_rendered_ground_truth(size, n):
    rates = summarize([check(image, caption) for image, caption, _ in ground_truth(n, 10 + size, size)])
    assert set(rates) == {"all", "background", "colour", "count", "position", "relation", "shape", "size"}
    assert min(rates.values()) >= 0.99, rates


def test_checker_passes_evaluation_scenes_including_held_out_pairs():
    rng = np.random.default_rng(11)
    results = [check(render(scene_from_caption(c, rng)), c) for _, c in evaluation_captions(100, seed=3)]
    assert summarize(results)["all"] >= 0.99


def test_checker_tolerates_slight_blur_and_colour_noise():
    rng = np.random.default_rng(12)
    results = []
    for image, caption, _ in ground_truth(150, 12):
        soft = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
        noisy = np.clip(np.rint(soft + rng.normal(0, 10, soft.shape)), 0, 255).astype(np.uint8)
        results.append(check(noisy, caption))
    assert summarize(results)["all"] >= 0.97


def swapped(scene, rng):
    """The scene's caption with one attribute changed: what a wrong image would show."""
    meaning = scene.meaning(True)
    objects, position, relation = [list(o) for o in meaning.objects], meaning.position, meaning.relation
    options = ["colour", "shape"] + (["size", "position"] if len(objects) == 1 else ["relation"])
    change, k = options[rng.integers(len(options))], rng.integers(len(objects))
    if change == "colour":
        objects[k][0] = rng.choice([c for c in COLOURS if c not in {o[0] for o in objects}])
    elif change == "shape":
        objects[k][1] = rng.choice([s for s in FILL if s != objects[k][1]])
    elif change == "size":
        objects[0][2] = "small" if objects[0][2] == "large" else "large"
    elif change == "position":
        position = rng.choice([p for p in POSITIONS if p != position])
    else:
        relation = INVERSE_RELATION[relation]
    return shapes.format_caption(shapes.Meaning(tuple(map(tuple, objects)), position, relation,
                                                meaning.background))


def test_checker_rejects_mismatched_captions():
    truth = ground_truth(200, 13)
    rng = np.random.default_rng(13)
    others = [check(image, truth[(i + 1) % len(truth)][1]) for i, (image, _, _) in enumerate(truth)]
    changed = [check(image, swapped(scene, rng)) for image, _, scene in truth]
    wrong_background = [check(image, caption.replace(f"a {scene.background} background",
                                                     f"a {'black' if scene.background != 'black' else 'white'}"
                                                     " background"))
                        for image, caption, scene in truth]
    assert summarize(others)["all"] <= 0.02
    assert summarize(changed)["all"] == 0.0
    assert summarize(wrong_background)["background"] == 0.0


def test_checker_counts_objects_and_ignores_specks():
    scene = Scene("white", (SceneObject("green", "square", "large", 0.4, (0.5, 0.5)),), position="in the center")
    image = pixels(scene).astype(np.uint8)
    image[3:5, 3:5] = COLOURS["red"]  # a 2x2 speck
    assert check(image, "a large green square in the center")["all"]
    assert [o.colour for o in analyse(image).objects] == ["green"]
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert check(blank, "a large green square in the center") == {
        "count": False, "colour": False, "shape": False, "size": False, "position": False, "all": False}
    with pytest.raises(InputError):  # a (64, 32) canvas is judged (non-square test above); model outputs are converted first
        check(np.zeros((64, 32, 3), np.float32), "a large green square in the center")


def drawn(polygon=None, box=None):
    """A red figure drawn at 4x with PIL and box-downsampled to 64 px: shapes the spec does not have."""
    image = Image.new("RGB", (256, 256), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.polygon(polygon, fill=COLOURS["red"]) if polygon else draw.rectangle(box, fill=COLOURS["red"])
    return image.resize((64, 64), Image.BOX)


def test_checker_does_not_pass_figures_outside_the_spec():
    bar = drawn(box=[60, 110, 196, 150])
    upside_down = drawn(polygon=[(78, 80), (178, 80), (128, 180)])
    for caption in ("a large red square in the center", "a large red circle in the center"):
        assert not check(bar, caption)["shape"]
    for shape in FILL:
        assert not check(upside_down, f"a large red {shape} in the center on a white background")["shape"]
    upright = drawn(polygon=[(128, 80), (178, 180), (78, 180)])
    assert check(upright, "a large red triangle in the center on a white background")["all"]


def test_contact_sheet_shows_examples_with_captions(tmp_path):
    sheet = shapes.contact_sheet(seed=0, n=16, size=64, columns=8)
    assert sheet.size[0] == 8 * (128 + 8) and sheet.size[1] > 2 * 128
    sheet.save(tmp_path / "shapes_sheet.png")
    assert Image.open(tmp_path / "shapes_sheet.png").size == sheet.size
