"""`sdlab train unet`: noise prediction on a frozen VAE and text encoder (eps or v, optional Min-SNR
weights), caption dropout for guidance, EMA weights saved, and a file the pipeline generates with."""

import numpy as np
import pytest
import torch

import sdlab
from sdlab.checkpoint.load import load_components
from sdlab.errors import ConfigError
from sdlab.schedules import alphas_cumprod
from sdlab.training import unet as unet_trainer
from sdlab.training.data import Batch
from test_training_loop import TINY, one_thread, run, shapes_folder, tiny_base, tiny_config  # noqa: F401

CAPTIONS = ["a large red circle on the left", "a blue square above a yellow triangle"]


@pytest.fixture
def base(tmp_path):
    return str(tiny_base(tmp_path / "base.safetensors"))


def a_batch(images: torch.Tensor, captions: list[str], seed: int = 0) -> Batch:
    size = images.shape[0]
    return Batch(images, captions, 0, 0, size, 0, size, 0, 1, torch.Generator().manual_seed(seed))


def expected_loss(trainer, images, captions, seed, prediction, gamma=None, cap=None):
    """The loss from its definition, drawing the batch's random numbers in the trainer's order:
    posterior sample, caption dropout, noise, timesteps."""
    generator = torch.Generator().manual_seed(seed)
    size = images.shape[0]
    with torch.no_grad():
        posterior = trainer.vae.encode(images)
        latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)) * 0.18215
        keep = torch.rand(size, generator=generator) >= trainer.options.caption_dropout
        text_embeddings = trainer.encode_text([c if k else "" for c, k in zip(captions, keep)], images.device)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (size,), generator=generator)
    a = alphas_cumprod(TINY.schedule)[t].view(-1, 1, 1, 1)
    prediction_out = trainer.model(a.sqrt() * latents + (1 - a).sqrt() * noise, t, text_embeddings)
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    per_sample = (prediction_out - target).pow(2).mean(dim=(1, 2, 3))
    snr = (a / (1 - a)).view(-1)
    factor = snr if prediction == "epsilon" else snr + 1  # output MSE per unit of clean-latent MSE
    clean_weight = factor if gamma is None else snr.clamp(max=gamma)
    if cap is not None:
        clean_weight = torch.maximum(clean_weight, (cap * snr).clamp(max=1))
    return (per_sample * clean_weight / factor).mean()


@pytest.mark.parametrize("prediction, gamma, cap", [("epsilon", None, None), ("v", None, None), ("epsilon", 5.0, None),
                                                    ("v", 5.0, None), ("epsilon", 5.0, 50.0), ("epsilon", None, 20.0),
                                                    ("v", 5.0, 50.0)])
def test_the_loss_is_the_mse_of_the_prediction_with_optional_weights(tmp_path, base, prediction, gamma, cap):
    settings = {"model.prediction": prediction, "unet.caption_dropout": 0.5}
    if gamma is not None:
        settings["unet.min_snr_gamma"] = gamma
    if cap is not None:
        settings["unet.clean_error_weight_cap"] = cap
    torch.manual_seed(0)
    trainer = unet_trainer.build(tiny_config("unet", tmp_path, base=base, **settings), torch.device("cpu"))
    with torch.no_grad():  # the UNet's zero-initialised output layer would make every prediction 0
        trainer.model.out[2].weight.normal_(0, 0.05)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, _ = trainer.loss(a_batch(images, CAPTIONS, seed=4))
    torch.testing.assert_close(loss, expected_loss(trainer, images, CAPTIONS, 4, prediction, gamma, cap),
                               rtol=1e-5, atol=1e-6)


def test_the_clean_error_cap_raises_the_noisiest_steps_weights_and_leaves_the_rest(tmp_path, base):
    """With eps and Min-SNR 5, the noisiest step (SNR 0.0047) weighs 1 without the cap, 50 with it; the
    weight there is cap-limited, and steps with SNR >= 1 keep Min-SNR's weight."""
    settings = {"unet.min_snr_gamma": 5.0}
    plain = unet_trainer.build(tiny_config("unet", tmp_path / "a", base=base, **settings), torch.device("cpu"))
    capped = unet_trainer.build(tiny_config("unet", tmp_path / "b", base=base, **settings,
                                            **{"unet.clean_error_weight_cap": 50.0}), torch.device("cpu"))
    a = alphas_cumprod(TINY.schedule)[torch.tensor([999, 900, 500, 200, 10])]
    snr = a / (1 - a)
    assert snr[0] < 0.01 and snr[1] < 1 / 50 < snr[2] < 1 < snr[3] < 5 < snr[4]
    torch.testing.assert_close(plain.sample_weights(a), torch.tensor([1.0, 1.0, 1.0, 1.0, 5 / snr[4].item()]))
    expected = torch.tensor([50.0, 50.0, 1 / snr[2].item(), 1.0, 5 / snr[4].item()])
    torch.testing.assert_close(capped.sample_weights(a), expected)
    assert unet_trainer.build(tiny_config("unet", tmp_path / "c", base=base), torch.device("cpu")).sample_weights(a) is None


