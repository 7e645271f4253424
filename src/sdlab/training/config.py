"""Training recipes: a dataclass of knobs shared by every trainer plus one small dataclass per trainer,
read from a TOML file and checked before anything runs.

    # recipes/shapes-unet.toml
    data = "shapes"
    steps = 20000
    batch_size = 64          # the GLOBAL batch: split over ranks and gradient-accumulation micro-batches
    lr = 1e-4
    model = "recipes/shapes-model.json"   # a preset name, a ModelConfig JSON file, or a [model] table

    [unet]                   # the section named after the trainer
    min_snr_gamma = 5.0

Precedence, lowest first: dataclass defaults, the TOML file, command-line flags. An unknown key or a
value of the wrong type stops the run at once with one ConfigError that names the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from ..config import (
    PRESETS, SD1, ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig, from_dict, to_dict,
)
from ..errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package
    import tomli as tomllib


@dataclass(frozen=True)
class VAEOptions:
    """`sdlab train vae`: the KL autoencoder of latent diffusion (Rombach et al. 2022, appendix G)."""

    l1_weight: float = 1.0  # reconstruction |x - x̂|, per pixel (ldm's rec_loss)
    l2_weight: float = 0.0  # (x - x̂)^2, per pixel
    # ldm's kl-f8 weight 1e-6 is on per-sample *sums*; our losses are per-pixel means, so the KL sum is
    # divided by the pixel count to keep the same balance.
    kl_weight: float = 1e-6
    # Start log-variance of a fresh encoder (the bias of quant_conv's log-variance half); unset: PyTorch's
    # default init, posterior std ~1. With kl_weight 1e-6 the posterior ends nearly deterministic anyway;
    # starting there keeps early posterior noise from drowning what the decoder must learn (e.g. colours).
    initial_logvar: Optional[float] = None
    disc_start: Optional[int] = None  # step from which the PatchGAN loss is on (ldm kl-f8: 50001); unset: never
    disc_weight: float = 0.5  # ldm's disc_weight, times the adaptive weight
    disc_channels: int = 64  # width of the PatchGAN's first layer
    disc_layers: int = 3  # strided layers: receptive field 70 px at 3 (Isola et al. 2017)
    scale_batches: int = 4  # batches whose latents give the scaling factor 1 / std
    # Fine-tune the decoder alone (needs init_from_base): the encoder, its quant_conv and the scaling
    # factor stay --base's, so the latent space, and every UNet trained in it, stays valid; what changes
    # is how latents become pixels (Stability's sd-vae-ft-mse was made this way from SD's own VAE).
    train_decoder_only: bool = False


@dataclass(frozen=True)
class TextOptions:
    """`sdlab train text`: CLIP-style contrastive pre-training of the text tower (Radford et al. 2021)."""

    image_channels: int = 32  # width of the image tower's first stage; doubles at every stage
    image_stages: int = 4  # stride-2 stages before the pooled projection


@dataclass(frozen=True)
class UNetOptions:
    """`sdlab train unet`: the denoiser on a frozen VAE and text encoder."""

    caption_dropout: float = 0.1  # fraction trained with the empty caption, for classifier-free guidance
    min_snr_gamma: Optional[float] = None  # Min-SNR-gamma loss weights (Hang et al. 2023; 5.0 there); unset: plain MSE
    # The error in the clean latents counts at least once in every sample's loss, the noise error's weight
    # growing by up to this factor where that takes it (SNR < 1). Epsilon-MSE weighs the clean latents'
    # error by SNR, 0.005 at the noisiest step, where samplers decide the layout. Unset: the MSE (and
    # Min-SNR weights) alone.
    clean_error_weight_cap: Optional[float] = None
    validation_prompts: tuple[str, ...] = ()  # empty: the captions of the validation batch
    validation_sampler: str = "Euler"
    validation_steps: int = 20
    validation_guidance: float = 5.0
    # Also train the text encoder's transformer on the diffusion loss (its token table stays frozen);
    # the saved file then holds the trained text encoder (EMA-averaged with the UNet).
    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = None  # peak learning rate of the text encoder; unset: the run's `lr`


@dataclass(frozen=True)
class LoraOptions:
    """`sdlab train lora`: low-rank adapters on a frozen --base (Hu et al. 2021), saved as a kohya LoRA."""

    rank: int = 4  # r: the inner width of up @ down
    alpha: float = 4.0  # the update is scaled by alpha / rank (kohya's network_alpha)
    # Probability of leaving out each of the rank components of the update in a training step, the
    # rest scaled by 1 / (1 - p): kohya's rank_dropout, drawn once per forward pass rather than per
    # sample, because an adapter here changes the weight that the whole batch shares. 0: none.
    dropout: float = 0.0
    unet_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # UNet layer names; also "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"
    text_encoder: bool = False  # also adapt the text encoder's attention (q/k/v/out projections)
    caption_dropout: float = 0.0  # fraction trained with the empty caption
    min_snr_gamma: Optional[float] = None  # Min-SNR-gamma loss weights (Hang et al. 2023); unset: plain MSE
    validation_prompts: tuple[str, ...] = ()  # empty: the captions of the validation batch
    validation_steps: int = 20


@dataclass(frozen=True)
class TextualInversionOptions:
    """`sdlab train textual-inversion`: new token vectors for a new pseudo-word (Gal et al. 2022)."""

    token: str = "my-concept"  # the pseudo-word: the embedding's name, written in prompts
    init_word: str = "object"  # the vectors start as this word's token embedding(s)
    vectors: int = 1  # vectors per use of the pseudo-word
    # the prompt of an image without a caption; {} is the pseudo-word. Captioned images train on their
    # captions with the pseudo-word in them (textual_inversion.py), or here in place of {caption} if given
    template: str = "a photo of {}"
    validation_prompts: tuple[str, ...] = ()  # empty: the prompts of the first validation images
    validation_steps: int = 20


@dataclass(frozen=True)
class DreamBoothOptions:
    """`sdlab train dreambooth`: fine-tune on a few instance images (Ruiz et al. 2023) with prior preservation."""

    instance_prompt: str = "a sks dog"  # every training image's prompt, with a rare token for the subject
    class_prompt: Optional[str] = None  # e.g. "a dog"; unset: no prior preservation
    class_images: int = 100  # images of the class prompt the base model generates before training
    prior_loss_weight: float = 1.0  # lambda of the prior-preservation term
    class_sampler: str = "Euler"
    class_steps: int = 30
    class_guidance: float = 7.5
    train_text_encoder: bool = False
    validation_prompts: tuple[str, ...] = ()  # empty: the instance prompt
    validation_steps: int = 20


@dataclass(frozen=True)
class InpaintOptions:
    """`sdlab train inpaint`: a 9-channel inpainting UNet grown from a 4-channel --base."""

    full_mask: float = 0.25  # fraction of samples masked completely (the model also learns plain txt2img)
    caption_dropout: float = 0.1
    max_boxes: int = 3  # random rectangles per mask
    max_strokes: int = 3  # random brush strokes per mask
    edge_masks: float = 0.0  # of the rest, masked along one edge instead (an outpainting margin, 20-50% across)


@dataclass(frozen=True)
class UpscaleOptions:
    """`sdlab train upscale`: the x4 upscaler's design, latents conditioned on the 4x smaller image."""

    noise_levels: int = 1000  # classes of the noise-level embedding (x4-upscaling.yaml: num_classes 1000)
    max_noise_level: int = 350  # training draws levels in [0, max_noise_level] (x4-upscaling.yaml: 350)
    caption_dropout: float = 0.1
    crop: Optional[int] = None  # train on random crop x crop windows of each full-size image (SD's x4: 512 px)


