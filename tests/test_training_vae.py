"""`sdlab train vae`: latent diffusion's autoencoder loss, the PatchGAN critic with its adaptive weight,
and a saved file that holds the measured latent scaling factor."""

import pytest
import torch

from sdlab.checkpoint.load import load_components
from sdlab.errors import ConfigError
from sdlab.training import components, vae as vae_trainer
from sdlab.training.data import Batch, ImageFolder
from sdlab.training.discriminator import PatchDiscriminator, hinge_d_loss
from test_training_loop import TINY, one_thread, run, shapes_folder, tiny_base, tiny_config, trained_state  # noqa: F401


def a_batch(images: torch.Tensor, step: int = 0, seed: int = 0) -> Batch:
    size = images.shape[0]
    return Batch(images, [""] * size, step, 0, size, 0, size, 0, 1, torch.Generator().manual_seed(seed))


def test_the_autoencoder_overfits_a_fixed_batch(tmp_path):
    config = tiny_config("vae", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=30, batch_size=4)
    rec = [logs["rec"] for logs in run(config)]
    assert sum(rec[-5:]) / 5 < 0.6 * sum(rec[:5]) / 5, rec


def test_the_loss_is_reconstruction_plus_a_small_kl_per_pixel(tmp_path):
    config = tiny_config("vae", tmp_path, **{"vae.l1_weight": 0.5, "vae.l2_weight": 2.0, "vae.kl_weight": 0.1})
    torch.manual_seed(0)
    trainer = vae_trainer.build(config, torch.device("cpu"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, logs = trainer.loss(a_batch(images, seed=3))

    posterior = trainer.model.encode(images)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))  # the batch's first draw
    error = trainer.model.decode(posterior.mean + posterior.std * eps) - images
    kl = posterior.kl().mean() / (3 * 32 * 32)  # KL summed over a sample's latents, per image pixel
    expected = 0.5 * error.abs().mean() + 2.0 * error.pow(2).mean() + 0.1 * kl
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["kl"], kl, rtol=1e-5, atol=1e-7)


def test_initial_logvar_starts_a_fresh_encoder_nearly_deterministic(tmp_path):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = vae_trainer.build(tiny_config("vae", tmp_path), torch.device("cpu"))
    narrow = vae_trainer.build(tiny_config("vae", tmp_path, **{"vae.initial_logvar": -10.0}), torch.device("cpu"))
    with torch.no_grad():
        assert plain.model.encode(images).std.mean() > 0.3
        std = narrow.model.encode(images).std
    assert std.max() < 0.02  # exp(-10 / 2) = 0.0067, moved a little by the weights' own contribution
    means = {k: v for k, v in narrow.model.state_dict().items() if k != "quant_conv.bias"}
    assert all(torch.equal(v, plain.model.state_dict()[k]) for k, v in means.items())  # only that bias changes


