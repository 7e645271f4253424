"""Relation contrast (`shapes.relation_contrast`): a caption that states a relation must denoise its scene
better than the same caption turned round."""

import math

import pytest
import torch
import torch.nn.functional as F

from sdlab.errors import ConfigError
from sdlab.shapes import relation_contrast as rc
from sdlab.shapes import unet as unet_trainer
from test_shapes_grounding import scene_batch
from test_training_loop import one_thread, tiny_base, tiny_config  # noqa: F401
from test_training_unet import a_batch


def test_only_captions_that_state_a_relation_at_late_enough_timesteps_are_contrasted():
    captions = ["a blue square above a red circle", "a large red circle on the left", "",
                "a green triangle to the left of a blue circle", "a yellow box over a red ball"]
    timesteps = torch.tensor([700, 900, 900, 500, 600])
    assert rc.contrasted(captions, timesteps, 600) == [(0, "a blue square below a red circle"),
                                                       (4, "a yellow box under a red ball")]
    assert [i for i, _ in rc.contrasted(captions, timesteps, 0)] == [0, 3, 4]


def test_the_term_is_the_cross_entropy_of_the_true_caption_against_its_mirror():
    """softplus((e - e') / (tau * mean(e, e'))) per contrasted sample, summed over the batch size."""
    captions = ["a blue square above a red circle", "a large red circle on the left", "a red circle below a blue square"]
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([800, 800, 900])

    def denoise(latents, t, texts):  # "below" is read as a shift of the prediction
        shift = torch.tensor([0.5 if "below" in text else 0.0 for text in texts]).view(-1, 1, 1, 1)
        return latents + shift

    errors = (denoise(x, timesteps, captions) - target).pow(2).mean(dim=(1, 2, 3))
    loss, logs = rc.relation_contrast(denoise, x, timesteps, captions, target, errors, 0.1, 600)

    expected = []
    for i, mirror in ((0, "a blue square below a red circle"), (2, "a red circle above a blue square")):
        e = errors[i]
        e_mirror = (x[i] + (0.5 if "below" in mirror else 0.0) - target[i]).pow(2).mean()
        expected.append(F.softplus((e - e_mirror) / (0.1 * (e + e_mirror) / 2)))
    torch.testing.assert_close(loss, sum(expected) / 3)
    torch.testing.assert_close(logs["relation_contrast"], sum(expected) / 2)
    assert expected[0] != pytest.approx(expected[1])  # the two directions are scored differently


def test_a_model_that_ignores_the_relation_pays_log_2_and_a_gradient_towards_reading_it():
    captions = ["a blue square above a red circle", "a green triangle to the right of a red square"]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    reading = torch.zeros((), requires_grad=True)  # how much the prediction moves with "above"/"right"

    def denoise(latents, t, texts):
        says = torch.tensor([1.0 if ("above" in text or "right" in text) else -1.0 for text in texts]).view(-1, 1, 1, 1)
        return latents * 0.5 + reading * says * target

    errors = (denoise(x, None, captions) - target).pow(2).mean(dim=(1, 2, 3))
    loss, logs = rc.relation_contrast(denoise, x, torch.tensor([999, 999]), captions, target, errors, 0.05, 600)
    assert logs["relation_contrast"].item() == pytest.approx(math.log(2))
    assert logs["relation_margin"].item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert reading.grad < 0  # reading the relation towards the true caption's scene lowers the loss


def test_no_contrasted_sample_adds_nothing_and_keeps_the_graph():
    errors = torch.rand(2, requires_grad=True)
    loss, logs = rc.relation_contrast(lambda *args: pytest.fail("nothing to denoise"), torch.zeros(2, 4, 8, 8),
                                      torch.tensor([999, 100]), ["a large red circle on the left", ""],
                                      torch.zeros(2, 4, 8, 8), errors, 0.05, 600)
    assert loss.item() == 0 and {name: value.item() for name, value in logs.items()} == \
        {"relation_contrast": 0.0, "relation_margin": 0.0}
    loss.backward()


def term_and_plain_trainers(tmp_path, term: dict, settings: dict, spread_output: bool = True):
    """(trainer with the `term` options on, the same without, the list the first's UNet calls are recorded
    in as (x, t, context), that UNet's own forward): both built from one tiny base with `settings`.
    spread_output: the zero-initialised output layer would make every prediction 0; give it small weights."""
    base = str(tiny_base(tmp_path / "base.safetensors"))
    trainer = unet_trainer.build(tiny_config("unet", tmp_path / "run", base=base, **term, **settings),
                                 torch.device("cpu"))
    plain = unet_trainer.build(tiny_config("unet", tmp_path / "plain", base=base, **settings), torch.device("cpu"))
    if spread_output:
        with torch.no_grad():
            for model in (trainer, plain):
                weight = model.unet.out[2].weight
                weight.copy_(torch.linspace(-0.05, 0.05, weight.numel()).view_as(weight))
    seen = []
    forward = trainer.unet.forward
    trainer.unet.forward = lambda x, t, context: seen.append((x, t, context)) or forward(x, t, context)
    return trainer, plain, seen, forward


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_the_trainer_adds_the_weighted_term_to_the_diffusion_loss(tmp_path, train_text_encoder):
    images, captions = scene_batch()  # "a red circle to the left of a blue square ...", then one object
    settings = {"unet.caption_dropout": 0.0, "shapes.relation_contrast_min_timestep": 0,
                "unet.train_text_encoder": train_text_encoder}
    trainer, plain, seen, _ = term_and_plain_trainers(tmp_path, {"shapes.relation_contrast": 0.5}, settings)

    loss, logs = trainer.loss(a_batch(images, captions, seed=3))
    diffusion, _ = plain.loss(a_batch(images, captions, seed=3))
    torch.testing.assert_close(logs["diffusion"], diffusion.detach())

    (x, t, _), (x_mirror, t_mirror, context_mirror) = seen
    torch.testing.assert_close(x_mirror, x[:1])  # only the two-object sample, the same noisy latents
    torch.testing.assert_close(t_mirror, t[:1])
    mirror = "a red circle to the right of a blue square on a white background"
    torch.testing.assert_close(context_mirror, trainer.encode_text([mirror], x.device))
    torch.testing.assert_close(loss, diffusion + 0.5 * logs["relation_contrast"] / 2)

    loss.backward()
    trained = trainer.trained["text_encoder"] if train_text_encoder else trainer.unet
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())


