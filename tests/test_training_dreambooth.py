"""`sdlab train dreambooth`: class images generated once by the base model and reused, the loss is the
instance term plus lambda times the prior term, the loss falls on a fixed set, and the saved file is the
fine-tuned UNet with --base's frozen VAE (and text encoder unless it trains)."""

import numpy as np
import pytest
import torch

from sdlab.checkpoint.load import load_components
from sdlab.training import dreambooth as db_trainer
from sdlab.training.data import Batch
from sdlab.training.loop import STATE_FILE
from test_pipeline_parity import tiny_diffusers_sd
from test_training_loop import run, shapes_folder, tiny_config  # noqa: F401


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    tiny_diffusers_sd(folder, "sd1", "epsilon")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(shapes_folder(tmp_path_factory.mktemp("data"), count=2))


def db_config(out, base, data, **overrides):
    values = {"data": data, "base": str(base), "resolution": 16, "batch_size": 2, "lr": 1e-3,
              "dreambooth.class_prompt": "a circle", "dreambooth.class_images": 3, "dreambooth.class_steps": 2}
    values.update(overrides)
    return tiny_config("dreambooth", out, **values)


def test_class_images_are_generated_once_and_reused(tmp_path, base, data, monkeypatch):
    config = db_config(tmp_path / "run", base, data, steps=2, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        run(config, stop_at=1)
    folder = tmp_path / "run" / "class_images"
    made = sorted(p.name for p in folder.iterdir())
    assert made == ["0000.png", "0001.png", "0002.png"]
    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    from sdlab.pipelines.api import StableDiffusion as Pipeline

    prompts, txt2img = [], Pipeline.txt2img
    monkeypatch.setattr(Pipeline, "txt2img", lambda self, prompt, *a, **k: prompts.append(prompt) or txt2img(self, prompt, *a, **k))
    run(config, resume=True)
    assert prompts == [["a sks dog"]]  # the final validation grid only
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_the_loss_is_instance_plus_weighted_prior(tmp_path, base, data):
    config = db_config(tmp_path / "run", base, data, **{"dreambooth.prior_loss_weight": 0.5})
    trainer = db_trainer.build(config, torch.device("cpu"))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = lambda: Batch(images, ["", ""], 1, 0, 2, 0, 2, 0, 1, torch.Generator().manual_seed(5))  # noqa: E731
    loss, logs = trainer.loss(batch())
    torch.testing.assert_close(loss, logs["instance"] + 0.5 * logs["prior"])
    # the prior term is the class images' loss with the class prompt, drawn after the instance term's numbers
    same = batch()
    instance = trainer.term(images, "a sks dog", same)
    torch.testing.assert_close(instance, logs["instance"])
    torch.testing.assert_close(trainer.term(trainer.class_batch(same), "a circle", same), logs["prior"])
    assert trainer.class_batch(same).shape == (2, 3, 16, 16)


def test_the_loss_falls_and_the_saved_model_is_the_fine_tuned_unet(tmp_path, base, data):
    config = db_config(tmp_path / "run", base, data, steps=30, lr=2e-3, **{"dreambooth.class_prompt": None})
    logs = run(config)
    losses = [entry["loss"] for entry in logs]
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:4]), losses

    saved = load_components(tmp_path / "run" / "last.safetensors")
    original = load_components(base)
    trained = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["trained"]
    unet = saved.unet.state_dict()
    assert all(torch.equal(unet[k], trained[f"dreambooth.unet.{k}"]) for k in unet)
    assert not all(torch.equal(unet[k], v) for k, v in original.unet.state_dict().items())
    for part in ("vae", "text_encoder"):  # frozen parts: --base's, bit for bit
        mine = getattr(saved, part).state_dict()
        assert all(torch.equal(mine[k], v) for k, v in getattr(original, part).state_dict().items())


def test_the_text_encoder_trains_when_asked(tmp_path, base, data):
    config = db_config(tmp_path / "run", base, data, steps=2, **{"dreambooth.train_text_encoder": True})
    run(config)
    saved = load_components(tmp_path / "run" / "last.safetensors").text_encoder.state_dict()
    original = load_components(base).text_encoder.state_dict()
    assert not all(torch.equal(saved[k], v) for k, v in original.items())
