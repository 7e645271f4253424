"""`sdlab train dpo`: the pair captions, which pictures pair up, Diffusion-DPO's loss against its definition,
the base model's pictures drawn and judged as the checker does (whatever the batch), the pairs file made
once and reused, the trainer's pairs sharing noise and timestep, the reference frozen while the UNet moves,
and the recipe refusals."""

import math

import numpy as np
import pytest
import torch

from sdlab.checkpoint.load import load_components
from sdlab.shapes import dataset as shapes
from sdlab.errors import ConfigError, InputError
from sdlab.shapes.check import check
from sdlab.shapes import dpo
from sdlab.training.data import Batch
from test_training_loop import TINY, one_thread, run, tiny_base, tiny_config  # noqa: F401

HELD_OUT = ("purple triangle", "orange square")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tiny_base(tmp_path_factory.mktemp("base") / "base.safetensors"))


def dpo_config(out, base, **overrides):
    values = {"base": base, "init_from_base": True, "batch_size": 2, "lr": 1e-3, "dpo.pair_captions": 4,
              "dpo.samples_per_caption": 2, "dpo.sample_steps": 2, "dpo.validation_steps": 2}
    values.update(overrides)
    return tiny_config("dpo", out, **values)


def test_pair_captions_are_two_object_training_captions_and_repeat_per_seed():
    captions = dpo.pair_captions(60, seed=3)
    assert captions == dpo.pair_captions(60, seed=3) and captions != dpo.pair_captions(60, seed=4)
    assert all(len(shapes.parse_caption(c).objects) == 2 for c in captions)
    assert not any(pair in c for c in captions for pair in HELD_OUT)
    named = [shapes.parse_caption(c).background is not None for c in captions]
    assert 0 < sum(named) < len(named)  # the background named in some, as in training


