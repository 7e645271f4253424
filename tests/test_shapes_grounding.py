"""Token grounding (`shapes.grounding_loss`): object regions read from the shapes palette, the caption
tokens that name each object, the recorded cross-attention maps, the loss, and a run that learns it."""

import numpy as np
import pytest
import torch

from sdlab.shapes import dataset as shapes
from sdlab.errors import ConfigError
from sdlab.models.attention import attention, attention_with_probabilities, recorded_cross_attention
from sdlab.tokenizer import get_tokenizer
from sdlab.shapes import grounding
from sdlab.shapes import unet as unet_trainer
from test_training_loop import one_thread, run, tiny_base, tiny_config  # noqa: F401
from test_training_unet import a_batch


def test_colour_regions_are_the_rendered_objects_and_nothing_else():
    for index in range(40):
        scene, _, image = shapes.training_example(3, index, 64)
        regions = grounding.colour_regions(shapes.to_tensor(image)[None])
        drawn = {obj.colour: obj for obj in scene.objects}
        for colour, region in regions.items():
            if colour in drawn:
                truth = torch.from_numpy(shapes.coverage(drawn[colour], 64))
                # pixels mostly covered are found (half-covered ones go either way with the rounding)
                clear = (truth - 0.5).abs() > 0.05
                assert ((region[0] > 0.5) == (truth > 0.5))[clear].all(), (index, colour)
                assert (region[0] - truth).abs().mean() < 0.01
            else:
                assert region.max() < 0.5, (index, colour)


def test_object_tokens_are_each_objects_colour_and_shape_words():
    captions = ["a red circle to the left of a blue square", "there is a large green ball at the top, grey background",
                "at the left side, a little yellow box", ""]
    ids = get_tokenizer().tokenize(captions, 77)
    found = grounding.object_tokens(ids)
    words = [[(colour, [get_tokenizer().decode([ids[b, i].item()]).strip() for i in indices])
              for colour, indices in row] for b, row in enumerate(found)]
    assert words == [[("red", ["red", "circle"]), ("blue", ["blue", "square"])], [("green", ["green", "ball"])],
                     [("yellow", ["yellow", "box"])], []]
    # with place words, the words saying where go with the object named first: its position, or its relation
    placed = [[[words_of(ids[b], indices) for _, indices in row] for b, row in
               enumerate(grounding.object_tokens(ids, place_words=True))]][0]
    assert placed == [[["red", "circle", "left"], ["blue", "square"]], [["green", "ball", "top"]],
                      [["yellow", "box", "left"]], []]
    below = get_tokenizer().tokenize(["there is a yellow box below a green ball"], 77)
    assert [words_of(below[0], i) for _, i in grounding.object_tokens(below, True)[0]] == \
        [["yellow", "box", "below"], ["green", "ball"]]


def words_of(row, indices):
    return [get_tokenizer().decode([row[i].item()]).strip() for i in indices]


def test_attention_with_probabilities_is_attention_and_its_maps_sum_to_one():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, 8), torch.randn(2, 77, 8), torch.randn(2, 77, 8)
    out, probabilities = attention_with_probabilities(q, k, v, heads=2)
    torch.testing.assert_close(out, attention(q, k, v, heads=2), rtol=1e-5, atol=1e-6)
    assert probabilities.shape == (2, 16, 77)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, 16))


def scene_batch(size: int = 32):
    """Two renders with known object places: a red circle left of a blue square, a large green triangle."""
    scenes = [shapes.layout(shapes.parse_caption("a red circle to the left of a blue square on a white background"),
                            np.random.default_rng(0)),
              shapes.layout(shapes.parse_caption("a large green triangle in the center on a black background"),
                            np.random.default_rng(1))]
    images = torch.stack([shapes.to_tensor(shapes.render(scene, size)) for scene in scenes])
    return images, [shapes.canonical_caption(scene, True) for scene in scenes]


def maps_looking(images, captions, side: int, inside: bool) -> torch.Tensor:
    """(B, side*side, 77) attention: every object token looks only inside (or only outside) its object."""
    regions = grounding.colour_regions(images)
    maps = torch.full((images.shape[0], side * side, 77), 1.0)
    for b, found in enumerate(grounding.object_tokens(get_tokenizer().tokenize(captions, 77))):
        for colour, indices in found:
            cell = torch.nn.functional.adaptive_max_pool2d((regions[colour][b] > 0.5).float()[None, None], side)
            cell = cell.flatten()
            maps[b, :, indices] = (cell if inside else 1 - cell)[:, None]
    return maps / maps.sum(-1, keepdim=True)