def test_mirrored_denoising_takes_the_relation_samples_the_contrast_leaves_out():
    captions = ["a blue square above a red circle", "a large red circle on the left", "",
                "a green triangle to the left of a blue circle", "a yellow box over a red ball"]
    timesteps = torch.tensor([700, 100, 100, 500, 850])
    assert rc.below_contrast(captions, timesteps, 850) == [(0, "a blue square below a red circle"),
                                                           (3, "a green triangle to the right of a blue circle")]
    # with the contrast's own selection, every relation sample is taken by exactly one of the two terms
    taken = sorted(i for i, _ in rc.below_contrast(captions, timesteps, 850) + rc.contrasted(captions, timesteps, 850))
    assert taken == [0, 3, 4]


def test_mirrored_denoising_is_the_mirrored_captions_error_on_the_same_target():
    captions = ["a blue square above a red circle", "a large red circle on the left", "a red circle below a blue square"]
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    moves = torch.ones((), requires_grad=True)  # how far the words move the prediction

    def denoise(latents, t, texts):
        shift = torch.tensor([0.5 if "below" in text else -0.5 for text in texts]).view(-1, 1, 1, 1)
        return latents + moves * shift

    loss, logs = rc.mirrored_denoising(denoise, x, torch.tensor([300, 300, 300]), captions, target, 850)
    below = (x[0] + 0.5 - target[0]).pow(2).mean()  # sample 0's mirror says "below"
    above = (x[2] - 0.5 - target[2]).pow(2).mean()
    torch.testing.assert_close(loss, (below + above) / 3)
    torch.testing.assert_close(logs["mirror_denoising"], (below + above) / 2)
    loss.backward()
    assert moves.grad is not None and moves.grad != 0

    loss, logs = rc.mirrored_denoising(lambda *args: pytest.fail("nothing to denoise"), x, torch.tensor([900, 300, 999]),
                                       captions, target, 850)
    assert loss.item() == 0 and logs["mirror_denoising"].item() == 0


def test_the_trainer_adds_weighted_mirrored_denoising_below_the_contrast(tmp_path):
    images, captions = scene_batch()  # "a red circle to the left of a blue square ...", then one object
    settings = {"unet.caption_dropout": 0.0, "shapes.relation_contrast_min_timestep": 999}
    trainer, plain, seen, _ = term_and_plain_trainers(tmp_path, {"shapes.relation_mirror_denoising": 0.5}, settings,
                                                      spread_output=False)

    batch_seed = 3
    loss, logs = trainer.loss(a_batch(images, captions, seed=batch_seed))
    diffusion, _ = plain.loss(a_batch(images, captions, seed=batch_seed))
    (x, t, _), (x_mirror, t_mirror, context_mirror) = seen
    assert t[0] < 999  # the two-object sample is below the contrast, so it is denoised mirrored
    torch.testing.assert_close(x_mirror, x[:1])
    torch.testing.assert_close(t_mirror, t[:1])
    mirror = "a red circle to the right of a blue square on a white background"
    torch.testing.assert_close(context_mirror, trainer.encode_text([mirror], x.device))
    torch.testing.assert_close(logs["diffusion"], diffusion.detach())
    torch.testing.assert_close(loss, diffusion + 0.5 * logs["mirror_denoising"] / 2)


@pytest.mark.parametrize("settings, message", [
    ({"shapes.relation_mirror_denoising": -1.0}, "'shapes.relation_mirror_denoising' must not be negative"),
    ({"shapes.relation_mirror_denoising": 0.5, "data": "some/folder"}, "is for the shapes data"),
    ({"shapes.relation_contrast": -1.0}, "'shapes.relation_contrast' must not be negative"),
    ({"shapes.relation_contrast": 0.5, "data": "some/folder"}, "is for the shapes data"),
    ({"shapes.relation_contrast_temperature": 0.0}, "'shapes.relation_contrast_temperature' must be positive"),
    ({"shapes.relation_contrast_min_timestep": -1}, r"'shapes.relation_contrast_min_timestep' must be in \[0, 1000\)"),
])
def test_relation_contrast_settings_that_cannot_work_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("unet", tmp_path / "run", **settings)
