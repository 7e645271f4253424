"""Checkpoints: sdlab reads the public SD 1.x/2.x files and diffusers folders, and writes files others read.

Files are built by the tests in the exact layout of the public ones (see checkpoint_fixtures.py),
with random weights. diffusers is the oracle: its own `convert_ldm_*` functions for the renaming,
`from_single_file` for what an sdlab file means to other tools, `save_pretrained` for folders.
Loaded tensors must be *identical* (torch.equal) to the ones written: loading never changes a value,
except the documented fp16 -> fp32 upcast, which is exact.
"""

import dataclasses
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from checkpoint_fixtures import (
    SCHEDULE_BUFFERS, TINY_SD1, TINY_SD2, ldm_document, ldm_state_dict, ldm_yaml, random_modules, randomize,
    schedule_buffers, write_diffusers_configs,
)
from sdlab.checkpoint import convert
from sdlab.checkpoint.detect import detect_config
from sdlab.checkpoint.io import read_metadata, read_state_dict
from sdlab.checkpoint.load import (
    build_components, clean_state_dict, ema_key_to_unet_key, load_components, read_checkpoint,
)
from sdlab.checkpoint.save import save_single_file
from sdlab.config import SD1, SD2, ModelConfig, ScheduleConfig, VAEConfig, from_json, to_json
from sdlab.errors import CheckpointError, InputError
from sdlab.models import build_text_encoder, build_unet, build_vae


@pytest.fixture
def offline(monkeypatch):
    """Every diffusers/transformers call must stay on this machine (the hub reads this at call time)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def sd1():
    return random_modules(TINY_SD1, seed=1)


@pytest.fixture(scope="module")
def sd2():
    return random_modules(TINY_SD2, seed=2)


def assert_same_tensors(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def assert_modules_hold(components, config, unet, vae, text_encoder):
    assert components.config == config
    assert_same_tensors(components.unet.state_dict(), unet.state_dict())
    assert_same_tensors(components.vae.state_dict(), vae.state_dict())
    assert_same_tensors(components.text_encoder.state_dict(), text_encoder.state_dict())


def meta_state_dicts(config: ModelConfig) -> dict:
    """The three state dicts of a full-size model as meta tensors: real shapes, no memory."""
    with torch.device("meta"):
        return convert.join_original(
            config, build_unet(config.unet).state_dict(), build_vae(config.vae).state_dict(),
            build_text_encoder(config.text).state_dict(),
        )


# -- reading files ---------------------------------------------------------------------------------------


def test_safetensors_gives_tensors_and_metadata(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.arange(6.0).reshape(2, 3)}, path, metadata={"sdlab_config": "{}"})
    tensors, metadata = read_state_dict(path)
    assert torch.equal(tensors["x"], torch.arange(6.0).reshape(2, 3))
    assert metadata == {"sdlab_config": "{}"}
    assert read_metadata(path) == {"sdlab_config": "{}"}


def test_lightning_ckpt_is_unwrapped_with_its_harmless_extras(tmp_path, monkeypatch):
    # Lightning's `callbacks` held the ModelCheckpoint class itself as a key in the CompVis files
    lightning = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = lightning.__name__, "ModelCheckpoint"
    lightning.ModelCheckpoint = ModelCheckpoint
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, lightning.__name__, lightning)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3), "note": "text"}, "global_step": np.int64(470000),
                "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.5)}}}, path)
    monkeypatch.undo()  # pytorch_lightning is not installed where the file is read
    tensors, metadata = read_state_dict(path)
    assert list(tensors) == ["w"] and torch.equal(tensors["w"], torch.ones(3))
    assert metadata == {}


class _RunsShell:
    """A pickle payload: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickle_that_runs_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _RunsShell(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*system"):
        read_state_dict(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing"):
        load_components(path)
    assert not marker.exists()


def _valid_safetensors(path):
    save_file({"x": torch.randn(64, 64)}, path)
    return path.read_bytes()


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("directory", "is a directory"),
    ("unknown_extension", "unknown checkpoint format '.onnx'"),
    ("truncated_safetensors", "truncated or corrupt safetensors"),
    ("garbage_safetensors", "truncated or corrupt safetensors"),
    ("empty_safetensors", "truncated or corrupt safetensors"),
    ("truncated_ckpt", "truncated or corrupt checkpoint"),
    ("garbage_ckpt", "corrupt"),
])
def test_unreadable_files_give_one_clear_line(tmp_path, case, message):
    data = _valid_safetensors(tmp_path / "valid.safetensors")
    torch.save({"state_dict": {"x": torch.randn(64, 64)}}, tmp_path / "valid.ckpt")
    ckpt = (tmp_path / "valid.ckpt").read_bytes()
    paths = {
        "missing": tmp_path / "nope.safetensors",
        "directory": tmp_path,
        "unknown_extension": tmp_path / "model.onnx",
        "truncated_safetensors": tmp_path / "half.safetensors",
        "garbage_safetensors": tmp_path / "garbage.safetensors",
        "empty_safetensors": tmp_path / "empty.safetensors",
        "truncated_ckpt": tmp_path / "half.ckpt",
        "garbage_ckpt": tmp_path / "garbage.ckpt",
    }
    contents = {
        "unknown_extension": b"onnx", "truncated_safetensors": data[: len(data) // 2],
        "garbage_safetensors": bytes(range(256)) * 8, "empty_safetensors": b"",
        "truncated_ckpt": ckpt[: len(ckpt) // 2], "garbage_ckpt": bytes(range(256)) * 8,
    }
    path = paths[case]
    if case in contents:
        path.write_bytes(contents[case])
    with pytest.raises(CheckpointError, match=message) as error:
        read_state_dict(path)
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError):
        load_components(path)


def test_directory_that_is_not_a_diffusers_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a diffusers model folder: vae/config.json, text_encoder/config.json"):
        load_components(tmp_path)


# -- detection ---------------------------------------------------------------------------------------------


def test_sd1_layout_is_detected_exactly(sd1):
    state = ldm_state_dict(TINY_SD1, *sd1)
    weights, buffers, _ = clean_state_dict(state)
    assert detect_config(weights, schedule_buffers=buffers) == TINY_SD1


def test_sd2_layout_is_detected_with_v_prediction_unless_told_epsilon(sd2):
    weights, buffers, _ = clean_state_dict(ldm_state_dict(TINY_SD2, *sd2))
    assert detect_config(weights, schedule_buffers=buffers) == TINY_SD2
    base = detect_config(weights, prediction="epsilon")
    assert base == TINY_SD2.replace(prediction="epsilon", resolution=512, name="sd2-base")


@pytest.mark.parametrize("preset", [SD1, SD2], ids=["sd1", "sd2"])
def test_full_size_presets_are_detected_from_shapes(preset):
    assert detect_config(meta_state_dicts(preset)) == preset


def test_inpainting_unet_is_detected_by_its_nine_input_channels():
    inpainting = SD1.replace(unet=dataclasses.replace(SD1.unet, in_channels=9), name="sd1-inpainting")
    assert detect_config(meta_state_dicts(inpainting)) == inpainting
    sd2_inpainting = SD2.replace(unet=dataclasses.replace(SD2.unet, in_channels=9), prediction="epsilon",
                                 resolution=512, name="sd2-base-inpainting")
    assert detect_config(meta_state_dicts(sd2_inpainting)) == sd2_inpainting


def test_training_schedule_is_read_from_the_betas_buffer(sd1):
    other = TINY_SD1.replace(schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02))
    weights, buffers, _ = clean_state_dict(ldm_state_dict(other, *sd1))
    assert detect_config(weights, schedule_buffers=buffers).schedule == ScheduleConfig(beta_start=0.0001, beta_end=0.02)


