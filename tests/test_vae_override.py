"""A VAE file in place of the model's own (`--vae`, the web UI's "SD VAE"): every published layout loads
strictly into the model's VAE, other files are refused in one line, and the infotext names it as the web UI does.

The files are built here in the layouts of the public ones, with a tiny VAE config:
- Stability's `vae-ft-mse-840000-ema-pruned.safetensors` (original keys) and `.ckpt` (a Lightning
  `{"state_dict": ...}` that also keeps the LPIPS/discriminator loss `loss.*` and LitEma's counters);
- a whole SD single file (`first_stage_model.*`);
- diffusers' `sd-vae-ft-mse/` folder (written by diffusers' own `save_pretrained`), its weights file alone,
  and a whole diffusers model folder's `vae/`.
"""

import dataclasses
import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_fixtures import TINY_SD1, TINY_VAE, ldm_state_dict, random_modules, randomize
from sdlab import hashes
from sdlab.checkpoint import convert
from sdlab.checkpoint.load import load_components
from sdlab.checkpoint.save import save_single_file
from sdlab.checkpoint.vae_file import CHECKPOINT, DIFFUSERS, ORIGINAL, apply_vae_file, read_vae_file, vae_hash
from sdlab.errors import CheckpointError
from sdlab.models import build_vae


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    """Hashes are cached in a file of the test's own, not in ~/.cache."""
    path = tmp_path / "cache" / "hashes.json"
    monkeypatch.setattr(hashes, "CACHE_FILE", str(path))
    return path


@pytest.fixture(scope="module")
def fine_tuned():
    """The VAE file's weights: a tiny VAE of the model's shapes with weights of its own."""
    return randomize(build_vae(TINY_VAE), seed=40).eval()


def model_vae():
    """The VAE the checkpoint brought: same shapes, other weights."""
    return randomize(build_vae(TINY_VAE), seed=41).eval()


def assert_holds(vae, source):
    ours, theirs = vae.state_dict(), source.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == torch.float32, key
        assert torch.equal(ours[key], value.float()), key


def assert_decodes_like(vae, source):
    latents = torch.randn(2, TINY_VAE.z_channels, 5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode(latents), source.decode(latents))


# -- the published layouts ---------------------------------------------------------------------------------


def training_leftovers() -> dict:
    """What ldm's LPIPSWithDiscriminator and LitEma leave in an autoencoder's Lightning checkpoint."""
    return {
        "loss.logvar": torch.zeros(()),
        "loss.perceptual_loss.scaling_layer.shift": torch.zeros(1, 3, 1, 1),
        "loss.perceptual_loss.net.slice1.0.weight": torch.zeros(64, 3, 3, 3),
        "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
        "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
        "loss.discriminator.main.3.num_batches_tracked": torch.tensor(0),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(840001, dtype=torch.int32),
    }


def write_original_safetensors(folder, vae):
    path = folder / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(vae.state_dict(), path)
    return path


def write_original_ckpt(folder, vae):
    path = folder / "vae-ft-mse-840000-ema-pruned.ckpt"
    torch.save({"state_dict": {**vae.state_dict(), **training_leftovers()}, "global_step": 840001}, path)
    return path


def write_whole_model(folder, vae):
    unet, _, text_encoder = random_modules(TINY_SD1, seed=42)
    path = folder / "other-model.safetensors"
    save_file(ldm_state_dict(TINY_SD1, unet, vae, text_encoder), path)
    return path


def diffusers_vae(vae):
    """diffusers' own AutoencoderKL holding `vae`'s weights."""
    from diffusers import AutoencoderKL

    theirs = AutoencoderKL.from_config(convert.diffusers_configs(TINY_SD1)["vae/config.json"])
    theirs.load_state_dict(convert.vae_to_diffusers(vae.state_dict(), TINY_VAE), strict=True)
    return theirs.eval()


def write_diffusers_folder(folder, vae):
    path = folder / "sd-vae-ft-mse"
    diffusers_vae(vae).save_pretrained(path)
    return path


def write_diffusers_file(folder, vae):
    path = folder / "sd-vae-ft-mse.safetensors"
    shutil.copy(write_diffusers_folder(folder, vae) / "diffusion_pytorch_model.safetensors", path)
    return path


def write_diffusers_model_folder(folder, vae):
    path = folder / "a-diffusers-model"
    diffusers_vae(vae).save_pretrained(path / "vae")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return path