# -- the trainers, data sources and recipe sections ----------------------------------------------------
#
# sdlab.training's own are listed here. A package built on it adds its own when it is imported
# (sdlab.shapes, the bundled model's: `sdlab train dpo`, data = "shapes" and a [shapes] section), so
# training/ never imports that package: the command line imports both. Modules are named, not imported,
# so reading a recipe needs no torch.

# trainer -> the dataclass of its [trainer] section
TRAINER_OPTIONS = {"vae": VAEOptions, "text": TextOptions, "unet": UNetOptions, "lora": LoraOptions,
                   "textual_inversion": TextualInversionOptions, "dreambooth": DreamBoothOptions,
                   "inpaint": InpaintOptions, "upscale": UpscaleOptions}
# trainer -> the module whose build(config, device) makes it
TRAINER_MODULES = {name: f"{__package__}.{name}" for name in TRAINER_OPTIONS}
# trainer -> check(config, source) of its options, beyond their types (a registered trainer's)
TRAINER_CHECKS: dict[str, Callable] = {}
# the trainers that fine-tune a whole trained model: without --base they take the bundled one
BUNDLED_BASE_TRAINERS = {"lora", "textual_inversion", "dreambooth"}
BUNDLED = "bundled"  # --base's word for the model that ships with sdlab (sdlab.bundled.BUNDLED_MODEL)
# `data` names -> the module whose training_data(config, size) yields (image, caption) samples
DATA_SOURCES: dict[str, str] = {}