@pytest.mark.parametrize("layout, message", [
    ("sdxl", "SDXL"),
    ("lora", "LoRA file"),
    ("vae_only", "no model.diffusion_model.* keys .*VAE-only"),
    ("diffusers_unet", "no model.diffusion_model.* keys .*diffusers folder"),
    ("no_text_encoder", "no text encoder keys"),
    ("unrelated", "not a Stable Diffusion 1.x/2.x checkpoint: no model.diffusion_model.* keys"),
])
def test_other_architectures_are_refused_by_name(tmp_path, sd1, layout, message):
    state = convert.join_original(TINY_SD1, *(m.state_dict() for m in sd1))
    unet_keys = {k: v for k, v in state.items() if k.startswith(convert.UNET_PREFIX)}
    files = {
        "sdxl": {**unet_keys, "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)},
        "lora": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
        "vae_only": {k[len(convert.VAE_PREFIX):]: v for k, v in state.items() if k.startswith(convert.VAE_PREFIX)},
        "diffusers_unet": convert.unet_to_diffusers(sd1[0].state_dict(), TINY_SD1.unet),
        "no_text_encoder": {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")},
        "unrelated": {"encoder.layer.0.weight": torch.zeros(2)},
    }
    path = tmp_path / f"{layout}.safetensors"
    save_file({k: v.contiguous() for k, v in files[layout].items()}, path)
    with pytest.raises(CheckpointError, match=message):
        load_components(path)


# -- conversion tables against diffusers' own -------------------------------------------------------------


@pytest.mark.parametrize("preset", [SD1, SD2], ids=["sd1", "sd2"])
def test_unet_and_vae_renaming_matches_diffusers_converters(preset):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    state = meta_state_dicts(preset)
    configs = convert.diffusers_configs(preset)
    parts = convert.original_to_diffusers(state, preset)
    theirs = convert_ldm_unet_checkpoint(state, configs["unet/config.json"])
    assert sorted(parts["unet"]) == sorted(theirs)
    assert all(parts["unet"][k] is theirs[k] for k in theirs)
    theirs = convert_ldm_vae_checkpoint(state, configs["vae/config.json"])
    assert sorted(parts["vae"]) == sorted(theirs)
    assert all(parts["vae"][k].shape == theirs[k].shape for k in theirs)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet/config.json"])
        vae = AutoencoderKL.from_config(configs["vae/config.json"])
    for model, converted in ((unet, parts["unet"]), (vae, parts["vae"])):
        expected = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in converted.items()} == expected


def test_tiny_unet_and_vae_values_match_diffusers_converters(sd1):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    state = convert.join_original(TINY_SD1, *(m.state_dict() for m in sd1))
    configs = convert.diffusers_configs(TINY_SD1)
    parts = convert.original_to_diffusers(state, TINY_SD1)
    assert_same_tensors(parts["unet"], convert_ldm_unet_checkpoint(state, configs["unet/config.json"]))
    assert_same_tensors(parts["vae"], convert_ldm_vae_checkpoint(state, configs["vae/config.json"]))


def test_open_clip_split_matches_diffusers_converter(sd2):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    state = convert.join_original(TINY_SD2, *(m.state_dict() for m in sd2))
    text_config = convert.diffusers_configs(TINY_SD2)["text_encoder/config.json"]
    hf_model = CLIPTextModel(CLIPTextConfig(**text_config))
    # diffusers leaves out resblock 23 by name; its model takes the first num_hidden_layers of the rest
    model_keys = {"text_model." + k: v.shape for k, v in hf_model.state_dict().items()}
    theirs = {k: v for k, v in convert_open_clip_checkpoint(hf_model, state).items() if k in model_keys}
    ours = convert.original_to_diffusers(state, TINY_SD2)["text_encoder"]
    assert_same_tensors(ours, theirs)
    assert {k: v.shape for k, v in ours.items()} == model_keys


def test_sd2_diffusers_text_encoder_drops_the_last_resblock_and_gets_it_back_as_zeros(sd2):
    # diffusers' own list of the keys its SD2 text encoder leaves out: the 24th resblock and the projection
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE

    last = TINY_SD2.text.layers - 1
    ignored = {k.replace("resblocks.23.", f"resblocks.{last}.") for k in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE}
    state = convert.join_original(TINY_SD2, *(m.state_dict() for m in sd2))
    text = convert.original_to_diffusers(state, TINY_SD2)["text_encoder"]
    back = convert.diffusers_to_original(
        convert.unet_to_diffusers(sd2[0].state_dict(), TINY_SD2.unet),
        convert.vae_to_diffusers(sd2[1].state_dict(), TINY_SD2.vae), text, TINY_SD2)
    restored = {k for k in state if k.startswith(f"cond_stage_model.model.transformer.resblocks.{last}.")}
    assert restored | {"cond_stage_model.model.text_projection"} == ignored
    for key in ignored:
        assert torch.count_nonzero(back[key]) == 0, key
    assert_same_tensors({k: v for k, v in back.items() if k not in ignored and "logit_scale" not in k},
                        {k: v for k, v in state.items() if k not in ignored and "logit_scale" not in k})


def test_vae_attention_names_of_old_diffusers_folders_are_read(sd1):
    # diffusers < 0.14 wrote query/key/value/proj_attn; such VAE folders are still published
    modern = convert.vae_to_diffusers(sd1[1].state_dict(), TINY_SD1.vae)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in modern.items():
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    assert legacy != modern
    assert_same_tensors(convert.vae_from_diffusers(legacy, TINY_SD1.vae), sd1[1].state_dict())


@pytest.mark.parametrize("config_name", ["sd1", "sd2"])
def test_original_diffusers_original_round_trip_is_the_identity(sd1, sd2, config_name):
    config, modules = (TINY_SD1, sd1) if config_name == "sd1" else (TINY_SD2, sd2)
    state = convert.join_original(config, *(m.state_dict() for m in modules))
    parts = convert.original_to_diffusers(state, config)
    back = convert.diffusers_to_original(parts["unet"], parts["vae"], parts["text_encoder"], config)
    if config.text.kind == "open_clip":  # diffusers keeps no last resblock and no projection head
        again = convert.original_to_diffusers(back, config)
        for part in parts:
            assert_same_tensors(again[part], parts[part])
        state = {k: v for k, v in state.items() if k in back and "resblocks.2." not in k and "text_projection" not in k
                 and "logit_scale" not in k}
        back = {k: back[k] for k in state}
    assert_same_tensors(back, state)


@pytest.mark.parametrize("preset", [SD1, SD2], ids=["sd1", "sd2"])
def test_ema_key_names_map_back_to_every_unet_parameter(preset):
    with torch.device("meta"):
        keys = list(build_unet(preset.unet).state_dict())
    for key in keys:
        assert ema_key_to_unet_key(("diffusion_model." + key).replace(".", "")) == key


# -- loading single files ------------------------------------------------------------------------------------


def test_sd1_safetensors_loads_to_identical_tensors(tmp_path, sd1):
    path = tmp_path / "sd1.safetensors"
    save_file(ldm_state_dict(TINY_SD1, *sd1), path)
    components = load_components(path)
    assert_modules_hold(components, TINY_SD1, *sd1)
    assert_same_tensors(components.schedule_buffers, schedule_buffers(TINY_SD1))
    assert not components.ema


def test_training_leftovers_and_the_old_clip_key_level_are_handled(tmp_path, sd1):
    state = ldm_state_dict(TINY_SD1, *sd1)
    # autoencoder training losses (LPIPSWithDiscriminator) kept in some fine-tuned files
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    # merges that saved CLIPTextTransformer itself: cond_stage_model.transformer.embeddings.* etc.
    clip = "cond_stage_model.transformer."
    state = {clip + k.removeprefix(clip + "text_model.") if k.startswith(clip) else k: v for k, v in state.items()}
    save_file(state, tmp_path / "merged.safetensors")
    assert_modules_hold(load_components(tmp_path / "merged.safetensors"), TINY_SD1, *sd1)


def test_sd2_safetensors_loads_to_identical_tensors(tmp_path, sd2):
    path = tmp_path / "sd2.safetensors"
    save_file(ldm_state_dict(TINY_SD2, *sd2), path)
    assert_modules_hold(load_components(path), TINY_SD2, *sd2)
    assert load_components(path, prediction="epsilon").config.prediction == "epsilon"
    with pytest.raises(InputError, match="unknown prediction type 'x0': use epsilon or v"):
        load_components(path, prediction="x0")


def test_ckpt_in_a_lightning_wrapper_loads(tmp_path, sd1):
    path = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": ldm_state_dict(TINY_SD1, *sd1), "global_step": 470000, "epoch": 6}, path)
    assert_modules_hold(load_components(path), TINY_SD1, *sd1)


def test_ema_weights_are_preferred_and_ema_only_files_load(tmp_path):
    unet, vae, text = random_modules(TINY_SD1, seed=3)
    ema_unet = randomize(build_unet(TINY_SD1.unet), seed=4)
    state = ldm_state_dict(TINY_SD1, unet, vae, text, ema_unet=ema_unet)
    save_file(state, tmp_path / "both.safetensors")
    components = load_components(tmp_path / "both.safetensors")
    assert components.ema
    assert_modules_hold(components, TINY_SD1, ema_unet, vae, text)
    ema_only = {k: v for k, v in state.items() if not k.startswith(convert.UNET_PREFIX)}
    save_file(ema_only, tmp_path / "ema_only.safetensors")
    assert_modules_hold(load_components(tmp_path / "ema_only.safetensors"), TINY_SD1, ema_unet, vae, text)


def test_fp16_file_is_upcast_exactly_or_kept_half_on_request(tmp_path, sd1):
    half = {k: v.half() if v.is_floating_point() else v for k, v in ldm_state_dict(TINY_SD1, *sd1).items()}
    path = tmp_path / "sd1-fp16.safetensors"
    save_file(half, path)
    components = load_components(path)
    unet_half = {k[len(convert.UNET_PREFIX):]: v for k, v in half.items() if k.startswith(convert.UNET_PREFIX)}
    assert_same_tensors(components.unet.state_dict(), {k: v.float() for k, v in unet_half.items()})
    kept = load_components(path, dtype=torch.float16)
    assert_same_tensors(kept.unet.state_dict(), unet_half)


def test_loaded_modules_own_the_file_tensors_without_a_copy(tmp_path, sd1):
    path = tmp_path / "sd1.safetensors"
    save_file(ldm_state_dict(TINY_SD1, *sd1), path)
    checkpoint = read_checkpoint(path)
    file_tensors = {k: v.data_ptr() for k, v in checkpoint.unet.items()}
    components = build_components(checkpoint)
    assert {k: v.data_ptr() for k, v in components.unet.state_dict().items()} == file_tensors


def test_mismatched_weights_name_the_missing_unexpected_and_misshapen_keys(tmp_path, sd1):
    state = ldm_state_dict(TINY_SD1, *sd1)
    del state["model.diffusion_model.middle_block.0.in_layers.0.bias"]
    state["model.diffusion_model.middle_block.0.extra.weight"] = torch.zeros(3)
    state["first_stage_model.encoder.norm_out.weight"] = torch.zeros(7)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as error:
        load_components(path)
    message = str(error.value)
    assert "1 missing keys (e.g. model.diffusion_model.middle_block.0.in_layers.0.bias)" in message
    assert "1 unexpected keys (e.g. model.diffusion_model.middle_block.0.extra.weight)" in message
    with pytest.raises(CheckpointError, match=r"first_stage_model.encoder.norm_out.weight is \(7,\) in the file, \(64,\)"):
        del state["model.diffusion_model.middle_block.0.extra.weight"]
        state["model.diffusion_model.middle_block.0.in_layers.0.bias"] = torch.zeros(64)
        save_file(state, path)
        load_components(path)


# -- saving -----------------------------------------------------------------------------------------------------


def test_saved_file_has_the_original_layout_and_the_config_in_its_metadata(tmp_path, sd1):
    path = save_single_file(tmp_path / "out.safetensors", TINY_SD1, *sd1, extra_metadata={"trained_by": "test"})
    tensors, metadata = read_state_dict(path)
    assert sorted(tensors) == sorted(convert.join_original(TINY_SD1, *(m.state_dict() for m in sd1)))
    assert from_json(metadata["sdlab_config"]) == TINY_SD1
    assert metadata["format"] == "pt" and metadata["trained_by"] == "test"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_narrow_model_round_trips_through_its_metadata(tmp_path):
    narrow = TINY_SD1.replace(name="narrow", unet=dataclasses.replace(TINY_SD1.unet, model_channels=64, num_heads=4),
                              resolution=256)
    modules = random_modules(narrow, seed=5)
    path = save_single_file(tmp_path / "narrow.safetensors", narrow, *modules, dtype=torch.float32)
    components = load_components(path)
    assert components.config == narrow and components.unet.config.num_heads == 4
    assert_modules_hold(components, narrow, *modules)
    tensors, _ = read_state_dict(path)
    assert detect_config(tensors).unet.num_heads == 8  # what SD1's rules would have guessed


def test_clip_text_encoder_with_a_projection_round_trips(tmp_path):
    """sdlab's contrastively trained SD1-layout text encoders keep their `text_projection` head."""
    projected = TINY_SD1.replace(name="projected", text=dataclasses.replace(TINY_SD1.text, projection_dim=32))
    modules = random_modules(projected, seed=6)
    path = save_single_file(tmp_path / "projected.safetensors", projected, *modules, dtype=torch.float32)
    components = load_components(path)
    assert components.config == projected
    assert_modules_hold(components, projected, *modules)


def test_narrow_norm_groups_round_trip_through_a_single_file_and_a_diffusers_folder(tmp_path):
    grouped = TINY_SD1.replace(name="grouped", unet=dataclasses.replace(TINY_SD1.unet, norm_groups=16),
                               vae=dataclasses.replace(TINY_SD1.vae, norm_groups=8))
    modules = random_modules(grouped, seed=7)
    path = save_single_file(tmp_path / "grouped.safetensors", grouped, *modules, dtype=torch.float32)
    components = load_components(path)
    assert components.config == grouped
    assert components.unet.out[0].num_groups == 16 and components.vae.decoder.norm_out.num_groups == 8
    configs = convert.diffusers_configs(grouped)
    assert configs["unet/config.json"]["norm_num_groups"] == 16 and configs["vae/config.json"]["norm_num_groups"] == 8
    back = convert.config_from_diffusers(configs["unet/config.json"], configs["vae/config.json"],
                                         configs["text_encoder/config.json"])
    assert back.unet.norm_groups == 16 and back.vae.norm_groups == 8


def test_a_unet_only_file_takes_vae_and_text_encoder_from_the_file_it_names(tmp_path, sd1):
    """How the bundled inpainting and upscaling models share the base model's VAE and text encoder."""
    unet, vae, text = sd1
    base = save_single_file(tmp_path / "base.safetensors", TINY_SD1, *sd1, dtype=torch.float32)
    inpainting = TINY_SD1.replace(name="inpainting", unet=dataclasses.replace(TINY_SD1.unet, in_channels=9))
    inpaint_unet = random_modules(inpainting, seed=8)[0]
    path = save_single_file(tmp_path / "inpainting.safetensors", inpainting, inpaint_unet, vae, text,
                            dtype=torch.float32, shared_parts="base.safetensors")
    tensors, metadata = read_state_dict(path)
    assert tensors and all(key.startswith("model.diffusion_model.") for key in tensors)
    assert metadata["sdlab_shared_parts"] == "base.safetensors"
    components = load_components(path)
    assert components.config == inpainting
    assert_modules_hold(components, inpainting, inpaint_unet, vae, text)
    base.unlink()
    with pytest.raises(CheckpointError, match="takes its VAE and text encoder from base.safetensors"):
        load_components(path)
    with pytest.raises(CheckpointError, match="file name in the same folder"):
        save_single_file(tmp_path / "x.safetensors", TINY_SD1, *sd1, shared_parts="../base.safetensors")


def test_metadata_that_contradicts_the_tensors_is_refused(tmp_path, sd1):
    path = save_single_file(tmp_path / "x.safetensors", TINY_SD1, *sd1)
    tensors, metadata = read_state_dict(path)
    lie = TINY_SD1.replace(unet=dataclasses.replace(TINY_SD1.unet, model_channels=64))
    save_file(tensors, tmp_path / "lie.safetensors", metadata={"sdlab_config": to_json(lie)})
    with pytest.raises(CheckpointError, match="unet.model_channels is 64 in the metadata but 32 in the weights"):
        load_components(tmp_path / "lie.safetensors")


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, sd1, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous version")

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a fi")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sdlab.checkpoint.save.save_file", write_half_then_fail)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_single_file(path, TINY_SD1, *sd1)
    assert path.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("name, message", [
    ("model.ckpt", "writes .safetensors"), ("missing/model.safetensors", "does not exist"),
])
def test_save_refuses_what_it_cannot_write(tmp_path, sd1, name, message):
    with pytest.raises(CheckpointError, match=message):
        save_single_file(tmp_path / name, TINY_SD1, *sd1)