def test_the_critic_joins_at_disc_start_and_learns_only_from_its_hinge_loss(tmp_path):
    config = tiny_config("vae", tmp_path, **{"vae.disc_start": 5})
    torch.manual_seed(0)
    trainer = vae_trainer.build(config, torch.device("cpu"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert set(trainer.loss(a_batch(images, step=4))[1]) == {"rec", "kl"}

    loss, logs = trainer.loss(a_batch(images, step=5, seed=1))
    assert {"g", "d", "d_weight"} <= set(logs)
    loss.backward()
    critic = trainer.discriminator
    from_loss = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    posterior = trainer.model.encode(images)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    reconstruction = trainer.model.decode(posterior.mean + posterior.std * eps)
    hinge_d_loss(critic(images), critic(reconstruction.detach())).backward()
    for a, p in zip(from_loss, critic.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)  # the generator term left it alone
    assert trainer.model.decoder.conv_out.weight.grad is not None


def test_the_adaptive_weight_balances_gradient_norms_at_the_last_layer():
    last_layer = torch.nn.Parameter(torch.ones(3, 4))
    rec_loss = (2.0 * last_layer).sum()  # gradient 2 everywhere
    g_loss = (8.0 * last_layer).sum()  # gradient 8 everywhere
    assert vae_trainer.adaptive_weight(rec_loss, g_loss, last_layer).item() == pytest.approx(0.25, rel=1e-4)
    assert vae_trainer.adaptive_weight((0 * last_layer).sum(), (1e-12 * last_layer).sum(), last_layer).item() == 0.0


def test_the_hinge_loss_is_zero_once_the_critic_is_confident():
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 1.0


def test_the_patch_critic_judges_patches():
    logits = PatchDiscriminator(3, channels=16, layers=3)(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8, then two 4x4 stride-1 convolutions


def test_the_saved_file_holds_the_trained_vae_and_its_measured_scaling_factor(tmp_path):
    data = shapes_folder(tmp_path / "data")
    config = tiny_config("vae", tmp_path / "run", data=str(data), steps=2, batch_size=2, **{"vae.scale_batches": 2})
    run(config)
    loaded = load_components(tmp_path / "run" / "last.safetensors")
    trained = trained_state(tmp_path / "run")
    assert all(torch.equal(loaded.vae.state_dict()[k], trained[f"vae.{k}"]) for k in loaded.vae.state_dict())

    # 1 / std of posterior samples of the first scale_batches x batch_size samples
    images = torch.stack([ImageFolder(str(data), 32, verbose=False)[n][0] for n in range(4)])
    with torch.no_grad():
        posterior = loaded.vae.encode(images)
    generator = torch.Generator().manual_seed(config.seed)
    latents = torch.cat([posterior.mean[i:i + 2] + posterior.std[i:i + 2] * torch.randn(posterior.mean[i:i + 2].shape,
                         generator=generator) for i in (0, 2)])
    assert loaded.config.vae.scaling_factor == pytest.approx(1 / latents.std().item(), rel=1e-5)
    assert loaded.config.vae.scaling_factor != TINY.vae.scaling_factor

    # without --base, the parts it did not train are freshly initialised from the recipe's seed
    fresh = components.build_part("text_encoder", TINY, config.seed).state_dict()
    assert all(torch.equal(loaded.text_encoder.state_dict()[k], fresh[k]) for k in fresh)


def test_with_a_base_the_parts_it_does_not_train_come_from_the_base(tmp_path):
    base_path = tiny_base(tmp_path / "base.safetensors", seed=5)
    config = tiny_config("vae", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=1, batch_size=2,
                         base=str(base_path))
    run(config)
    base, result = load_components(base_path), load_components(tmp_path / "run" / "last.safetensors")
    assert all(torch.equal(result.unet.state_dict()[k], v) for k, v in base.unet.state_dict().items())
    assert not torch.equal(result.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)
    assert result.config.unet == base.config.unet and result.config.name == base.config.name


def test_decoder_only_fine_tuning_keeps_the_latent_space_of_the_base(tmp_path):
    base_path = tiny_base(tmp_path / "base.safetensors", seed=5)
    config = tiny_config("vae", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=3, batch_size=2,
                         base=str(base_path), init_from_base=True, lr=1e-3, checkpoint_every=1,
                         **{"vae.train_decoder_only": True})
    with pytest.raises(KeyboardInterrupt):
        run(config, stop_at=1)
    logs = run(config, resume=True)  # the optimizer holds the decoder alone, before and after resuming
    assert len(logs) == 2 and all("kl" in entry for entry in logs)
    base, result = load_components(base_path), load_components(tmp_path / "run" / "last.safetensors")
    for name, value in base.vae.state_dict().items():
        same = torch.equal(result.vae.state_dict()[name], value)
        if name.startswith(("encoder.", "quant_conv.")):
            assert same, name  # the encoder is frozen: latents of any image are the base's
        elif name == "decoder.conv_out.weight":
            assert not same  # the decoder learned
    assert result.config.vae.scaling_factor == base.config.vae.scaling_factor  # not re-measured


def test_decoder_only_sends_no_gradient_into_the_encoder(tmp_path):
    base_path = tiny_base(tmp_path / "base.safetensors", seed=5)
    config = tiny_config("vae", tmp_path, base=str(base_path), init_from_base=True, **{"vae.train_decoder_only": True})
    trainer = vae_trainer.build(config, torch.device("cpu"))
    loss, _ = trainer.loss(a_batch(torch.rand(2, 3, 32, 32) * 2 - 1))
    loss.backward()
    assert all(p.grad is None for p in [*trainer.model.encoder.parameters(), *trainer.model.quant_conv.parameters()])
    assert trainer.model.decoder.conv_out.weight.grad is not None
    assert trainer.model.post_quant_conv.weight.grad is not None


@pytest.mark.parametrize("settings", [{"init_from_base": True}, {"base": "BASE"}])
def test_decoder_only_needs_a_base_to_start_from(tmp_path, settings):
    base_path = tiny_base(tmp_path / "base.safetensors")
    settings = {k: str(base_path) if v == "BASE" else v for k, v in settings.items()}
    config = tiny_config("vae", tmp_path / "run", **settings, **{"vae.train_decoder_only": True})
    with pytest.raises(ConfigError, match="train_decoder_only fine-tunes --base's decoder"):
        run(config)
    assert not (tmp_path / "run").exists()  # refused before anything was written