LAYOUTS = {
    "original safetensors": (write_original_safetensors, ORIGINAL),
    "original ckpt with loss and EMA counters": (write_original_ckpt, ORIGINAL),
    "whole model's first_stage_model": (write_whole_model, CHECKPOINT),
    "diffusers folder": (write_diffusers_folder, DIFFUSERS),
    "diffusers weights file alone": (write_diffusers_file, DIFFUSERS),
    "diffusers model folder's vae/": (write_diffusers_model_folder, DIFFUSERS),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_published_layout_replaces_the_vae_weights_exactly(tmp_path, fine_tuned, layout):
    write, expected_layout = LAYOUTS[layout]
    path = write(tmp_path, fine_tuned)
    vae = model_vae()
    info = apply_vae_file(vae, path)
    assert info.layout == expected_layout and info.latent_channels == TINY_VAE.z_channels
    assert_holds(vae, fine_tuned)
    assert_decodes_like(vae, fine_tuned)


def test_the_diffusers_folder_decodes_as_diffusers_decodes_it(tmp_path, fine_tuned):
    folder = write_diffusers_folder(tmp_path, fine_tuned)
    from diffusers import AutoencoderKL

    theirs = AutoencoderKL.from_pretrained(folder).eval()
    vae = model_vae()
    apply_vae_file(vae, folder)
    latents = torch.randn(1, TINY_VAE.z_channels, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(latents), theirs.decode(latents).sample, atol=1e-5, rtol=1e-5)


def test_old_diffusers_attention_names_are_read(tmp_path, fine_tuned):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in convert.vae_to_diffusers(fine_tuned.state_dict(), TINY_VAE).items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        state[key] = value
    save_file(state, tmp_path / "old.safetensors")
    vae = model_vae()
    apply_vae_file(vae, tmp_path / "old.safetensors")
    assert_holds(vae, fine_tuned)


def test_half_precision_file_goes_into_the_model_dtype_and_device(tmp_path, fine_tuned):
    path = tmp_path / "vae-fp16.safetensors"
    save_file({k: v.half() for k, v in fine_tuned.state_dict().items()}, path)
    vae = model_vae()
    apply_vae_file(vae, path)
    for key, value in vae.state_dict().items():
        assert value.dtype == torch.float32 and value.device.type == "cpu", key
        assert torch.equal(value, fine_tuned.state_dict()[key].half().float()), key


def test_read_vae_file_gives_the_original_keys_and_drops_the_training_leftovers(tmp_path, fine_tuned):
    state_dict, info = read_vae_file(write_original_ckpt(tmp_path, fine_tuned))
    assert sorted(state_dict) == sorted(fine_tuned.state_dict())
    assert info.name == "vae-ft-mse-840000-ema-pruned.ckpt"


def test_load_components_takes_the_vae_file_and_keeps_the_model_scale(tmp_path, fine_tuned):
    unet, vae, text_encoder = random_modules(TINY_SD1, seed=43)
    model = save_single_file(tmp_path / "model.safetensors", TINY_SD1, unet, vae, text_encoder)
    folder = write_diffusers_folder(tmp_path, fine_tuned)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "scaling_factor": 0.2}))
    components = load_components(model, vae=folder)
    assert components.config.vae.scaling_factor == TINY_SD1.vae.scaling_factor
    assert components.vae_file.name == "sd-vae-ft-mse"
    assert_holds(components.vae, fine_tuned)
    # the model file itself is untouched: loaded again without --vae, its own VAE comes back
    assert_holds(load_components(model).vae, vae)
    assert load_components(model).vae_file is None


# -- refusals ----------------------------------------------------------------------------------------------


def test_a_vae_with_other_latent_channels_is_refused_by_its_channel_count(tmp_path):
    wide = randomize(build_vae(dataclasses.replace(TINY_VAE, z_channels=16)), seed=44)
    save_file(wide.state_dict(), tmp_path / "flux-ae.safetensors")
    with pytest.raises(CheckpointError, match="this VAE has 16 latent channels, the model 4; .*another family"):
        apply_vae_file(model_vae(), tmp_path / "flux-ae.safetensors")