# -- the ldm config YAML beside a single file (the SD web UI's model.yaml) ---------------------------------------

# SD1's layout built with 4 attention heads where SD1's rule says 8: nothing in the weights shows it.
FOUR_HEADS = TINY_SD1.replace(unet=dataclasses.replace(TINY_SD1.unet, num_heads=4))


def write_yaml(path: Path, document: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(document))
    return path


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, TINY_SD1.unet.context_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), context)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_yaml_beside_the_file_gives_the_heads_the_weights_cannot_show(tmp_path, suffix):
    import sdlab

    modules = random_modules(FOUR_HEADS, seed=9)
    with torch.no_grad():  # trained models attend sharply; N(0, 0.05^2) queries and keys attend almost uniformly,
        for name, param in modules[0].named_parameters():  # where the number of heads hardly shows
            if name.endswith(("to_q.weight", "to_k.weight")):
                param.mul_(20)
    path = tmp_path / f"four-heads{suffix}"
    state = ldm_state_dict(FOUR_HEADS, *modules)
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    guessed = load_components(path)
    assert guessed.config.unet.num_heads == 8
    assert (unet_output(guessed.unet) - unet_output(modules[0])).abs().max() > 1e-3

    (tmp_path / "four-heads.yaml").write_text(ldm_yaml(FOUR_HEADS))
    components = load_components(path)
    assert components.config == FOUR_HEADS
    assert_modules_hold(components, FOUR_HEADS, *modules)
    torch.testing.assert_close(unet_output(components.unet), unet_output(modules[0]))  # float32 rounding only
    assert sdlab.load(str(path)).config.unet.num_heads == 4  # what `sdlab --model four-heads.safetensors` loads


