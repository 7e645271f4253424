"""Training recipes: TOML read into checked dataclasses, flags on top, one clear error per mistake."""

import argparse
import json
import math
import re
import shlex
from pathlib import Path

import pytest

from sdlab.config import SD1, SD2_BASE, ModelConfig, to_json
import sdlab.shapes  # noqa: F401  the shipped recipes' [shapes] sections and `sdlab train dpo`
from sdlab.errors import ConfigError
from sdlab.cli import train as cli
from sdlab.training.config import (
    TextOptions, UNetOptions, VAEOptions, build_config, load_config, parse_assignment, resolve_model_config,
)
from sdlab.training.loop import ema_decay_at, learning_rate
from sdlab.training.recipe_file import recipe_toml, settings_summary

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def parse_flags(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_train_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_a_recipe_is_read_into_typed_fields_and_its_trainer_section(tmp_path):
    path = write(tmp_path, """
        data = "shapes"
        steps = 300
        batch_size = 16
        lr = 1            # an integer where a float is expected is fine
        crop = "random"
        [unet]
        min_snr_gamma = 5
        validation_prompts = ["a large red circle on the left"]
    """)
    config = load_config("unet", path)
    assert (config.trainer, config.steps, config.batch_size, config.crop) == ("unet", 300, 16, "random")
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.options == UNetOptions(min_snr_gamma=5.0, validation_prompts=("a large red circle on the left",))
    assert config.out_dir == "runs/unet"


def test_every_trainer_has_its_own_options_with_defaults():
    assert build_config("vae", {}).options == VAEOptions()
    assert build_config("text", {}).options == TextOptions()
    assert build_config("unet", {}).options == UNetOptions()
    assert VAEOptions().kl_weight == 1e-6  # latent diffusion's kl-f8 weight
    assert UNetOptions().caption_dropout == 0.1


@pytest.mark.parametrize("text, key", [
    ("stepz = 10", "stepz"),
    ("[vae]\nkl_wieght = 1e-6", "vae.kl_wieght"),
    ("[model.vae]\nwidth = 3", "model.vae.width"),
])
def test_an_unknown_key_is_one_error_naming_it(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config("vae", write(tmp_path, text))


@pytest.mark.parametrize("text, message", [
    ('steps = "100"', r"'steps' must be an integer, got '100' \(str\)"),
    ("steps = 1.5", "'steps' must be an integer"),
    ("flip = 1", "'flip' must be true or false"),
    ("batch_size = true", "'batch_size' must be an integer"),
    ('precision = "fp8"', "'precision' must be one of 'auto', 'fp32', 'bf16', 'fp16'"),
    ("[unet]\ncaption_dropout = \"often\"", "'unet.caption_dropout' must be a number"),
    ("[model.unet]\nmodel_channels = \"32\"", "'model.unet.model_channels' must be an integer"),
    ("[model]\nprediction = \"x0\"", "'model.prediction' must be one of 'epsilon', 'v'"),
    ("[model.unet]\nchannel_mult = [1, 2.5]", "'model.unet.channel_mult' must be a list of integers"),
    ("[unet]\nvalidation_prompts = [1, 2]", "'unet.validation_prompts' must be a list of strings, got \\[1, 2\\]"),
])
def test_a_value_of_the_wrong_type_is_one_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config("unet", write(tmp_path, text))


@pytest.mark.parametrize("values, message", [
    ({"steps": 0}, "'steps' must be at least 1"),
    ({"batch_size": 6, "grad_accum": 4}, "batch_size 6 must be a multiple of grad_accum 4"),
    ({"lr": -1.0}, "'lr' must be positive"),
    ({"ema_decay": 1.0}, r"'ema_decay' must be in \[0, 1\)"),
    ({"vae": {}}, r"the \[vae\] section belongs to `sdlab train vae`"),
    ({"trainer": "vae"}, "a recipe for `sdlab train vae`, not `sdlab train unet`"),
    ({"shapes": {"single_object_fraction": 1.5}}, r"'shapes.single_object_fraction' must be in \[0, 1\]"),
    ({"shapes": {"single_object_fraction": 0.5}, "data": "photos"}, "'shapes.single_object_fraction' is for the shapes data"),
    ({"unet": {"train_text_encoder": True, "text_encoder_lr": 0.0}}, "'unet.text_encoder_lr' must be positive"),
    ({"unet": {"clean_error_weight_cap": 0.5}}, "'unet.clean_error_weight_cap' must be at least 1"),
])
def test_values_out_of_range_are_refused_before_training(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config("unet", values)


def test_invalid_toml_says_so(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("vae", write(tmp_path, "steps = = 3"))
    with pytest.raises(ConfigError, match="training config not found"):
        load_config("vae", str(tmp_path / "missing.toml"))


def test_command_line_flags_override_the_file_and_set_reaches_any_key(tmp_path):
    path = write(tmp_path, "steps = 100\nlr = 1e-4\nseed = 3\n[vae]\nkl_weight = 1e-6\n")
    args = parse_flags(["train", "vae", "--config", path, "--steps", "7", "--grad-checkpointing",
                        "--set", "vae.kl_weight=1e-5", "--set", "crop=random"])
    config = cli.config_from_args(args)
    assert config.steps == 7  # the flag wins
    assert config.lr == 1e-4 and config.seed == 3  # the file's, where no flag is given
    assert config.gradient_checkpointing is True
    assert config.options.kl_weight == 1e-5 and config.crop == "random"
    assert not parse_flags(["train", "vae"]).resume


def test_set_reads_values_as_toml_and_refuses_a_missing_equals_sign():
    assert parse_assignment("unet.min_snr_gamma=5") == ("unet.min_snr_gamma", 5)
    assert parse_assignment("data=/some/folder") == ("data", "/some/folder")
    assert parse_assignment("flip=true") == ("flip", True)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("flip")


def test_model_config_from_a_preset_a_file_or_a_table_of_changes(tmp_path):
    assert resolve_model_config("sd2-base") == SD2_BASE
    json_path = write(tmp_path, to_json(SD1.replace(resolution=256)), "model.json")
    assert resolve_model_config(json_path) == SD1.replace(resolution=256)
    changed = resolve_model_config({"resolution": 64, "unet": {"model_channels": 32}})
    assert changed.resolution == 64 and changed.unet.model_channels == 32
    assert changed.unet.channel_mult == SD1.unet.channel_mult  # untouched keys keep sd1's values
    base = ModelConfig(name="mine", resolution=128)
    assert resolve_model_config({"vae": {"ch": 64}}, over=base).resolution == 128
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_model_config("sd9")
    with pytest.raises(ConfigError, match="unknown UNetConfig fields: widht"):
        resolve_model_config({"unet": {"widht": 3}})


def test_a_model_file_named_in_a_recipe_is_found_beside_it(tmp_path):
    (tmp_path / "family.json").write_text(json.dumps({"resolution": 48}))
    config = load_config("vae", write(tmp_path, 'model = "family.json"'))
    assert resolve_model_config(config.model).resolution == 48


@pytest.mark.parametrize("trainer, recipe", [("vae", "vae"), ("text", "text"), ("unet", "unet"), ("unet", "unet-text"),
                                             ("unet", "relation"), ("unet", "relation-repair"),
                                             ("unet", "relation-mirror"), ("vae", "vae-decoder"),
                                             ("inpaint", "inpaint-objects"), ("dpo", "dpo"), ("unet", "buckets-2"),
                                             ("unet", "grounding"), ("inpaint", "inpaint-buckets")])
def test_the_shipped_recipes_load(trainer, recipe):
    config = load_config(trainer, str(RECIPES / f"shapes-{recipe}.toml"))
    if config.model is None:  # the model is --base's: a fine-tune, or an inpainting UNet grown from it
        assert config.init_from_base or trainer == "inpaint"
    else:
        model = resolve_model_config(config.model)
        assert model.unet.context_dim == model.text.width
    assert load_config(trainer, str(RECIPES / "tiny.toml")).resolution == 32


def test_every_stage_of_the_bundled_models_script_is_a_valid_recipe():
    """scripts/train_bundled.sh's `stage NAME TRAINER RECIPE [--base FILE] [--set KEY=VALUE ...]` lines,
    with their overrides, load; the relation runs take their steps and schedules from them."""
    script = (RECIPES.parent / "scripts" / "train_bundled.sh").read_text().replace("\\\n", " ")
    stages = {}
    for line in script.splitlines():
        if not line.startswith("stage "):
            continue
        _, name, trainer, recipe, *rest = shlex.split(line)
        overrides = dict(cli.parse_assignment(value) for flag, value in zip(rest, rest[1:]) if flag == "--set")
        stages[name] = load_config(trainer, str(RECIPES.parent / recipe), overrides)
    assert list(stages) == ["vae", "text", "unet", "unet-text", "relation-a", "relation-b", "relation-c",
                            "relation-repair", "relation-mirror", "relation-mirror-2", "vae-decoder", "dpo", "dpo-2", "inpaint",
                            "inpaint-objects", "inpaint-objects-2", "inpaint-objects-3", "upscale", "buckets-2"]
    assert stages["buckets-2"].buckets and stages["buckets-2"].resolution_bucket_fraction == 0.5
    first = stages["relation-a"]
    assert (first.steps, first.lr_schedule_steps, first.ema_decay) == (750, 2000, 0)
    assert first.sections["shapes"].relation_contrast_min_timestep == 0
    assert stages["relation-c"].sections["shapes"].relation_contrast_min_timestep == 850
    assert not stages["relation-repair"].options.train_text_encoder
    mirror = stages["relation-mirror"].options  # the inpainter and upscaler share the repair's text encoder
    assert not mirror.train_text_encoder and stages["relation-mirror"].sections["shapes"].relation_mirror_denoising > 0
    decoder = stages["vae-decoder"]  # after every UNet stage, and it must not move their latent space
    assert decoder.options.train_decoder_only and decoder.init_from_base
    preference = stages["dpo"]  # from the last full model: its pictures are judged through the final decoder
    assert preference.init_from_base and preference.options.samples_per_caption >= 2 and preference.data == "shapes"
    assert stages["dpo-2"].seed != preference.seed  # the second round draws other captions
    assert [stages[f"inpaint-objects{n}"].sections["shapes"].object_masks for n in ("", "-2", "-3")] == [0.5, 0.7, 0.7]


def test_learning_rate_warms_up_linearly_then_holds_or_follows_a_half_cosine():
    constant = build_config("vae", {"lr": 1.0, "warmup_steps": 4, "steps": 10})
    assert [learning_rate(s, constant) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = constant.replace(lr_schedule="cosine")
    assert learning_rate(4, cosine) == 1.0
    assert learning_rate(7, cosine) == pytest.approx(0.5)
    assert learning_rate(10, cosine) == pytest.approx(0.0)
    first_part = cosine.replace(steps=7, lr_schedule_steps=10)  # the first 7 steps of the same schedule
    assert [learning_rate(s, first_part) for s in range(7)] == [learning_rate(s, cosine) for s in range(7)]


def test_a_schedule_shorter_than_the_run_is_refused():
    with pytest.raises(ConfigError, match="'lr_schedule_steps' \\(5\\) must be at least 'steps' \\(10\\)"):
        build_config("vae", {"steps": 10, "lr_schedule_steps": 5})


def test_ema_decay_warms_up_from_the_first_steps():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**7, 0.9999) == 0.9999
    assert math.isclose(ema_decay_at(10**7, 0.5), 0.5)


def test_the_cli_prints_one_line_and_exits_2_on_a_recipe_error(tmp_path, capsys):
    path = write(tmp_path, "stepz = 3")
    assert cli.main(["vae", "--config", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'stepz'" in err



@pytest.mark.parametrize("trainer", ["lora", "textual-inversion", "dreambooth", "dpo"])
def test_a_fine_tuner_without_base_takes_the_bundled_model(trainer):
    from sdlab.bundled import BUNDLED_MODEL

    assert load_config(trainer).base == BUNDLED_MODEL
    assert load_config(trainer, overrides={"base": "mine.safetensors"}).base == "mine.safetensors"


@pytest.mark.parametrize("trainer", ["vae", "text", "unet", "inpaint", "upscale", "lora", "dpo"])
def test_bundled_names_the_bundled_model_for_every_trainer_and_demo_is_refused(trainer):
    from sdlab.bundled import BUNDLED_MODEL

    assert load_config(trainer, overrides={"base": "bundled"}).base == BUNDLED_MODEL
    with pytest.raises(ConfigError, match="'demo' is not a base to train on: its weights are random"):
        load_config(trainer, overrides={"base": "demo"})


def test_the_parts_trainers_have_no_base_unless_given():
    assert load_config("vae").base is None and load_config("unet").base is None


def test_without_the_bundled_model_installed_no_base_stays_unset_and_bundled_says_so(monkeypatch, tmp_path):
    import sdlab.bundled

    monkeypatch.setattr(sdlab.bundled, "BUNDLED_MODEL", str(tmp_path / "absent.safetensors"))
    assert load_config("lora").base is None  # the trainer then says it needs --base
    with pytest.raises(ConfigError, match="--base bundled: the bundled model is not installed"):
        load_config("unet", overrides={"base": "bundled"})


def test_lora_and_textual_inversion_flags_are_their_recipe_keys():
    config = cli.config_from_args(parse_flags(["train", "lora", "--rank", "8", "--alpha", "2", "--dropout", "0.25"]))
    assert (config.options.rank, config.options.alpha, config.options.dropout) == (8, 2.0, 0.25)
    config = cli.config_from_args(parse_flags(["train", "textual-inversion", "--token", "my-cat", "--init-word", "cat",
                                               "--vectors", "3"]))
    assert (config.options.token, config.options.init_word, config.options.vectors) == ("my-cat", "cat", 3)
    # not given: the recipe's value stays (a flag is an override, as --set is)
    config = cli.config_from_args(parse_flags(["train", "lora", "--set", "lora.rank=16"]))
    assert config.options.rank == 16 and config.options.alpha == 4.0
    with pytest.raises(SystemExit):
        parse_flags(["train", "unet", "--rank", "8"])  # each trainer takes only its own


def test_the_bucket_flags_are_their_recipe_keys():
    config = cli.config_from_args(parse_flags(["train", "lora", "--buckets", "--min-bucket-reso", "64",
                                               "--max-bucket-reso", "128"]))
    assert (config.buckets, config.min_bucket_reso, config.max_bucket_reso) == (True, 64, 128)
    assert cli.config_from_args(parse_flags(["train", "lora"])).buckets is False


def help_entries(capsys, trainer: str) -> dict[str, str]:
    """`sdlab train TRAINER --help`'s options, each flag with its help text on one line."""
    with pytest.raises(SystemExit):
        parse_flags(["train", trainer, "--help"])
    options = capsys.readouterr().out.split("\noptions:\n")[1]
    entries = {}
    for line in options.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        else:
            entries[flag] += " " + line.strip()
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


@pytest.mark.parametrize("trainer", ["vae", "text", "unet", "lora", "textual-inversion", "dreambooth", "inpaint",
                                     "upscale", "dpo"])
def test_every_training_option_shows_its_default_in_help(capsys, trainer):
    entries = help_entries(capsys, trainer)
    assert [flag for flag, text in entries.items() if flag != "-h" and "default" not in text] == []
    assert "(default: 1000)" in entries["--steps"] and "(default: 0.0001)" in entries["--lr"]
    if trainer == "lora":
        assert "(default: 4)" in entries["--rank"] and "(default: 4.0)" in entries["--alpha"]
        assert "(default: 0.0)" in entries["--dropout"]
    if trainer == "textual-inversion":
        assert "(default: my-concept)" in entries["--token"] and "(default: object)" in entries["--init-word"]
        assert "(default: 1)" in entries["--vectors"]
    assert "'bundled'" in entries["--base"]
    if trainer in ("lora", "textual-inversion", "dreambooth", "dpo"):
        assert "(default: bundled)" in entries["--base"]


def read_back(tmp_path, config):
    path = tmp_path / "config.toml"
    path.write_text(recipe_toml(config), encoding="utf-8")
    return load_config(config.trainer, str(path))


@pytest.mark.parametrize("trainer, recipe", [("vae", "vae"), ("unet", "relation"), ("inpaint", "inpaint-objects"),
                                             ("dpo", "dpo"), ("unet", "tiny"), ("unet", "buckets-3")])
def test_the_written_settings_read_back_to_the_same_recipe(tmp_path, trainer, recipe):
    name = "tiny.toml" if recipe == "tiny" else f"shapes-{recipe}.toml"
    config = load_config(trainer, str(RECIPES / name), {"base": "bundled"})
    assert read_back(tmp_path, config) == config


def test_every_value_type_survives_the_written_settings(tmp_path):
    config = load_config("textual-inversion", overrides={
        "textual_inversion.token": 'a "quoted" \\ token\twith\ncontrol',
        "textual_inversion.validation_prompts": ["one, {}", "ünïcode"], "lr": 1e-6, "steps": 3, "flip": True,
        "model": {"resolution": 64, "unet": {"channel_mult": [1, 2]}}, "out": "runs/my run", "ema_decay": 0.0})
    assert read_back(tmp_path, config) == config
    config = load_config("lora", overrides={"lora.min_snr_gamma": 5, "lora.unet_modules": ["to_q"],
                                            "lora.dropout": 0.1, "base": "some file.safetensors"})
    text = recipe_toml(config)
    assert "\n[lora]\n" in text and "min_snr_gamma = 5.0" in text and 'trainer = "lora"' in text
    assert not re.search(r"^resolution =", text, re.MULTILINE)  # unset: left out, which reads back as unset
    assert read_back(tmp_path, config) == config
    with pytest.raises(ConfigError, match="recipe for `sdlab train lora`"):
        load_config("unet", str(tmp_path / "config.toml"))


def test_the_settings_summary_names_every_table(tmp_path):
    config = load_config("unet", str(RECIPES / "shapes-relation.toml"), {"base": "bundled"})
    summary = settings_summary(config)
    assert summary.startswith("sdlab: train unet with these settings:\n  data=\"shapes\"")
    assert "\n  [unet] caption_dropout=0.1" in summary and "\n  [shapes] " in summary
    assert len(summary.splitlines()) < 25