def test_the_loss_is_zero_looking_inside_and_one_looking_outside():
    images, captions = scene_batch()
    ids = get_tokenizer().tokenize(captions, 77)
    inside = [maps_looking(images, captions, side, True) for side in (8, 4)]
    outside = [maps_looking(images, captions, side, False) for side in (8, 4)]
    assert grounding.grounding_loss(inside, images, ids).item() == pytest.approx(0.0, abs=1e-6)
    assert grounding.grounding_loss(outside, images, ids).item() == pytest.approx(1.0, abs=1e-6)
    half = [(a + b) / 2 for a, b in zip(inside, outside)]  # uniform over the object's tokens' two maps
    assert 0.05 < grounding.grounding_loss(half, images, ids).item() < 0.95


def test_noise_weighting_puts_the_loss_where_only_the_caption_can_place_objects():
    images, captions = scene_batch()
    ids = get_tokenizer().tokenize(captions, 77)
    maps = [maps_looking(images, captions, 8, False)]  # every term is 1
    weights = grounding.timestep_weights(torch.tensor([0, 750]), 1000, "noise")
    torch.testing.assert_close(weights, torch.tensor([0.0, 1.5]))
    assert grounding.timestep_weights(torch.tensor([0, 750]), 1000, "uniform") is None
    torch.testing.assert_close(grounding.timestep_weights(torch.tensor([0, 750]), 1000, "clean"), torch.tensor([2.0, 0.5]))
    # image 0 names two objects, image 1 one: the mean of 0, 0 and 1.5
    assert grounding.grounding_loss(maps, images, ids, weights).item() == pytest.approx(0.5)
    assert torch.linspace(0, 999, 1000).mul(2 / 1000).mean().item() == pytest.approx(1.0, abs=1e-3)


def test_the_shape_words_alone_and_the_single_object_captions_alone():
    images, captions = scene_batch()
    ids = get_tokenizer().tokenize(captions, 77)
    regions = grounding.colour_regions(images)
    # every shape word looks inside its object, every colour word outside: only the colour words cost
    maps = maps_looking(images, captions, 8, False)
    for b, found in enumerate(grounding.object_tokens(ids)):
        for colour, (_, shape) in found:
            cell = torch.nn.functional.adaptive_max_pool2d((regions[colour][b] > 0.5).float()[None, None], 8).flatten()
            maps[b, :, shape] = cell / cell.sum()
    assert grounding.grounding_loss([maps], images, ids).item() == pytest.approx(0.5, abs=1e-6)
    assert grounding.grounding_loss([maps], images, ids, words="shape").item() == pytest.approx(0.0, abs=1e-6)
    # looking outside everywhere: image 0 names two objects, image 1 one; "single" keeps image 1's terms
    outside = [maps_looking(images, captions, 8, False)]
    weights = torch.tensor([1.0, 3.0])
    assert grounding.grounding_loss(outside, images, ids, weights).item() == pytest.approx(10 / 6)  # (4 x 1 + 2 x 3) / 6
    assert grounding.grounding_loss(outside, images, ids, weights, captions="single").item() == pytest.approx(3.0)


def test_dropped_captions_add_nothing_and_keep_a_gradient_path():
    images, _ = scene_batch()
    maps = [torch.rand(2, 64, 77, requires_grad=True)]
    loss = grounding.grounding_loss(maps, images, get_tokenizer().tokenize(["", ""], 77))
    loss.backward()
    assert loss.item() == 0.0 and maps[0].grad is not None