def test_yaml_wins_over_the_metadata_sdlab_writes(tmp_path, sd1):
    path = save_single_file(tmp_path / "model.safetensors", TINY_SD1, *sd1)
    document = ldm_document(TINY_SD1.replace(unet=dataclasses.replace(TINY_SD1.unet, head_channels=16)))
    write_yaml(tmp_path / "model.yaml", document)
    unet = load_components(path).config.unet
    assert (unet.head_channels, unet.heads_at(64)) == (16, (4, 16))  # num_head_channels decides, as in ldm
    document["model"]["params"]["unet_config"]["params"].update(num_heads=2, num_head_channels=-1)
    write_yaml(tmp_path / "model.yaml", document)
    unet = load_components(path).config.unet
    assert (unet.num_heads, unet.head_channels) == (2, None)


def test_yaml_parameterization_sets_the_prediction_unless_the_caller_names_one(tmp_path, sd1, sd2):
    save_file(ldm_state_dict(TINY_SD1, *sd1), tmp_path / "sd1-v.safetensors")
    write_yaml(tmp_path / "sd1-v.yaml", ldm_document(TINY_SD1.replace(prediction="v")))
    assert load_components(tmp_path / "sd1-v.safetensors").config == TINY_SD1.replace(prediction="v")
    assert load_components(tmp_path / "sd1-v.safetensors", prediction="epsilon").config.prediction == "epsilon"
    # Stability's v2-inference.yaml for the 512 px SD2 base models states no parameterization: ldm's eps
    save_file(ldm_state_dict(TINY_SD2, *sd2), tmp_path / "sd2-base.safetensors")
    document = ldm_document(TINY_SD2)
    del document["model"]["params"]["parameterization"]
    write_yaml(tmp_path / "sd2-base.yaml", document)
    assert load_components(tmp_path / "sd2-base.safetensors").config == TINY_SD2.replace(
        prediction="epsilon", resolution=512, name="sd2-base")
    assert load_components(tmp_path / "sd2-base.safetensors", prediction="v").config == TINY_SD2