def test_sdxl_vae_and_sdxl_checkpoints_are_refused_by_name(tmp_path, fine_tuned):
    folder = write_diffusers_folder(tmp_path, fine_tuned)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "scaling_factor": 0.13025}))
    with pytest.raises(CheckpointError, match="SDXL's VAE"):
        apply_vae_file(model_vae(), folder)
    whole = {"first_stage_model." + k: v for k, v in fine_tuned.state_dict().items()}
    whole["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    save_file(whole, tmp_path / "sd_xl_base_1.0.safetensors")
    with pytest.raises(CheckpointError, match="SDXL's VAE .*whole SDXL checkpoint"):
        apply_vae_file(model_vae(), tmp_path / "sd_xl_base_1.0.safetensors")


def test_a_vae_of_other_widths_names_the_keys_and_shapes_that_differ(tmp_path):
    other = randomize(build_vae(dataclasses.replace(TINY_VAE, ch_mult=(1, 2, 2))), seed=45)
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"other.safetensors does not fit this model's VAE \(widths 32x\[1, 2\].*"
                                              r"28 unexpected keys \(e.g. decoder.up.2.block.0"):
        apply_vae_file(model_vae(), tmp_path / "other.safetensors")
    narrow = randomize(build_vae(dataclasses.replace(TINY_VAE, ch=64)), seed=46)
    save_file(narrow.state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(CheckpointError, match=r"shapes differ \(encoder.conv_in.weight is \(64, 3, 3, 3\) in the file, "
                                              r"\(32, 3, 3, 3\) in the model"):
        apply_vae_file(model_vae(), tmp_path / "narrow.safetensors")


@pytest.mark.parametrize("kind, message", [
    ("unet", r"not a VAE: it holds a UNet \(model.diffusion_model.\*\) and no VAE"),
    ("diffusers_unet", "not a VAE: it looks like a diffusers UNet"),
    ("text_encoder", "not a VAE: it looks like a text encoder"),
    ("lora", "is a LoRA file, not a VAE"),
    ("unrelated", "not a VAE: its keys start like weight"),
])
def test_files_that_are_not_a_vae_are_refused_in_one_line(tmp_path, kind, message):
    unet, _, text_encoder = random_modules(TINY_SD1, seed=47)
    files = {
        "unet": {convert.UNET_PREFIX + k: v for k, v in unet.state_dict().items()},
        "diffusers_unet": convert.unet_to_diffusers(unet.state_dict(), TINY_SD1.unet),
        "text_encoder": text_encoder.state_dict(),
        "lora": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
        "unrelated": {"weight": torch.zeros(2)},
    }
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in files[kind].items()}, path)
    with pytest.raises(CheckpointError, match=message) as caught:
        apply_vae_file(model_vae(), path)
    assert "\n" not in str(caught.value)


def test_a_diffusers_folder_of_something_else_or_of_nothing_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="holds a diffusers UNet2DConditionModel, not a VAE"):
        apply_vae_file(model_vae(), tmp_path / "unet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder without VAE weights"):
        apply_vae_file(model_vae(), tmp_path / "empty")
    with pytest.raises(CheckpointError, match="VAE file not found"):
        apply_vae_file(model_vae(), tmp_path / "missing.safetensors")


def test_a_refused_file_leaves_the_vae_as_it_was(tmp_path):
    wide = randomize(build_vae(dataclasses.replace(TINY_VAE, z_channels=16)), seed=44)
    save_file(wide.state_dict(), tmp_path / "wide.safetensors")
    vae = model_vae()
    with pytest.raises(CheckpointError):
        apply_vae_file(vae, tmp_path / "wide.safetensors")
    assert_holds(vae, model_vae())


# -- the infotext ------------------------------------------------------------------------------------------


def test_vae_hash_and_name_are_the_web_ui_ones(tmp_path, fine_tuned):
    path = write_original_safetensors(tmp_path, fine_tuned)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert vae_hash(path) == sha256[:10]
    info = apply_vae_file(model_vae(), path)
    assert info.infotext_fields() == {"VAE hash": sha256[:10], "VAE": "vae-ft-mse-840000-ema-pruned.safetensors"}
    assert list(info.infotext_fields()) == ["VAE hash", "VAE"]  # the web UI's order


def test_a_diffusers_folder_is_named_by_the_folder_and_hashed_by_its_weights(tmp_path, fine_tuned):
    folder = write_diffusers_folder(tmp_path, fine_tuned)
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert vae_hash(folder) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    assert apply_vae_file(model_vae(), folder).name == "sd-vae-ft-mse"


def test_hashes_are_cached_by_path_size_and_mtime(tmp_path, hash_cache):
    path = tmp_path / "file.bin"
    path.write_bytes(b"abc")
    stat = os.stat(path)
    first = hashes.file_sha256(path)
    assert first == hashlib.sha256(b"abc").hexdigest()
    assert hashes.short_hash(path) == first[:10]
    assert list(json.loads(hash_cache.read_text()).values()) == [first]
    path.write_bytes(b"xyz")  # same size: with the old mtime back, the cached digest is what is asked for
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hashes.file_sha256(path) == first
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))
    assert hashes.file_sha256(path) == hashlib.sha256(b"xyz").hexdigest()
    assert hashes.short_hash(tmp_path) is None and hashes.short_hash(tmp_path / "missing") is None