@pytest.mark.parametrize("dropout, empty", [(0.0, 0), (1.0, 2)])
def test_caption_dropout_trains_with_the_empty_caption(tmp_path, base, monkeypatch, dropout, empty):
    trainer = unet_trainer.build(tiny_config("unet", tmp_path, base=base, **{"unet.caption_dropout": dropout}),
                                 torch.device("cpu"))
    seen = []
    encode = trainer.encode_text
    monkeypatch.setattr(trainer, "encode_text", lambda captions, device: seen.extend(captions) or encode(captions, device))
    trainer.loss(a_batch(torch.zeros(2, 3, 32, 32), CAPTIONS))
    assert seen.count("") == empty


def test_the_unet_overfits_a_fixed_batch(tmp_path, base):
    config = tiny_config("unet", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=50, batch_size=4,
                         base=base, ema_decay=0.0)
    losses = [logs["loss"] for logs in run(config)]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses


def test_the_saved_unet_is_the_ema_and_the_file_generates_with_the_pipeline(tmp_path, base):
    config = tiny_config("unet", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=3, batch_size=2,
                         base=base, ema_decay=0.5, validate_every=3, **{"unet.validation_steps": 2})
    run(config)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    path = tmp_path / "run" / "last.safetensors"
    loaded = load_components(path)
    weights = loaded.unet.state_dict()
    assert all(torch.equal(weights[k], state["ema"][k]) for k in weights)
    assert not all(torch.equal(weights[k], state["trained"][f"unet.{k}"]) for k in weights)
    frozen = load_components(base)
    assert all(torch.equal(loaded.vae.state_dict()[k], v) for k, v in frozen.vae.state_dict().items())
    assert (tmp_path / "run" / "validation" / "step-000003.png").exists()

    result = sdlab.load(str(path)).txt2img(CAPTIONS[0], steps=3, seed=1, width=32, height=32, guidance_scale=3.0)
    image = np.asarray(result.images[0])
    assert image.shape == (32, 32, 3) and image.std() > 0


def test_the_unet_needs_a_base_whose_text_width_it_can_read(tmp_path, base):
    with pytest.raises(ConfigError, match="needs --base"):
        unet_trainer.build(tiny_config("unet", tmp_path), torch.device("cpu"))
    with pytest.raises(ConfigError, match="context_dim 96 must equal the text encoder's width 64"):
        unet_trainer.build(tiny_config("unet", tmp_path, base=base, **{"model.unet": {"context_dim": 96}}),
                           torch.device("cpu"))
    with pytest.raises(sdlab.UnknownSamplerError):
        unet_trainer.build(tiny_config("unet", tmp_path, base=base, **{"unet.validation_sampler": "Eulr"}),
                           torch.device("cpu"))


def test_train_text_encoder_trains_its_transformer_at_its_own_rate_and_saves_it(tmp_path, base):
    config = tiny_config("unet", tmp_path / "run", data="shapes", steps=3, batch_size=2, base=base, ema_decay=0.0,
                         **{"unet.train_text_encoder": True, "unet.text_encoder_lr": 2.5e-5})
    trainer = unet_trainer.build(config, torch.device("cpu"))
    groups = trainer.param_groups()
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, pytest.approx(2.5e-5 / config.lr)]
    assert all(p.requires_grad is False for p in trainer.text_encoder.token_embedding.parameters())

    run(config)
    before, after = load_components(base).text_encoder.state_dict(), load_components(tmp_path / "run" / "last.safetensors").text_encoder.state_dict()
    token_table = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(before[token_table], after[token_table])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("encoder.layers" in k for k in changed) and "text_model.final_layer_norm.weight" in changed
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert all(torch.equal(v, state["trained"][f"text_encoder.{k}"]) for k, v in after.items())


def test_a_frozen_text_encoder_is_saved_unchanged(tmp_path, base):
    config = tiny_config("unet", tmp_path / "run", data="shapes", steps=2, batch_size=2, base=base, ema_decay=0.0)
    run(config)
    before, after = load_components(base).text_encoder.state_dict(), load_components(tmp_path / "run" / "last.safetensors").text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_text_encoder_lr_needs_train_text_encoder(tmp_path, base):
    with pytest.raises(ConfigError, match="needs 'unet.train_text_encoder = true'"):
        tiny_config("unet", tmp_path, base=base, **{"unet.text_encoder_lr": 1e-5})