def test_yaml_schedule_and_scale_factor_are_read(tmp_path, sd1):
    # a file without ldm's schedule buffers (pruned by some merge tools): only the YAML knows the schedule
    state = {k: v for k, v in ldm_state_dict(TINY_SD1, *sd1).items() if k not in SCHEDULE_BUFFERS}
    path = tmp_path / "pruned.safetensors"
    save_file(state, path)
    document = ldm_document(TINY_SD1)
    document["model"]["params"].update(linear_start="1e-4", linear_end=0.02, timesteps=1000, scale_factor=0.13025)
    write_yaml(tmp_path / "pruned.yaml", document)  # "1e-4": PyYAML reads it as a string, OmegaConf as a number
    config = load_components(path).config
    assert config.schedule == ScheduleConfig(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02)
    assert config.vae.scaling_factor == 0.13025
    # ldm's scale_by_std stores the estimated factor as a buffer; the YAML's number was only where it started
    save_file({**state, "scale_factor": torch.tensor(0.2)}, path)
    assert load_components(path).config.vae.scaling_factor == pytest.approx(0.2)
    # the file's betas buffer is the schedule it was trained with: a YAML saying otherwise is refused
    save_file(ldm_state_dict(TINY_SD1, *sd1), path)
    with pytest.raises(CheckpointError, match=r"schedule .* is 0.0001..0.02 over 1000 steps there but "
                                              r"0.00085..0.012 over 1000 steps by its betas buffer in pruned"):
        load_components(path)