def test_recording_catches_every_cross_attention_and_stops_after(tmp_path):
    config = tiny_config("unet", tmp_path / "run", base=str(tiny_base(tmp_path / "base.safetensors")))
    trainer = unet_trainer.build(config, torch.device("cpu"))
    unet = trainer.unet
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    context = trainer.encode_text(["a red circle on the left", ""], torch.device("cpu"))
    plain = unet(latents, t, context)
    with recorded_cross_attention(unet) as maps:
        recorded = unet(latents, t, context)
    blocks = [m for m in unet.modules() if hasattr(m, "attn2")]
    assert len(maps) == len(blocks) > 0
    assert {m.shape[0] for m in maps} == {2} and {m.shape[2] for m in maps} == {77}
    assert {m.shape[1] for m in maps} <= {64, 16, 4}  # 8x8 latents and the coarser levels
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)  # recording changes no output
    assert all(block.attn2.hook is None for block in blocks)
    unet(latents, t, context)
    assert len(maps) == len(blocks)


def test_the_trainer_adds_the_weighted_grounding_loss(tmp_path):
    base = str(tiny_base(tmp_path / "base.safetensors"))
    images, captions = scene_batch()
    losses = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        config = tiny_config("unet", tmp_path / f"run{weight}", base=base, data="shapes",
                             **{"shapes.grounding_loss": weight, "unet.caption_dropout": 0.0})
        trainer = unet_trainer.build(config, torch.device("cpu"))
        losses[weight] = trainer.loss(a_batch(images, captions, seed=2))
    (plain, plain_logs), (grounded, logs) = losses[0.0], losses[0.5]
    assert "grounding" not in plain_logs and 0 < logs["grounding"].item() < 1
    torch.testing.assert_close(logs["diffusion"], plain.detach())
    torch.testing.assert_close(grounded, plain + 0.5 * logs["grounding"])


def test_the_trainer_weights_grounding_by_the_batchs_timesteps_and_passes_its_options(tmp_path, monkeypatch):
    config = tiny_config("unet", tmp_path / "run", base=str(tiny_base(tmp_path / "base.safetensors")), data="shapes",
                         **{"shapes.grounding_loss": 1.0, "shapes.grounding_weighting": "noise",
                            "shapes.grounding_place_words": True, "shapes.grounding_words": "shape",
                            "shapes.grounding_captions": "single"})
    trainer = unet_trainer.build(config, torch.device("cpu"))
    seen = {}
    real_loss = grounding.grounding_loss

    def spy(maps, images, ids, weights=None, place_words=False, words="colour and shape", captions="all"):
        seen.update(weights=weights, place_words=place_words, words=words, captions=captions)
        return real_loss(maps, images, ids, weights, place_words, words, captions)

    monkeypatch.setattr(grounding, "grounding_loss", spy)
    images, captions = scene_batch()
    trainer.loss(a_batch(images, captions, seed=2))
    latent_shape = trainer.vae.encode(images).mean.shape
    generator = torch.Generator().manual_seed(2)  # the batch's draws: posterior, dropout, noise, timesteps
    torch.randn(latent_shape, generator=generator), torch.rand(2, generator=generator)
    torch.randn(latent_shape, generator=generator)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    torch.testing.assert_close(seen["weights"], 2 * timesteps.float() / 1000)
    assert seen["place_words"] is True and seen["words"] == "shape" and seen["captions"] == "single"


def test_the_grounding_loss_teaches_the_words_where_their_objects_are(tmp_path):
    config = tiny_config("unet", tmp_path / "run", base=str(tiny_base(tmp_path / "base.safetensors")), data="shapes",
                         **{"shapes.grounding_loss": 1.0, "unet.train_text_encoder": True, "unet.caption_dropout": 0.0})
    trainer = unet_trainer.build(config, torch.device("cpu"))
    optimizer = torch.optim.Adam([p for p in trainer.trained.parameters() if p.requires_grad], lr=3e-3)
    images, captions = scene_batch()
    losses = []
    for _ in range(40):  # one fixed batch: same noise and timesteps every step
        loss, logs = trainer.loss(a_batch(images, captions, seed=2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(logs["grounding"].item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("settings, message", [
    ({"shapes.grounding_loss": -1.0, "data": "shapes"}, "must not be negative"),
    ({"shapes.grounding_loss": 0.1, "data": "some/folder"}, "for the shapes data"),
    ({"shapes.grounding_loss": 0.1, "data": "shapes", "gradient_checkpointing": True}, "gradient checkpointing"),
    ({"shapes.grounding_weighting": "late", "data": "shapes"}, "must be one of 'uniform', 'noise'"),
])
def test_grounding_settings_that_cannot_work_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("unet", tmp_path / "run", **settings)
