"""The recipe's [shapes] section and `sdlab train dpo`'s [dpo] section: the options of the research done
on the bundled shapes model, checked before a step runs (sdlab.training.config reads them as it reads
every section; this package registers them).

    [shapes]                       # recipes/shapes-relation.toml
    single_object_fraction = 0.3
    relation_contrast = 1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import DEFAULT_SAMPLER
from ..errors import ConfigError
from ..training.config import TrainConfig


@dataclass(frozen=True)
class ShapesOptions:
    """What the shapes data allows beyond plain training: every option reads the shapes grammar or palette."""

    # The fraction of one-object scenes in the training stream (unset: the dataset's 0.6); the rest have two.
    single_object_fraction: Optional[float] = None
    # `sdlab train unet`: this fraction of the captioned two-object samples at timesteps >= recolour_min_timestep
    # is noised from the picture with the two objects' colours exchanged, the target staying the true
    # picture (sdlab.shapes.recolour): the noisy input says where the objects are, only the caption which
    # colour each has. 0: off.
    recolour_fraction: float = 0.0
    recolour_min_timestep: int = 400
    # `sdlab train unet`: weight of the relation contrast (sdlab.shapes.relation_contrast): each captioned
    # sample whose caption states a relation, at a timestep >= relation_contrast_min_timestep, is also
    # denoised under the caption turned round, and the true caption's error must rank lower (a two-way
    # softmax over -error / (temperature * their mean)). 0: off.
    relation_contrast: float = 0.0
    relation_contrast_temperature: float = 0.05
    relation_contrast_min_timestep: int = 600
    # `sdlab train unet`: weight of mirrored denoising (sdlab.shapes.relation_contrast.mirrored_denoising):
    # the relation samples below relation_contrast_min_timestep are also denoised under the caption turned
    # round, against the same target, so that words no longer move objects the latents already show. 0: off.
    relation_mirror_denoising: float = 0.0
    # `sdlab train unet`: weight of the scene contrast (sdlab.shapes.scene_contrast): each captioned
    # two-object sample at a timestep >= scene_contrast_min_timestep is compared with a near miss of its
    # picture (one object drawn twice, or the two colours exchanged) noised alike, and the caption must
    # denoise its own picture better (a two-way softmax over -error / (temperature * their mean)). 0: off.
    scene_contrast: float = 0.0
    scene_contrast_temperature: float = 0.05
    scene_contrast_min_timestep: int = 600
    # `sdlab train unet`: weight of the token grounding loss (sdlab.shapes.grounding; TokenCompose's token
    # loss): each object's colour and shape words learn to attend where that object is, its region read
    # from its palette colour. 0: off.
    grounding_loss: float = 0.0
    # "uniform" over timesteps, "noise": weighted 2t/T, towards the noisy latents where only the caption
    # can say where each object goes, or "clean": 2(1 - t/T), towards the latents that already show the
    # objects, leaving the noisy steps that decide the layout alone (sdlab.shapes.grounding.timestep_weights)
    grounding_weighting: Literal["uniform", "noise", "clean"] = "uniform"
    # also ground the words that say where the first object goes ("left", "above", ...) on that object:
    # they are the caption's only tokens that know which way round two objects are
    grounding_place_words: bool = False
    # which of each object's words are grounded: "colour and shape" (TokenCompose's), or "shape" alone (the
    # colour words of the shapes model localise without it; its shape words did not)
    grounding_words: Literal["colour and shape", "shape"] = "colour and shape"
    # which captions are grounded: "all", or "single" (single-object captions only: the two-object scenes
    # keep the plain objectives, which grounding them at weight 0.1 cost 30 points of their pass rate)
    grounding_captions: Literal["all", "single"] = "all"
    # `sdlab train inpaint`: the fraction of samples whose mask is the bounding box of one of the picture's
    # objects, grown by 1-4 px, instead of random boxes, strokes or a full mask, so that only the caption
    # says what goes there: the object masking of Imagen Editor (Wang et al. 2023), which made inpainting
    # follow the prompt. The objects are found by their palette colours.
    object_masks: float = 0.0
    # `sdlab train text`: NegCLIP's hard negatives (Yuksekgonul et al. 2023): each caption that states a
    # relation also brings its mirror ("above" -> "below", same words otherwise) as one more caption no
    # image matches, so the text tower must encode which way round the objects are, not only which
    # objects there are
    hard_negatives: bool = False


# the trainer each option changes, and why it needs the shapes data
UNET_OPTIONS = {
    "recolour_fraction": "it exchanges the objects' palette colours",
    "relation_contrast": "it turns the shapes grammar's relations round",
    "relation_mirror_denoising": "it turns the shapes grammar's relations round",
    "scene_contrast": "it redraws the objects by their palette colours",
    "grounding_loss": "it finds each object by its palette colour",
}
OPTION_TRAINERS = {**dict.fromkeys(UNET_OPTIONS, "unet"), "object_masks": "inpaint", "hard_negatives": "text"}
# why each option needs data = "shapes" (hard negatives need only captions in the shapes grammar, a folder's too)
WHY = {**UNET_OPTIONS, "single_object_fraction": "it mixes the shapes set's scenes",
       "object_masks": "it finds the objects by their palette colours"}


def shapes_options(config: TrainConfig) -> ShapesOptions:
    """The recipe's [shapes] section, or the defaults (everything off) without one."""
    return config.sections.get("shapes") or ShapesOptions()