# Stability's configs/stable-diffusion/x4-upscaling.yaml, the fields sdlab reads or checks.
X4_UPSCALING_YAML = {"model": {"target": "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion", "params": {
    "parameterization": "v", "linear_start": 0.0001, "linear_end": 0.02, "timesteps": 1000, "scale_factor": 0.08333,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "num_classes": 1000, "image_size": 128, "in_channels": 7, "out_channels": 4, "model_channels": 256,
        "attention_resolutions": [2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4],
        "disable_self_attentions": [True, True, True, False], "num_heads": 8, "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": 1024, "legacy": False, "use_linear_in_transformer": True}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                          "params": {"freeze": True, "layer": "penultimate"}},
}}}


@pytest.mark.parametrize("name", ["sd1", "sd2", "x4"])
def test_the_published_configs_describe_the_presets(name):
    from sdlab.checkpoint.ldm_yaml import apply_sidecar, parse_sidecar
    from sdlab.pipelines.upscale import X4_UPSCALER

    preset, document = {"sd1": (SD1, ldm_document(SD1)), "sd2": (SD2, ldm_document(SD2)),
                        "x4": (X4_UPSCALER, X4_UPSCALING_YAML)}[name]
    sidecar = parse_sidecar(document, Path(f"{name}.yaml"))
    assert sidecar.prediction == preset.prediction
    assert apply_sidecar(preset, sidecar, {}) == preset


