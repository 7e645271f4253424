"""Scene contrast (`shapes.scene_contrast`): a two-object caption must denoise its own picture better than a
near miss of it, one object drawn twice or the two colours exchanged, made from the pixels."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdlab.shapes import dataset as shapes
from sdlab.errors import ConfigError
from sdlab.schedules import alphas_cumprod
from sdlab.shapes import recolour
from sdlab.shapes import scene_contrast as sc
from test_shapes_grounding import scene_batch
from test_training_loop import one_thread, tiny_config  # noqa: F401
from test_shapes_relation_contrast import term_and_plain_trainers
from test_training_unet import a_batch


def two_object_scenes(count: int, seed: int = 0) -> list[shapes.Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, 0.0) for _ in range(count)]


def test_each_object_is_found_whole_by_its_colour():
    for scene in two_object_scenes(30):
        image = shapes.to_tensor(shapes.render(scene))
        regions = dict(sc.object_regions(image))
        assert sorted(regions) == sorted(obj.colour for obj in scene.objects)
        for obj in scene.objects:
            drawn = torch.from_numpy(shapes.coverage(obj, 64))
            # anti-aliased edges read as a share of the pixel; one object's region never takes the other's
            assert (regions[obj.colour] - drawn).abs().max() < 0.15, scene


def test_a_duplicated_object_is_the_scene_rendered_with_a_third_object_at_the_free_place():
    for k, scene in enumerate(two_object_scenes(20, seed=1)):
        image = shapes.to_tensor(shapes.render(scene))
        choice, place = (k % 2) * 0.5, (k * 0.37) % 1
        copy = sc.duplicate_object(image, choice, place)
        assert copy is not None
        name, region = sc.object_regions(image)[int(choice * 2)]
        offsets = sc.free_offsets(region, sum(r for _, r in sc.object_regions(image)))
        dy, dx = offsets[int(place * len(offsets))]
        original = next(obj for obj in scene.objects if obj.colour == name)
        moved = dataclasses.replace(original, center=(original.center[0] + dx / 64, original.center[1] + dy / 64))
        expected = shapes.to_tensor(shapes.render(dataclasses.replace(scene, objects=scene.objects + (moved,))))
        assert ((copy - expected).abs() * 127.5).max() <= 3, scene  # a whole-pixel shift of the same render


def test_free_places_keep_the_copy_on_the_canvas_and_apart_from_every_object():
    for scene in two_object_scenes(10, seed=2):
        image = shapes.to_tensor(shapes.render(scene))
        regions = sc.object_regions(image)
        occupied = regions[0][1] + regions[1][1]
        offsets = sc.free_offsets(regions[0][1], occupied)
        assert offsets
        grown = F.max_pool2d((occupied > 0).float()[None, None], 2 * sc.GAP + 1, stride=1, padding=sc.GAP)[0, 0]
        for dy, dx in offsets[::max(1, len(offsets) // 25)]:
            padded = F.pad(regions[0][1] > 0, (64, 64, 64, 64))  # a shift off the canvas would leave pixels here
            moved = torch.roll(padded, shifts=(dy, dx), dims=(0, 1))
            inside = moved[64:128, 64:128]
            assert inside.sum() == padded.sum()
            assert not (inside & (grown > 0)).any()
            assert not inside[:sc.GAP].any() and not inside[-sc.GAP:].any()
            assert not inside[:, :sc.GAP].any() and not inside[:, -sc.GAP:].any()


def test_no_near_miss_without_two_objects_or_without_room():
    rng = np.random.default_rng(3)
    single = next(s for s in (shapes.sample_scene(rng, 1.0) for _ in range(5)) if len(s.objects) == 1)
    assert sc.duplicate_object(shapes.to_tensor(shapes.render(single)), 0.0, 0.0) is None
    crowded = shapes.Scene("white", (
        shapes.SceneObject("red", "square", "large", 0.5, (0.5, 0.3)),
        shapes.SceneObject("blue", "square", "small", 0.2, (0.5, 0.8))))
    image = shapes.to_tensor(shapes.render(crowded))
    names = [name for name, _ in sc.object_regions(image)]
    assert sc.duplicate_object(image, names.index("red") / 2, 0.5) is None  # the large square has nowhere to go
    assert sc.duplicate_object(image, names.index("blue") / 2, 0.5) is not None  # the small one has


def test_near_misses_duplicate_or_exchange_colours_as_drawn():
    scenes = two_object_scenes(4, seed=4)
    rng = np.random.default_rng(5)
    single = next(s for s in (shapes.sample_scene(rng, 1.0) for _ in range(5)) if len(s.objects) == 1)
    images = torch.stack([shapes.to_tensor(shapes.render(s)) for s in scenes + [single]])
    kinds = torch.tensor([0.1, 0.9, 0.4, 0.6, 0.2])
    choices, places = torch.tensor([0.2, 0.2, 0.7, 0.7, 0.2]), torch.tensor([0.3, 0.3, 0.9, 0.9, 0.3])
    misses, made = sc.near_misses(images, kinds, choices, places)
    assert made.tolist() == [True, True, True, True, False]
    swapped, _ = recolour.swap_object_colours(images)
    for b in (0, 2):
        torch.testing.assert_close(misses[b], sc.duplicate_object(images[b], float(choices[b]), float(places[b])))
    for b in (1, 3):
        torch.testing.assert_close(misses[b], swapped[b])


def test_the_term_is_the_cross_entropy_of_the_true_picture_against_its_near_miss():
    true_errors = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    miss_errors = torch.tensor([1.2, 1.5, 0.5], requires_grad=True)
    loss, logs = sc.scene_contrast(true_errors, miss_errors, temperature=0.1, batch_size=4)
    scale = (true_errors + miss_errors).detach() / 2
    expected = F.softplus((true_errors - miss_errors) / (0.1 * scale))
    torch.testing.assert_close(loss, expected.sum() / 4)
    torch.testing.assert_close(logs["scene_contrast"], expected.mean().detach())
    torch.testing.assert_close(logs["scene_margin"], ((miss_errors - true_errors) / scale).mean().detach())
    assert math.isclose(expected[2].item(), math.log(2), rel_tol=1e-6)  # alike: log 2
    loss.backward()
    assert (true_errors.grad > 0).all() and (miss_errors.grad < 0).all()  # lower e, raise e'


def test_no_contrasted_sample_adds_nothing():
    errors = torch.tensor([0.3, 0.4], requires_grad=True)
    loss, logs = sc.scene_contrast(errors[:0], errors[:0].detach(), temperature=0.1, batch_size=2)
    assert loss.item() == 0 and logs["scene_contrast"].item() == 0 and logs["scene_margin"].item() == 0
    (loss + errors.sum()).backward()  # still part of the graph


def test_the_trainer_contrasts_the_near_miss_noised_alike_under_the_true_caption(tmp_path):
    images, captions = scene_batch()  # "a red circle to the left of a blue square ...", then one object
    settings = {"unet.caption_dropout": 0.0, "shapes.scene_contrast_min_timestep": 0}
    trainer, plain, seen, forward = term_and_plain_trainers(tmp_path, {"shapes.scene_contrast": 0.5}, settings)

    batch = a_batch(images, captions, seed=3)
    loss, logs = trainer.loss(batch)
    diffusion, _ = plain.loss(a_batch(images, captions, seed=3))
    torch.testing.assert_close(logs["diffusion"], diffusion.detach())
    (x, t, context), (x_miss, t_miss, context_miss) = seen
    torch.testing.assert_close(t_miss, t[:1])  # only the two-object sample, at its own timestep
    torch.testing.assert_close(context_miss, context[:1])  # under its own caption

    # the near miss drawn from the batch's generator, encoded with the sample's posterior noise and noised
    # with its diffusion noise: x_miss - x = sqrt(a) (z_miss - z), the same noise in both
    replay = a_batch(images, captions, seed=3)
    latent_shape = trainer.vae.encode(images[:1]).mean.shape[1:]
    eps = replay.randn(*latent_shape)
    replay.rand()  # caption dropout
    noise, timesteps = replay.randn(*latent_shape), replay.randint(1000)
    kinds, choices, places = replay.rand(), replay.rand(), replay.rand()
    misses, made = sc.near_misses(images[:1], kinds[:1], choices[:1], places[:1])
    assert made.all()
    factor = trainer.model_config.vae.scaling_factor
    with torch.no_grad():
        z = [(p.mean + p.std * eps[:1]) * factor for p in (trainer.vae.encode(images[:1]), trainer.vae.encode(misses))]
    a = alphas_cumprod(trainer.model_config.schedule)[timesteps[:1]].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_miss, x[:1] + a.sqrt() * (z[1] - z[0]), atol=1e-5, rtol=1e-4)
    miss_error = (forward(x_miss, t_miss, context_miss) - noise[:1]).pow(2).mean()
    true_error = (forward(x[:1], t[:1], context[:1]) - noise[:1]).pow(2).mean()
    expected, _ = sc.scene_contrast(true_error.view(1), miss_error.view(1), 0.05, batch_size=2)
    torch.testing.assert_close(loss, diffusion + 0.5 * expected, atol=1e-6, rtol=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.unet.parameters())


@pytest.mark.parametrize("settings, message", [
    ({"shapes.scene_contrast": -1.0}, "'shapes.scene_contrast' must not be negative"),
    ({"shapes.scene_contrast": 0.5, "data": "some/folder"}, "is for the shapes data"),
    ({"shapes.scene_contrast_temperature": 0.0}, "'shapes.scene_contrast_temperature' must be positive"),
    ({"shapes.scene_contrast_min_timestep": 1000}, r"'shapes.scene_contrast_min_timestep' must be in \[0, 1000\)"),
])
def test_scene_contrast_settings_that_cannot_work_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("unet", tmp_path / "run", **settings)