def check_shapes_options(config: TrainConfig, source: str) -> None:
    options = shapes_options(config)
    defaults = ShapesOptions()
    for name in (*WHY, "hard_negatives"):
        if getattr(options, name) == getattr(defaults, name):
            continue
        if name in WHY and config.data != "shapes":
            raise ConfigError(f"{source}: 'shapes.{name}' is for the shapes data ({WHY[name]}), not {config.data}")
        trainer = OPTION_TRAINERS.get(name, config.trainer)
        if trainer != config.trainer:
            raise ConfigError(f"{source}: 'shapes.{name}' is an option of `sdlab train {trainer}`, "
                              f"not `sdlab train {config.trainer}`")
    for name in ("single_object_fraction", "recolour_fraction", "object_masks"):
        value = getattr(options, name)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"{source}: 'shapes.{name}' must be in [0, 1], got {value}")
    for name in ("relation_contrast", "relation_mirror_denoising", "scene_contrast", "grounding_loss"):
        if getattr(options, name) < 0:
            raise ConfigError(f"{source}: 'shapes.{name}' must not be negative, got {getattr(options, name)}")
    for term in ("recolour", "relation_contrast", "scene_contrast"):
        if not 0 <= getattr(options, f"{term}_min_timestep") < 1000:
            raise ConfigError(f"{source}: 'shapes.{term}_min_timestep' must be in [0, 1000), "
                              f"got {getattr(options, f'{term}_min_timestep')}")
    for term in ("relation_contrast", "scene_contrast"):
        if getattr(options, f"{term}_temperature") <= 0:
            raise ConfigError(f"{source}: 'shapes.{term}_temperature' must be positive, "
                              f"got {getattr(options, f'{term}_temperature')}")
    if options.grounding_loss and config.gradient_checkpointing:
        raise ConfigError(f"{source}: 'shapes.grounding_loss' reads attention maps that gradient checkpointing "
                          "would drop and recompute; turn one of them off")


@dataclass(frozen=True)
class DPOOptions:
    """`sdlab train dpo`: preference fine-tuning on --base's own pictures, judged by the shapes checker
    (Diffusion-DPO, Wallace et al. 2023; sdlab.shapes.dpo)."""

    beta: float = 5000.0  # how hard the ranking pulls against staying near the reference (the paper: 5000 for SD 1.5)
    pair_captions: int = 640  # two-object captions --base draws before training
    samples_per_caption: int = 4  # pictures of each; a caption with right and wrong ones gives pairs
    pairs_per_caption: int = 3  # at most this many (right, wrong) pairs per caption
    sampler: str = DEFAULT_SAMPLER  # how --base draws them: as `sdlab generate` does by default
    sample_steps: int = 20
    sample_guidance: float = 5.0
    validation_prompts: tuple[str, ...] = ()  # empty: the captions of the first pairs
    validation_sampler: str = DEFAULT_SAMPLER
    validation_steps: int = 20
    validation_guidance: float = 5.0


def check_dpo_options(config: TrainConfig, source: str) -> None:
    options: DPOOptions = config.options
    if config.data != "shapes":
        raise ConfigError(f"{source}: `sdlab train dpo` judges --base's pictures of shapes captions with the shapes "
                          f"checker: data must be 'shapes', not {config.data}")
    if options.beta <= 0:
        raise ConfigError(f"{source}: 'dpo.beta' must be positive, got {options.beta}")
    for key in ("pair_captions", "pairs_per_caption", "sample_steps"):
        if getattr(options, key) < 1:
            raise ConfigError(f"{source}: 'dpo.{key}' must be at least 1, got {getattr(options, key)}")
    if options.samples_per_caption < 2:
        raise ConfigError(f"{source}: 'dpo.samples_per_caption' must be at least 2: a pair needs a right and a "
                          f"wrong picture of one caption, got {options.samples_per_caption}")