def _unet_params(document):
    return document["model"]["params"]["unet_config"]["params"]


@pytest.mark.parametrize("change, message", [
    (lambda d: _unet_params(d).update(model_channels=64), "unet_config model_channels is 64 there but 32"),
    (lambda d: _unet_params(d).update(context_dim=1024), "unet_config context_dim is 1024 there but 64"),
    (lambda d: _unet_params(d).update(in_channels=9), "unet_config in_channels is 9 there but 4"),
    (lambda d: _unet_params(d).update(channel_mult=[1, 2, 4]), r"unet_config channel_mult is \[1, 2, 4\] there but \[1, 2, 2\]"),
    (lambda d: _unet_params(d).update(attention_resolutions=[4, 2, 1]), r"unet_config attention_resolutions is \[1, 2, 4\] there but \[1, 2\]"),
    (lambda d: _unet_params(d).update(use_linear_in_transformer=True), "unet_config use_linear_in_transformer is True there but False"),
    (lambda d: d["model"]["params"]["first_stage_config"]["params"]["ddconfig"].update(ch=128),
     "first_stage_config ddconfig ch is 128 there but 32"),
    (lambda d: d["model"]["params"]["cond_stage_config"].update(
        target="ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"),
     "cond_stage_config target FrozenOpenCLIPEmbedder is open_clip there but clip"),
])
def test_yaml_that_contradicts_the_weights_is_refused(tmp_path, sd1, change, message):
    save_file(ldm_state_dict(TINY_SD1, *sd1), tmp_path / "model.safetensors")
    document = ldm_document(TINY_SD1)
    change(document)
    write_yaml(tmp_path / "model.yaml", document)
    with pytest.raises(CheckpointError, match="model.yaml contradicts the weights: " + message) as error:
        load_components(tmp_path / "model.safetensors")
    assert "in model.safetensors" in str(error.value) and "fix or delete this YAML" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("model:\n  params: [unclosed\n", r"not valid YAML \(line 3: "),
    ("model:\n\tparams: {}\n", "not valid YAML"),
    ("", "not an ldm model config"),
    ("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n", "no 'model params:' section"),
    ("model:\n  params:\n    parameterization: x0\n", "parameterization 'x0' is not one sdlab samples with"),
    ("model:\n  params:\n    beta_schedule: cosine\n", "beta_schedule 'cosine' is not SD's"),
    ("model:\n  params:\n    linear_end: high\n", "linear_end must be a number, got 'high'"),
    ("model:\n  params:\n    unet_config:\n      params:\n        num_heads: eight\n",
     "unet_config num_heads must be a positive integer, got 'eight'"),
    ("model:\n  params:\n    unet_config:\n      params:\n        num_heads: 3\n",
     "unet_config num_heads 3 does not divide the 32 channels"),
])
def test_malformed_yaml_is_refused_in_one_line(tmp_path, sd1, text, message):
    save_file(ldm_state_dict(TINY_SD1, *sd1), tmp_path / "model.safetensors")
    (tmp_path / "model.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=message) as error:
        load_components(tmp_path / "model.safetensors")
    assert str(error.value).startswith(str(tmp_path / "model.yaml"))
    assert "fix or delete this YAML" in str(error.value) and "\n" not in str(error.value)


def test_only_the_yaml_named_like_the_checkpoint_is_read(tmp_path, sd1):
    """The web UI's rule: `<path without extension>.yaml`. A diffusers folder has its own configs."""
    save_file(ldm_state_dict(TINY_SD1, *sd1), tmp_path / "model.fp16.safetensors")
    (tmp_path / "model.yaml").write_text("not: [valid")
    (tmp_path / "model.fp16.yml").write_text("not: [valid")
    assert load_components(tmp_path / "model.fp16.safetensors").config == TINY_SD1
    folder = write_diffusers_configs(tmp_path / "folder", TINY_SD1)
    parts = convert.original_to_diffusers(ldm_state_dict(TINY_SD1, *sd1), TINY_SD1)
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        save_file({k: v.contiguous() for k, v in parts[part].items()}, folder / part / f"{name}.safetensors")
    write_yaml(tmp_path / "folder.yaml", ldm_document(FOUR_HEADS.replace(prediction="v")))
    (folder / "model.yaml").write_text("not: [valid")
    assert load_components(folder).config == TINY_SD1


# -- interoperability with diffusers ------------------------------------------------------------------------------


def _strip_text_model(state_dict):
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


@pytest.mark.parametrize("config_name", ["sd1", "sd2"])
def test_sdlab_file_loads_in_diffusers_from_single_file(tmp_path, offline, sd1, sd2, config_name):
    from diffusers import StableDiffusionPipeline

    config, modules = (TINY_SD1, sd1) if config_name == "sd1" else (TINY_SD2, sd2)
    path = save_single_file(tmp_path / "model.safetensors", config, *modules)
    config_dir = write_diffusers_configs(tmp_path / "configs", config)
    yaml_path = tmp_path / "model.yaml"
    yaml_path.write_text(ldm_yaml(config))
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_dir), original_config=str(yaml_path), local_files_only=True,
        safety_checker=None, requires_safety_checker=False)
    ours = convert.original_to_diffusers(read_state_dict(path)[0], config)
    assert_same_tensors(pipe.unet.state_dict(), ours["unet"])
    assert_same_tensors(pipe.vae.state_dict(), ours["vae"])
    assert_same_tensors(_strip_text_model(pipe.text_encoder.state_dict()), _strip_text_model(ours["text_encoder"]))
    expected_prediction = "v_prediction" if config.prediction == "v" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected_prediction