@dataclass(frozen=True)
class RecipeSection:
    """A table of options a package adds to every recipe, e.g. [shapes]. `check(config, source)` refuses
    what does not fit the rest of the recipe; when a recipe holds the section, `trainers[name]` (a module
    with build(config, device)) builds `sdlab train name` instead of sdlab.training's own trainer."""

    options: type
    check: Callable
    trainers: dict


SECTIONS: dict[str, RecipeSection] = {}


def register_trainer(name: str, options: type, module: str, check: Optional[Callable] = None,
                     bundled_base: bool = False) -> None:
    """`sdlab train NAME`, its [NAME] section's dataclass and the module that builds it; `bundled_base`:
    it fine-tunes the bundled model when no --base is given."""
    TRAINER_OPTIONS[name], TRAINER_MODULES[name] = options, module
    if check is not None:
        TRAINER_CHECKS[name] = check
    if bundled_base:
        BUNDLED_BASE_TRAINERS.add(name)


def register_section(name: str, section: RecipeSection) -> None:
    SECTIONS[name] = section


def register_data(name: str, module: str) -> None:
    """`data = NAME` reads module.training_data(config, size) instead of a folder."""
    DATA_SOURCES[name] = module


def trainer_module(config: "TrainConfig") -> str:
    """The module that builds `config`'s trainer: a recipe section's, when the recipe holds one that brings it."""
    for name in config.sections:
        module = SECTIONS[name].trainers.get(config.trainer)
        if module is not None:
            return module
    return TRAINER_MODULES[config.trainer]


@dataclass(frozen=True)
class TrainConfig:
    trainer: str  # a key of TRAINER_OPTIONS
    data: str = "shapes"  # a folder of images with same-named .txt captions, or "shapes"
    out: Optional[str] = None  # run folder; unset: runs/<trainer>
    base: Optional[str] = None  # checkpoint whose parts this run does not train (unet: the VAE and text encoder)
    init_from_base: bool = False  # start the trained part from --base's weights (fine-tuning), not from scratch
    # preset name, ModelConfig .json/.toml file (beside the recipe or a path), or a table of changes to --base's config (sd1's without --base);
    # with --base only the trained part's sections are taken from it (components.py)
    model: Union[str, dict, None] = None

    steps: int = 1000
    batch_size: int = 8  # global: all ranks and accumulation micro-batches together
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # the step where the cosine reaches 0; unset: `steps`. Longer: the run is the first `steps` of a
    # longer schedule (a stage that was taken from the middle of one)
    lr_schedule_steps: Optional[int] = None
    warmup_steps: int = 0  # linear warm-up from 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    ema_decay: Optional[float] = None  # unset: the trainer's default (unet 0.9999, vae and text none); 0: none

    resolution: Optional[int] = None  # training image side; unset: the model config's resolution
    crop: Literal["center", "random"] = "center"
    flip: bool = False  # random horizontal flips (images only; captions saying "left" would then lie)
    # Aspect-ratio buckets (training/buckets.py, kohya's convention): each batch from one (width, height),
    # sides multiples of bucket_reso_steps (unset: the model's VAE x UNet downsampling) between
    # min_bucket_reso (unset: half the resolution) and max_bucket_reso (unset: the resolution), at most
    # max_bucket_reso^2 pixels
    buckets: bool = False
    min_bucket_reso: Optional[int] = None
    max_bucket_reso: Optional[int] = None
    bucket_reso_steps: Optional[int] = None
    # the share of steps drawn at resolution x resolution, the rest uniform over the other buckets
    # (buckets.step_bucket); 0: uniform over all. For data drawn at any size (data = "shapes")
    resolution_bucket_fraction: float = 0.0
    # or each bucket's share of the steps, by name: { "64x64" = 0.45, "128x128" = 0.3, "96x64" = 0.1 };
    # buckets left out are not drawn. For data drawn at any size; not with resolution_bucket_fraction
    bucket_weights: Optional[dict] = None
    num_workers: int = 0  # DataLoader processes decoding images

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on GPUs, fp32 on CPUs
    gradient_checkpointing: bool = False
    # ZeRO stage 1 (Rajbhandari et al. 2020): under torchrun each rank keeps the AdamW moments of only
    # 1/N of the weights and updates those, then broadcasts them; the optimizer state, twice the
    # weights' size in fp32, is split N ways. The same steps as unsharded training.
    shard_optimizer: bool = False
    # ZeRO stage 3 / FSDP (sharding.py): the trained weights, gradients, AdamW state and EMA are all
    # split N ways, each block gathered only while it runs. For the UNet trainers.
    shard_model: bool = False
    device: Optional[str] = None  # unset: cuda if present (cuda:LOCAL_RANK under torchrun), else cpu
    seed: int = 0

    checkpoint_every: int = 500  # steps between resumable checkpoints (OUT/train_state.pt)
    validate_every: int = 500  # steps between validation grids (OUT/validation/); 0: only at the end
    validation_images: int = 4
    log_every: int = 100  # steps between progress lines when stderr is not a terminal (a log file)

    options: Any = None  # the trainer's section: VAEOptions, TextOptions, UNetOptions, ...
    # the other sections a package added (see RecipeSection), by name, e.g. {"shapes": ShapesOptions(...)};
    # only those the recipe holds
    sections: dict = dataclasses.field(default_factory=dict)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def out_dir(self) -> str:
        return self.out or os.path.join("runs", self.trainer)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The trainers whose networks are called through forward(), where FSDP's gathering hooks sit: the
