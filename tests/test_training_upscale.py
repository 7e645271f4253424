"""`sdlab train upscale`: the x4 upscaler's design on a base whose VAE has a factor of 4: a UNet grown
with 3 image channels and a zero noise-level embedding (so it starts as the base), the 4x smaller image
noised to level y beside the latents, the loss falls on a fixed set, and the saved file is an upscaler
the upscale pipeline runs."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.errors import ConfigError
from sdlab.checkpoint.load import load_components
from sdlab.checkpoint.save import save_single_file
from sdlab.models import build_text_encoder, build_unet, build_vae
from sdlab.pipelines.upscale import LOW_RES_SCHEDULE, is_upscaler, upscale
from sdlab.schedules import alphas_cumprod
from sdlab.training import upscale as upscale_trainer
from sdlab.training.data import Batch
from test_training_loop import TINY, one_thread, run, shapes_folder, tiny_config  # noqa: F401

X4_TINY = TINY.replace(vae=dataclasses.replace(TINY.vae, ch_mult=(1, 2, 2)))  # 3 levels: a factor of 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    torch.manual_seed(0)
    save_single_file(path, X4_TINY, build_unet(X4_TINY.unet), build_vae(X4_TINY.vae), build_text_encoder(X4_TINY.text))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(shapes_folder(tmp_path_factory.mktemp("data")))


def test_the_grown_unet_starts_as_the_base_at_every_noise_level(tmp_path, base):
    trainer = upscale_trainer.build(tiny_config("upscale", tmp_path, base=base), torch.device("cpu"))
    original = load_components(base).unet
    assert trainer.model.config.in_channels == 7 and trainer.model.config.num_classes == 1000
    with torch.no_grad():  # the zero-initialised output layer would make every prediction 0
        for unet in (trainer.model, original):
            unet.out[2].weight.copy_(torch.linspace(-0.1, 0.1, unet.out[2].weight.numel()).view_as(unet.out[2].weight))
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 64, generator=generator)
    image = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        ours = trainer.model(latents, 500, context, concat=image, y=torch.tensor([0, 350]))
        torch.testing.assert_close(ours, original(latents, 500, context), rtol=0, atol=0)


def test_the_unet_sees_the_quarter_size_image_noised_to_its_label(tmp_path, base, monkeypatch):
    trainer = upscale_trainer.build(tiny_config("upscale", tmp_path, base=base), torch.device("cpu"))
    seen = {}
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda x, t, c, **k: seen.update(k) or forward(x, t, c, **k))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    trainer.loss(Batch(images, ["a", "b"], 0, 0, 2, 0, 2, 0, 1, torch.Generator().manual_seed(1)))

    generator = torch.Generator().manual_seed(1)
    torch.randn(2, 4, 8, 8, generator=generator)  # the latents' posterior draw comes first
    levels = torch.randint(0, 351, (2,), generator=generator)
    eps = torch.randn(2, 3, 8, 8, generator=generator)
    low = images.reshape(2, 3, 8, 4, 8, 4).mean(dim=(3, 5))  # each 4x4 block's mean
    a = alphas_cumprod(LOW_RES_SCHEDULE)[levels].view(-1, 1, 1, 1)
    assert torch.equal(seen["y"], levels)
    torch.testing.assert_close(seen["concat"], a.sqrt() * low + (1 - a).sqrt() * eps)


def test_crop_trains_on_a_random_window_of_each_image(tmp_path, base, monkeypatch):
    trainer = upscale_trainer.build(tiny_config("upscale", tmp_path, base=base, upscale={"crop": 16}),
                                    torch.device("cpu"))
    seen = {}
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda x, t, c, **k: seen.update(x=x, **k) or forward(x, t, c, **k))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    trainer.loss(Batch(images, ["a", "b"], 0, 0, 2, 0, 2, 0, 1, torch.Generator().manual_seed(1)))

    generator = torch.Generator().manual_seed(1)
    tops, lefts = torch.randint(0, 17, (2,), generator=generator), torch.randint(0, 17, (2,), generator=generator)
    assert (tops != lefts).any()  # distinct offsets, or the test could not tell rows from columns
    windows = torch.stack([images[i, :, tops[i]:tops[i] + 16, lefts[i]:lefts[i] + 16] for i in range(2)])
    torch.randn(2, 4, 4, 4, generator=generator)  # the posterior draw, then the low-res levels and noise
    levels = torch.randint(0, 351, (2,), generator=generator)
    eps = torch.randn(2, 3, 4, 4, generator=generator)
    a = alphas_cumprod(LOW_RES_SCHEDULE)[levels].view(-1, 1, 1, 1)
    low = windows.reshape(2, 3, 4, 4, 4, 4).mean(dim=(3, 5))
    assert seen["x"].shape == (2, 4, 4, 4)
    torch.testing.assert_close(seen["concat"], a.sqrt() * low + (1 - a).sqrt() * eps)


@pytest.mark.parametrize("crop", [6, 0, 64])
def test_a_crop_off_the_vae_grid_or_beyond_the_image_is_refused(tmp_path, base, crop):
    with pytest.raises(ConfigError, match="upscale.crop must be a multiple of the VAE's factor 4"):
        upscale_trainer.build(tiny_config("upscale", tmp_path, base=base, upscale={"crop": crop}), torch.device("cpu"))


def test_the_loss_falls_and_the_file_is_an_upscaler_the_pipeline_runs(tmp_path, base, data):
    config = tiny_config("upscale", tmp_path / "run", base=base, data=data, steps=40, batch_size=4, lr=2e-3,
                         validate_every=40)
    losses = [logs["loss"] for logs in run(config)]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:4]), losses
    path = tmp_path / "run" / "last.safetensors"
    loaded = load_components(path)
    assert is_upscaler(loaded.config) and loaded.config.unet.num_classes == 1000
    original = load_components(base)
    for part in ("vae", "text_encoder"):
        mine = getattr(loaded, part).state_dict()
        assert all(torch.equal(mine[k], v) for k, v in getattr(original, part).state_dict().items())
    assert (tmp_path / "run" / "validation" / "step-000040.png").exists()

    result = upscale(sdlab.load(str(path)), Image.new("RGB", (8, 8), (200, 40, 40)), "a red square", steps=3, seed=1)
    assert result.images[0].size == (32, 32)

    # an upscaler as --base is fine-tuned as it is, not grown again
    again = upscale_trainer.build(tiny_config("upscale", tmp_path / "again", base=str(path)), torch.device("cpu"))
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in loaded.unet.state_dict().items())