def _diffusers_models(config: ModelConfig, seed: int):
    """Random diffusers UNet, VAE and transformers CLIPTextModel of `config`'s shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = convert.diffusers_configs(config)
    torch.manual_seed(seed)
    unet = randomize(UNet2DConditionModel.from_config(configs["unet/config.json"]), seed)
    vae = randomize(AutoencoderKL.from_config(configs["vae/config.json"]), seed + 1)
    text = randomize(CLIPTextModel(CLIPTextConfig(**configs["text_encoder/config.json"])), seed + 2)
    return unet, vae, text


@pytest.mark.parametrize("config_name", ["sd1", "sd2"])
def test_diffusers_folder_loads_in_sdlab(tmp_path, offline, config_name):
    config = TINY_SD1 if config_name == "sd1" else TINY_SD2
    unet, vae, text = _diffusers_models(config, seed=6)
    folder = write_diffusers_configs(tmp_path / "folder", config)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    components = load_components(folder)
    assert components.config == config
    expected = convert.diffusers_to_original(unet.state_dict(), vae.state_dict(), text.state_dict(), config)
    parts = convert.split_original(expected, config)
    assert_same_tensors(components.unet.state_dict(), parts["unet"])
    assert_same_tensors(components.vae.state_dict(), parts["vae"])
    assert_same_tensors(components.text_encoder.state_dict(), parts["text_encoder"])
    assert load_components(folder, prediction="epsilon").config.prediction == "epsilon"


def test_diffusers_weights_in_the_single_file_layout_load_identically(tmp_path):
    unet, vae, text = _diffusers_models(TINY_SD1, seed=7)
    state = convert.diffusers_to_original(unet.state_dict(), vae.state_dict(), text.state_dict(), TINY_SD1)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "converted.safetensors")
    components = load_components(tmp_path / "converted.safetensors")
    assert components.config == TINY_SD1
    ours = convert.original_to_diffusers(
        convert.join_original(TINY_SD1, *(m.state_dict() for m in (components.unet, components.vae,
                                                                     components.text_encoder))), TINY_SD1)
    assert_same_tensors(ours["unet"], unet.state_dict())
    assert_same_tensors(ours["vae"], vae.state_dict())
    assert_same_tensors(_strip_text_model(ours["text_encoder"]), text.state_dict())


# -- full size ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_sd15_saves_and_loads_with_every_shape(tmp_path):
    """SD 1.5's 1.07 B parameters written as fp16 (2.1 GB) and loaded back as fp32 (4.3 GB).

    The weights are slices of one random pool at random offsets: random enough that a misplaced
    tensor shows, and much faster than drawing a billion numbers on a small CPU.
    """
    with torch.device("meta"):
        modules = [build_unet(SD1.unet).half(), build_vae(SD1.vae).half(), build_text_encoder(SD1.text).half()]
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 20, generator=generator).half().view(torch.int16)  # CPU copies fp16 bits faster as int16
    for module in modules:
        module.to_empty(device="cpu")
        for tensor in module.state_dict().values():
            flat, done = tensor.view(-1).view(torch.int16), 0
            start = int(torch.randint(len(pool), (1,), generator=generator))
            while done < len(flat):
                take = min(len(flat) - done, len(pool) - start)
                flat[done:done + take] = pool[start:start + take]
                done, start = done + take, 0
    written = convert.join_original(SD1, *(m.state_dict() for m in modules))
    shapes = {k: v.shape for k, v in written.items()}
    probes = {k: written[k].clone() for k in ("model.diffusion_model.output_blocks.11.1.proj_out.weight",
                                               "first_stage_model.decoder.conv_out.weight",
                                               "cond_stage_model.transformer.text_model.final_layer_norm.weight")}
    path = save_single_file(tmp_path / "sd15.safetensors", SD1, *modules)
    del modules, written
    tensors, _ = read_state_dict(path)
    assert {k: v.shape for k, v in tensors.items()} == shapes
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert detect_config(tensors) == SD1  # the shapes alone, without the metadata
    del tensors
    components = load_components(path)
    assert components.config == SD1
    loaded = convert.join_original(SD1, components.unet.state_dict(), components.vae.state_dict(),
                                   components.text_encoder.state_dict())
    assert {k: v.shape for k, v in loaded.items()} == shapes
    assert all(v.dtype == torch.float32 for v in loaded.values())
    for key, value in probes.items():
        assert torch.equal(loaded[key], value.float()), key