# UNet family (its 860 M weights are what outgrow a GPU first). The VAE trainer calls encode/decode
# and differentiates the decoder's last weight itself, the contrastive trainer calls its towers'
# methods and its temperature directly, and LoRA adapters and textual-inversion vectors run inside a
# frozen model: those would need gathering points of their own, and they fit on one device.
SHARDABLE_TRAINERS = ("unet", "inpaint", "upscale", "dreambooth")

# Keys a resumed run may change: they steer where and how often, not what is learned.
RESUMABLE_CHANGES = frozenset({"steps", "out", "checkpoint_every", "validate_every", "validation_images",
                               "log_every", "num_workers", "device", "data", "shard_optimizer",
                               "shard_model"})


# -- checking ----------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, _type_name(item))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a table"}.get(tp, str(tp))


def _check(value, tp, key: str, source: str):
    """`value` converted to `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key, source)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            try:
                return tuple(_check(v, typing.get_args(tp)[0], key, source) for v in value)
            except ConfigError:
                pass  # the error names the list's type, below
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _checked(cls, values: dict, prefix: str, source: str) -> dict:
    known = _fields(cls)
    out = {}
    for key, value in values.items():
        if key not in known:
            _refuse_moved(prefix + key, source)
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'; known keys: {', '.join(known)}")
        out[key] = _check(value, known[key], prefix + key, source)
    return out


def build_config(trainer: str, values: dict, source: str = "config") -> TrainConfig:
    """A checked TrainConfig from plain values (a parsed TOML document, overrides already merged)."""
    trainer = trainer.replace("-", "_")  # the command line says textual-inversion, the module is textual_inversion
    if trainer not in TRAINER_OPTIONS:
        raise ConfigError(f"unknown trainer '{trainer}'; choose one of: {', '.join(TRAINER_OPTIONS)}")
    values = dict(values)
    stated = values.pop("trainer", trainer)
    if stated != trainer:
        raise ConfigError(f"{source} is a recipe for `sdlab train {stated}`, not `sdlab train {trainer}`")
    section = values.pop(trainer, {})
    for other in TRAINER_OPTIONS:
        if other != trainer and other in values:
            raise ConfigError(f"{source}: the [{other}] section belongs to `sdlab train {other}`; "
                              f"this is `sdlab train {trainer}`")
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: '{trainer}' must be a table ([{trainer}]), got {section!r}")
    sections = {}
    for name in [key for key in values if key in SECTIONS]:
        table = values.pop(name)
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: '{name}' must be a table ([{name}]), got {table!r}")
        options_cls = SECTIONS[name].options
        sections[name] = options_cls(**_checked(options_cls, table, f"{name}.", source))
    common = {k: v for k, v in _fields(TrainConfig).items() if k not in ("trainer", "options", "sections")}
    for key in values:
        if key not in common:
            _refuse_moved(key, source)
            tables = ", ".join(f"[{name}]" for name in (trainer, *SECTIONS))
            raise ConfigError(f"{source}: unknown key '{key}'; known keys: {', '.join(common)}, {tables}")
    if isinstance(values.get("model"), dict):
        _check_model_table(values["model"], source)
    options_cls = TRAINER_OPTIONS[trainer]
    options = options_cls(**_checked(options_cls, section, f"{trainer}.", source))
    common_values = _checked(TrainConfig, values, "", source)
    common_values["base"] = resolve_base(trainer, common_values.get("base"))
    config = TrainConfig(trainer=trainer, options=options, sections=sections, **common_values)
    _check_ranges(config, source)
    if trainer in TRAINER_CHECKS:
        TRAINER_CHECKS[trainer](config, source)
    for name in sections:
        SECTIONS[name].check(config, source)
    return config


def resolve_base(trainer: str, base: Optional[str]) -> Optional[str]:
    """--base as the run uses it: the word 'bundled', and no --base for a trainer that fine-tunes a whole
    model (BUNDLED_BASE_TRAINERS), name the bundled model's file. Without that file installed, no --base
    stays unset (the trainer says it needs one)."""
    if base == "demo":
        # the demo's VAE and text encoder are random: nothing trained on them could be used
        raise ConfigError(f"'demo' is not a base to train on: its weights are random. Give --base a checkpoint file, "
                          f"'{BUNDLED}' (the bundled model) or a run's last.safetensors")
    if base != BUNDLED and (base is not None or trainer not in BUNDLED_BASE_TRAINERS):
        return base
    from ..bundled import BUNDLED_MODEL  # imports torch: only when the bundled model is asked for

    if os.path.isfile(BUNDLED_MODEL):
        return BUNDLED_MODEL
    if base == BUNDLED:
        raise ConfigError(f"--base {BUNDLED}: the bundled model is not installed ({BUNDLED_MODEL}); "
                          "give --base a checkpoint file")
    return None


def _refuse_moved(key: str, source: str) -> None:
    """An option that moved to a package's section: one error naming its new key."""
    name = key.rpartition(".")[2]
    for section_name, section in SECTIONS.items():
        if name in _fields(section.options):
            raise ConfigError(f"{source}: '{key}' is now '{section_name}.{name}' (the [{section_name}] section); "
                              "move it there")