def test_pairs_join_a_right_picture_to_a_wrong_one_of_the_same_caption():
    verdicts = np.array([[True, False, False, True],  # 2 right, 2 wrong: 4 possible pairs, 3 taken
                         [True, True, True, True],  # nothing to prefer
                         [False, False, False, False],
                         [False, True, False, False]])  # 1 right, 3 wrong
    pairs = dpo.preference_pairs(verdicts, per_caption=3)
    flat = verdicts.reshape(-1)
    assert pairs.shape == (6, 2)
    assert flat[pairs[:, 0]].all() and not flat[pairs[:, 1]].any()
    assert (pairs // 4)[:, 0].tolist() == (pairs // 4)[:, 1].tolist() == [0, 0, 0, 3, 3, 3]
    assert len({tuple(p) for p in pairs}) == 6
    # of the first caption's four pairs, the three taken use both right and both wrong pictures
    assert set(pairs[:3, 0]) == {0, 3} and set(pairs[:3, 1]) == {1, 2}
    assert dpo.preference_pairs(verdicts, per_caption=1).tolist() == [[0, 1], [13, 12]]
    assert dpo.preference_pairs(verdicts[1:3], per_caption=3).shape == (0, 2)


def test_the_loss_is_log_2_where_the_unets_agree_and_ranks_the_right_picture_first():
    reference = torch.tensor([[0.30, 0.20], [0.10, 0.40]])
    loss, logs = dpo.dpo_loss(reference.clone(), reference, beta=5000.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and logs["ranked"].item() == 0.0
    # the same shift of both errors changes nothing: only the ranking against the reference counts
    loss, _ = dpo.dpo_loss(reference + 0.01, reference, beta=5000.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-5)
    errors = reference.clone().requires_grad_(True)
    dpo.dpo_loss(errors, reference, beta=5000.0)[0].backward()
    assert (errors.grad[:, 0] > 0).all() and (errors.grad[:, 1] < 0).all()  # lower e_right, raise e_wrong
    # against the definition: -log sigmoid(-beta / 2 * ((e_w - r_w) - (e_l - r_l)))
    errors = reference + torch.tensor([[-1e-4, 2e-4], [3e-4, -1e-4]])
    loss, logs = dpo.dpo_loss(errors, reference, beta=2000.0)
    margins = -1000.0 * torch.tensor([-3e-4, 4e-4])
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(margins).mean())
    assert logs["ranked"].item() == 0.5
    torch.testing.assert_close(logs["right_shift"], torch.tensor(1e-4))
    # once the right picture leads by a wide margin the loss, and its pull, fade
    errors = (reference + torch.tensor([[-0.01, 0.01]])).requires_grad_(True)
    loss, _ = dpo.dpo_loss(errors, reference, beta=5000.0)
    loss.backward()
    assert loss.item() < 1e-10 and errors.grad.abs().max() < 1e-10


def test_the_pictures_are_drawn_one_seed_each_and_judged_by_the_checker(base):
    from sdlab import load

    pipe = load(base)
    captions = dpo.pair_captions(3, seed=0)
    images, verdicts = dpo.draw_and_judge(pipe, captions, 2, seed=40, steps=2, guidance_scale=5.0,
                                          sampler="Euler a", batch_size=4)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8 and verdicts.shape == (3, 2)
    again, _ = dpo.draw_and_judge(pipe, captions, 2, seed=40, steps=2, guidance_scale=5.0, sampler="Euler a",
                                  batch_size=5)
    np.testing.assert_array_equal(images, again)  # the set does not depend on the batch
    alone = pipe.txt2img(captions[1], steps=2, guidance_scale=5.0, sampler="Euler a", seed=43, noise="a1111-cpu")
    np.testing.assert_array_equal(np.asarray(alone.images[0].convert("RGB")), images[3])  # caption 1, sample 1
    assert verdicts.reshape(-1).tolist() == [check(image, captions[i // 2])["all"] for i, image in enumerate(images)]


def rendered_pictures(captions, samples, seed, *args, **kwargs):
    """Stands in for the base model: sample 0 of each caption is its render (right), the others a render of
    the caption turned round (wrong)."""
    rng = np.random.default_rng(seed)
    images, verdicts = [], []
    for caption in captions:
        for j in range(samples):
            shown = caption if j == 0 else shapes.mirrored_caption(caption)
            images.append(np.asarray(shapes.render(shapes.scene_from_caption(shown, rng), 32)))
            verdicts.append(check(images[-1], caption)["all"])
    return np.stack(images), np.array(verdicts).reshape(len(captions), samples)


def test_the_pairs_file_is_made_once_kept_for_the_same_settings_and_made_again_for_others(tmp_path, base,
                                                                                            monkeypatch):
    calls = []
    monkeypatch.setattr(dpo, "draw_and_judge", lambda *a, **k: calls.append(a[1]) or rendered_pictures(*a[1:4]))
    config = dpo_config(tmp_path / "run", base)
    trainer = dpo.build(config, torch.device("cpu"))
    path = tmp_path / "run" / dpo.PAIRS_FILE
    stored = dpo.read_pairs(path)
    assert stored["settings"] == dpo.pair_settings(config) and len(calls) == 1
    assert stored["images"].shape == (8, 32, 32, 3) and stored["verdicts"][:, 0].all()
    assert not stored["verdicts"][:, 1].any() and stored["pairs"].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [str(c) for c in stored["captions"]] == calls[0] == dpo.pair_captions(4, config.seed)
    assert sorted(p.name for p in path.parent.iterdir()) == [dpo.PAIRS_FILE]  # no temporary file left
    stamp = path.stat().st_mtime_ns
    data = trainer.training_data(32)
    images, caption = data[0]
    assert images.shape == (2, 3, 32, 32) and caption in calls[0]
    assert sorted(data.pair(i)[1] for i in range(4)) == sorted(calls[0])

    dpo.build(config, torch.device("cpu"))
    assert len(calls) == 1 and path.stat().st_mtime_ns == stamp
    dpo.build(dpo_config(tmp_path / "run", base, **{"dpo.sample_guidance": 3.0}), torch.device("cpu"))
    assert len(calls) == 2 and dpo.read_pairs(path)["settings"]["sample_guidance"] == 3.0


def test_without_a_caption_drawn_both_right_and_wrong_there_is_nothing_to_train_on(tmp_path, base, monkeypatch):
    monkeypatch.setattr(dpo, "draw_and_judge", lambda pipe, captions, samples, *a, **k: (
        np.zeros((len(captions) * samples, 32, 32, 3), np.uint8), np.zeros((len(captions), samples), bool)))
    with pytest.raises(InputError, match="nothing to prefer"):
        dpo.build(dpo_config(tmp_path / "run", base), torch.device("cpu"))
    assert not (tmp_path / "run" / dpo.PAIRS_FILE).exists()


def test_both_pictures_of_a_pair_get_one_noise_and_timestep_and_the_reference_stays_put(tmp_path, base,
                                                                                          monkeypatch):
    monkeypatch.setattr(dpo, "draw_and_judge", lambda *a, **k: rendered_pictures(*a[1:4]))
    trainer = dpo.build(dpo_config(tmp_path / "run", base), torch.device("cpu"))
    data = trainer.training_data(32)
    examples = [data[n] for n in range(2)]
    images = torch.stack([image for image, _ in examples])
    batch = Batch(images, [caption for _, caption in examples], 0, 0, 2, 0, 2, 0, 1,
                  torch.Generator().manual_seed(3))
    calls = []
    forward = type(trainer.unet).forward

    def recording(unet, x, t, context):
        calls.append((unet is trainer.reference, x, t))
        return forward(unet, x, t, context)

    monkeypatch.setattr(type(trainer.unet), "forward", recording)
    loss, logs = trainer.loss(batch)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-5)  # the trained UNet is still the reference
    assert [reference for reference, _, _ in calls] == [False, True]
    _, noisy, timesteps = calls[0]
    assert timesteps[0::2].tolist() == timesteps[1::2].tolist() and timesteps[0] != timesteps[2]
    with torch.no_grad():
        latents = trainer.vae.encode(images.flatten(0, 1)).mean * TINY.vae.scaling_factor
    a = trainer.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noise = (noisy - a.sqrt() * latents) / (1 - a).sqrt()
    torch.testing.assert_close(noise[0::2], noise[1::2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(calls[1][1], noisy)

    monkeypatch.setattr(type(trainer.unet), "forward", forward)
    before = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
    optimizer = torch.optim.Adam(trainer.unet.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        trainer.loss(batch)[0].backward()
        optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in trainer.reference.state_dict().items())
    assert not all(torch.equal(v, before[k]) for k, v in trainer.unet.state_dict().items())
    _, logs = trainer.loss(batch)
    assert logs["ranked"].item() == 1.0  # two steps on one batch: its right pictures now come first


def test_a_run_saves_the_trained_unet_beside_the_bases_frozen_parts(tmp_path, base, monkeypatch):
    monkeypatch.setattr(dpo, "draw_and_judge", lambda *a, **k: rendered_pictures(*a[1:4]))
    logs = run(dpo_config(tmp_path / "run", base, steps=3))
    assert len(logs) == 3 and {"dpo", "ranked", "right_shift", "wrong_shift"} <= set(logs[0])
    saved, original = load_components(tmp_path / "run" / "last.safetensors"), load_components(base)
    assert not all(torch.equal(saved.unet.state_dict()[k], v) for k, v in original.unet.state_dict().items())
    for part in ("vae", "text_encoder"):
        mine = getattr(saved, part).state_dict()
        assert all(torch.equal(mine[k], v) for k, v in getattr(original, part).state_dict().items())
    assert (tmp_path / "run" / "validation" / "step-000003.png").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"data": "somewhere/"}, "data must be 'shapes'"),
    ({"dpo.beta": 0.0}, "dpo.beta"),
    ({"dpo.samples_per_caption": 1}, "a right and a wrong picture"),
    ({"dpo.pair_captions": 0}, "dpo.pair_captions"),
])
def test_recipes_it_cannot_run_are_refused(tmp_path, base, overrides, message):
    with pytest.raises(ConfigError, match=message):
        dpo_config(tmp_path / "run", base, **overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"init_from_base": False}, "init_from_base = true"),
    ({"base": None}, "needs --base"),
    ({"dpo.sampler": "bogus"}, "bogus"),
])
def test_it_needs_a_base_to_start_from_and_a_known_sampler(tmp_path, base, overrides, message, monkeypatch):
    import sdlab.bundled

    # without --base it fine-tunes the bundled model; with none installed it says what to pass
    monkeypatch.setattr(sdlab.bundled, "BUNDLED_MODEL", str(tmp_path / "absent.safetensors"))
    with pytest.raises((ConfigError, InputError), match=message):
        dpo.build(dpo_config(tmp_path / "run", **{"base": base, **overrides}), torch.device("cpu"))
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_reuses_its_pairs_and_a_changed_recipe_is_refused_before_they_are_touched(tmp_path, base,
                                                                                                  monkeypatch):
    calls = []
    monkeypatch.setattr(dpo, "draw_and_judge", lambda *a, **k: calls.append(1) or rendered_pictures(*a[1:4]))
    config = dpo_config(tmp_path / "run", base, steps=3, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        run(config, stop_at=1)
    path = tmp_path / "run" / dpo.PAIRS_FILE
    stamp = path.stat().st_mtime_ns
    with pytest.raises(ConfigError, match="cannot resume"):
        run(dpo_config(tmp_path / "run", base, steps=3, checkpoint_every=1, **{"dpo.sample_guidance": 3.0}),
            resume=True)
    assert len(calls) == 1 and path.stat().st_mtime_ns == stamp
    assert len(run(config, resume=True)) == 2 and len(calls) == 1
