"""Recoloured inputs (`shapes.recolour_fraction`): two-object renders with their colours exchanged on
pixels, and the trainer noising those while its target stays the true picture."""

import dataclasses

import numpy as np
import pytest
import torch

from sdlab.shapes import dataset as shapes
from sdlab.errors import ConfigError
from sdlab.schedules import alphas_cumprod
from sdlab.shapes import recolour
from sdlab.shapes import unet as unet_trainer
from test_shapes_grounding import scene_batch
from test_training_loop import TINY, one_thread, tiny_base, tiny_config  # noqa: F401
from test_training_unet import a_batch


def exchanged(scene: shapes.Scene) -> shapes.Scene:
    first, second = scene.objects
    return dataclasses.replace(scene, objects=(dataclasses.replace(first, colour=second.colour),
                                               dataclasses.replace(second, colour=first.colour)))


def test_two_object_renders_come_back_as_the_render_with_colours_exchanged():
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng, 0.5) for _ in range(60)]
    images = torch.stack([shapes.to_tensor(shapes.render(scene)) for scene in scenes])
    swapped, swappable = recolour.swap_object_colours(images)
    assert swappable.tolist() == [len(scene.objects) == 2 for scene in scenes]
    for scene, image, out in zip(scenes, images, swapped):
        expected = image if len(scene.objects) == 1 else shapes.to_tensor(shapes.render(exchanged(scene)))
        error = (out - expected).abs() * 127.5  # in 0-255 steps
        assert error.max() <= 2, (scene, error.max())  # anti-aliased edges included


def test_the_trainer_noises_the_exchanged_picture_and_aims_at_the_true_one(tmp_path):
    """Every captioned two-object sample at t >= the minimum: input sqrt(a) z_swapped + sqrt(1 - a) n,
    target the noise that takes the true latents there; the single object is trained as usual."""
    images, captions = scene_batch()  # a two-object scene, then one object
    config = tiny_config("unet", tmp_path / "run", base=str(tiny_base(tmp_path / "base.safetensors")),
                         **{"shapes.recolour_fraction": 1.0, "shapes.recolour_min_timestep": 0, "unet.caption_dropout": 0.0})
    torch.manual_seed(0)
    trainer = unet_trainer.build(config, torch.device("cpu"))
    with torch.no_grad():  # the zero-initialised output layer would make every prediction 0
        trainer.model.out[2].weight.normal_(0, 0.05)
    seen = {}
    forward = trainer.unet.forward
    trainer.unet.forward = lambda x, t, context: seen.update(x=x, t=t) or forward(x, t, context)
    loss, _ = trainer.loss(a_batch(images, captions, seed=3))

    generator = torch.Generator().manual_seed(3)  # the batch's draws: posterior, dropout, noise, timesteps
    with torch.no_grad():
        posterior = trainer.vae.encode(images)
        eps = torch.randn(posterior.mean.shape, generator=generator)
        torch.rand(2, generator=generator)
        noise = torch.randn(posterior.mean.shape, generator=generator)
        t = torch.randint(0, 1000, (2,), generator=generator)
        latents = (posterior.mean + posterior.std * eps) * 0.18215
        swapped = trainer.vae.encode(recolour.swap_object_colours(images)[0])
        noised = torch.cat([(swapped.mean + swapped.std * eps)[:1] * 0.18215, latents[1:]])
        a = alphas_cumprod(TINY.schedule)[t].view(-1, 1, 1, 1)
        x = a.sqrt() * noised + (1 - a).sqrt() * noise
        target = (x - a.sqrt() * latents) / (1 - a).sqrt()
        torch.testing.assert_close(seen["x"], x, rtol=1e-4, atol=1e-5)
        expected = (trainer.unet(x, t, trainer.encode_text(captions, x.device)) - target).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(noised[0], latents[0], atol=1e-3)


@pytest.mark.parametrize("settings, min_timestep", [({"unet.caption_dropout": 1.0}, 0), ({}, 999)])
def test_dropped_captions_and_earlier_timesteps_keep_their_own_picture(tmp_path, settings, min_timestep):
    images, captions = scene_batch()
    config = tiny_config("unet", tmp_path / "run", base=str(tiny_base(tmp_path / "base.safetensors")),
                         **{"shapes.recolour_fraction": 1.0, "shapes.recolour_min_timestep": min_timestep,
                            "unet.caption_dropout": 0.0, **settings})
    trainer = unet_trainer.build(config, torch.device("cpu"))
    plain = unet_trainer.build(tiny_config("unet", tmp_path / "plain", base=str(tmp_path / "base.safetensors"),
                                           **{"unet.caption_dropout": 0.0, **settings}), torch.device("cpu"))
    with torch.no_grad():
        for model in (trainer, plain):
            model.model.out[2].weight.copy_(torch.linspace(-0.05, 0.05, model.model.out[2].weight.numel())
                                            .view_as(model.model.out[2].weight))
    torch.testing.assert_close(trainer.loss(a_batch(images, captions, seed=3))[0],
                               plain.loss(a_batch(images, captions, seed=3))[0])


@pytest.mark.parametrize("settings, message", [
    ({"shapes.recolour_fraction": 1.5}, r"'shapes.recolour_fraction' must be in \[0, 1\]"),
    ({"shapes.recolour_fraction": 0.5, "data": "some/folder"}, "is for the shapes data"),
    ({"shapes.recolour_min_timestep": 1000}, r"'shapes.recolour_min_timestep' must be in \[0, 1000\)"),
])
def test_recolour_settings_that_cannot_work_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("unet", tmp_path / "run", **settings)