def _check_model_table(table: dict, source: str) -> None:
    """The keys and types of a [model] table, against ModelConfig and its part dataclasses."""
    sections = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig, "schedule": ScheduleConfig}
    for key, value in table.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: 'model.{key}' must be a table ([model.{key}]), got {value!r}")
            _checked(sections[key], value, f"model.{key}.", source)
        else:
            _checked(ModelConfig, {key: value}, "model.", source)


def _check_ranges(config: TrainConfig, source: str) -> None:
    positive = ("steps", "batch_size", "grad_accum", "checkpoint_every", "validation_images", "log_every")
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1, got {getattr(config, key)}")
    for key in ("validate_every", "warmup_steps", "num_workers"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{source}: '{key}' must not be negative, got {getattr(config, key)}")
    if config.lr <= 0:
        raise ConfigError(f"{source}: 'lr' must be positive, got {config.lr}")
    if config.lr_schedule_steps is not None and config.lr_schedule_steps < config.steps:
        raise ConfigError(f"{source}: 'lr_schedule_steps' ({config.lr_schedule_steps}) must be at least 'steps' "
                          f"({config.steps}): the schedule cannot end before the run")
    if config.ema_decay is not None and not 0 <= config.ema_decay < 1:
        raise ConfigError(f"{source}: 'ema_decay' must be in [0, 1), got {config.ema_decay}")
    if config.batch_size % config.grad_accum:
        raise ConfigError(f"{source}: batch_size {config.batch_size} must be a multiple of grad_accum "
                          f"{config.grad_accum} (each accumulation step takes batch_size / grad_accum samples)")
    if config.resolution is not None and config.resolution < 8:
        raise ConfigError(f"{source}: 'resolution' must be at least 8 pixels, got {config.resolution}")
    for key in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if getattr(config, key) is not None and getattr(config, key) < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1 pixel, got {getattr(config, key)}")
    if not 0 <= config.resolution_bucket_fraction <= 1:
        raise ConfigError(f"{source}: 'resolution_bucket_fraction' must be in [0, 1], "
                          f"got {config.resolution_bucket_fraction}")
    if config.bucket_weights is not None and config.resolution_bucket_fraction:
        raise ConfigError(f"{source}: 'bucket_weights' gives every bucket its share, 'resolution_bucket_fraction' "
                          "only the training size's: keep one")
    if config.shard_model:
        if config.trainer not in SHARDABLE_TRAINERS:
            raise ConfigError(f"{source}: shard_model shards the UNet trainers ({', '.join(SHARDABLE_TRAINERS)}), "
                              f"not {config.trainer}; drop it (shard_optimizer still splits the AdamW state)")
        if config.shard_optimizer:
            raise ConfigError(f"{source}: shard_model already splits the optimizer state; drop shard_optimizer")
        if config.precision == "fp16":
            raise ConfigError(f"{source}: shard_model trains in fp32 or bf16 (fp16's loss scaling is not wired "
                              "to sharded gradients); use precision = \"bf16\"")
    options = config.options
    if isinstance(options, UNetOptions) and not 0 <= options.caption_dropout <= 1:
        raise ConfigError(f"{source}: 'unet.caption_dropout' must be in [0, 1], got {options.caption_dropout}")
    if isinstance(options, UNetOptions) and options.clean_error_weight_cap is not None:
        if options.clean_error_weight_cap < 1:
            raise ConfigError(f"{source}: 'unet.clean_error_weight_cap' must be at least 1 (it only raises weights), "
                              f"got {options.clean_error_weight_cap}")
    if isinstance(options, UNetOptions) and options.text_encoder_lr is not None:
        if not options.train_text_encoder:
            raise ConfigError(f"{source}: 'unet.text_encoder_lr' needs 'unet.train_text_encoder = true'")
        if options.text_encoder_lr <= 0:
            raise ConfigError(f"{source}: 'unet.text_encoder_lr' must be positive, got {options.text_encoder_lr}")


# -- reading -----------------------------------------------------------------------------------------


def read_toml(path: str | os.PathLike) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"training config not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def merge_overrides(values: dict, overrides: dict) -> dict:
    """`values` with `overrides` set on top; a dotted key ("unet.min_snr_gamma") reaches into a section."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        table, _, name = key.rpartition(".")
        if table:
            section = merged.setdefault(table, {})
            if not isinstance(section, dict):
                raise ConfigError(f"cannot set '{key}': '{table}' is not a table")
            section[name] = value
        else:
            merged[key] = value
    return merged


def parse_assignment(text: str) -> tuple[str, Any]:
    """`--set key=value`: the value is read as TOML (numbers, true/false, lists), else as a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set takes KEY=VALUE, e.g. --set unet.min_snr_gamma=5; got '{text}'")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(trainer: str, path: Optional[str] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """The recipe at `path` (if any) with `overrides` (command-line flags, None = not given) on top."""
    values = read_toml(path) if path else {}
    model = values.get("model")
    if isinstance(model, str) and model not in PRESETS and not os.path.isabs(model):
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), model)
        if os.path.isfile(beside):  # a model file named in a recipe is found next to the recipe
            values["model"] = beside
    return build_config(trainer, merge_overrides(values, overrides or {}), source=path or "command line")


def _deep_merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def resolve_model_config(value: Union[str, dict, None], over: ModelConfig = SD1) -> Optional[ModelConfig]:
    """A ModelConfig from a preset name, a JSON file (sdlab's `to_json`) or a TOML file of the same
    tables, or `over` changed by the keys of a table ({"unet": {"model_channels": 64}}); None stays None."""
    if value is None:
        return None
    if isinstance(value, dict):
        return from_dict(_deep_merge(to_dict(over), value))
    if value in PRESETS:
        return PRESETS[value]
    if os.path.isfile(value):
        if value.endswith(".toml"):
            return from_dict(read_toml(value))
        try:
            with open(value) as f:
                return from_dict(json.load(f))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config {value} is not valid JSON: {exc}") from exc
    raise ConfigError(f"model config '{value}' is neither a preset ({', '.join(PRESETS)}) nor a .json/.toml file")
