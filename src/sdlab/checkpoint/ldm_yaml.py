"""The ldm config YAML beside a single-file checkpoint: `model.yaml` next to `model.safetensors`.

The SD web UI (AUTOMATIC1111) builds a checkpoint from `<path without extension>.yaml` when that file
exists, and fine-tunes are shipped that way. The YAML (CompVis `v1-inference.yaml`, Stability
`v2-inference-v.yaml`, `x4-upscaling.yaml`) says what the weights cannot:

    model.params.parameterization          "eps" or "v"  -> prediction ("eps", ldm's default, when absent)
    model.params.linear_start, linear_end  betas' ends   -> schedule.beta_start, beta_end
    model.params.timesteps                 1000          -> schedule.num_train_timesteps
    model.params.scale_factor              0.18215       -> vae.scaling_factor
    unet_config.params.num_heads           8 (SD1)       -> unet.num_heads, head_channels None
    unet_config.params.num_head_channels   64 (SD2)      -> unet.head_channels (wins over num_heads, as in ldm)

Every shape it states (`model_channels`, `context_dim`, `in_channels`, ...) must be the weights' own;
a YAML written for another model is refused, naming the field and both values.

Precedence, strongest first: an explicit argument (`prediction=`, the CLI's `--prediction`), this
YAML, sdlab's safetensors metadata, SD's family rules. The file's own ldm buffers are stronger than
the YAML where ldm lets them be: a `scale_factor` buffer (estimated from data by `scale_by_std`, the
YAML's number was only its start) is kept, and a `betas` buffer whose schedule differs from the
YAML's is a contradiction, refused like a wrong shape. An absent `parameterization` means epsilon
because that is what ldm builds, and the SD2 base models rely on it (their `v2-inference.yaml` has
none, where sdlab's own SD2 guess is v); other absent fields leave sdlab's reading unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from .detect import schedule_from_betas

PARAMETERIZATIONS = {"eps": "epsilon", "v": "v"}  # ldm's names -> sdlab's
TEXT_ENCODERS = {"FrozenCLIPEmbedder": "clip", "FrozenOpenCLIPEmbedder": "open_clip"}  # cond_stage_config targets

# YAML name -> ModelConfig field, for the numbers the weights determine (checked, never taken).
UNET_SHAPES = {
    "in_channels": "in_channels", "out_channels": "out_channels", "model_channels": "model_channels",
    "channel_mult": "channel_mult", "num_res_blocks": "num_res_blocks", "transformer_depth": "transformer_depth",
    "context_dim": "context_dim", "use_linear_in_transformer": "use_linear_projection", "num_classes": "num_classes",
}
VAE_SHAPES = {  # first_stage_config.params.ddconfig
    "in_channels": "in_channels", "out_ch": "out_channels", "ch": "ch", "ch_mult": "ch_mult",
    "num_res_blocks": "num_res_blocks", "z_channels": "z_channels",
}


@dataclass(frozen=True)
class Stated:
    """One number the YAML states that the weights determine too."""

    name: str  # as the YAML spells it, e.g. "unet_config model_channels"
    part: str  # "unet", "vae", "text"
    attribute: str  # the field of that part of ModelConfig
    value: Any


@dataclass(frozen=True)
class Sidecar:
    """What sdlab takes from an ldm YAML."""

    path: Path
    prediction: str  # "epsilon" or "v"
    schedule: dict[str, float] = field(default_factory=dict)  # ScheduleConfig fields it states
    scale_factor: Optional[float] = None
    num_heads: Optional[int] = None
    head_channels: Optional[int] = None
    attention_resolutions: Optional[tuple[int, ...]] = None  # downsampling factors with transformers
    shapes: tuple[Stated, ...] = ()


def sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """`v1-5.safetensors` -> `v1-5.yaml` (the web UI's `os.path.splitext(path)[0] + ".yaml"`)."""
    return Path(checkpoint).with_suffix(".yaml")


def read_sidecar(checkpoint: str | os.PathLike) -> Optional[Sidecar]:
    """The YAML beside `checkpoint`, or None when there is none."""
    path = sidecar_path(checkpoint)
    if not path.is_file():
        return None
    import yaml  # only a model with a YAML beside it pays for importing PyYAML

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise _refusal(path, f"cannot read it ({exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise _refusal(path, f"not valid YAML ({where}{problem})") from exc
    return parse_sidecar(document, path)


def parse_sidecar(document: Any, path: Path) -> Sidecar:
    """The fields sdlab uses from a loaded ldm YAML document (`model: params: ...`)."""
    params = _section(_section(document, "model", path), "params", path, "model")
    values = _Values(path)
    parameterization = params.get("parameterization", "eps")
    if not isinstance(parameterization, str) or parameterization not in PARAMETERIZATIONS:
        raise _refusal(path, f"parameterization {parameterization!r} is not one sdlab samples with (eps or v)")
    if params.get("beta_schedule", "linear") != "linear":
        raise _refusal(path, f"beta_schedule {params['beta_schedule']!r} is not SD's 'linear' (sqrt-linear) schedule")
    schedule = {}
    for name, target in (("linear_start", "beta_start"), ("linear_end", "beta_end")):
        if name in params:
            schedule[target] = values.positive_number(params[name], name)
    if "timesteps" in params:
        schedule["num_train_timesteps"] = values.positive_int(params["timesteps"], "timesteps")
    scale_factor = values.positive_number(params["scale_factor"], "scale_factor") if "scale_factor" in params else None

    unet = _section(params, "unet_config", path, required=False)
    unet = _section(unet, "params", path, "unet_config", required=False)
    num_heads = head_channels = None
    if unet.get("num_head_channels", -1) != -1:  # ldm: num_head_channels, when set, decides the heads
        head_channels = values.positive_int(unet["num_head_channels"], "unet_config num_head_channels")
    elif unet.get("num_heads", -1) != -1:
        num_heads = values.positive_int(unet["num_heads"], "unet_config num_heads")
    attention = None
    if "attention_resolutions" in unet:
        attention = values.int_tuple(unet["attention_resolutions"], "unet_config attention_resolutions")

    shapes = [Stated(f"unet_config {name}", "unet", target, _as_shape(unet[name]))
              for name, target in UNET_SHAPES.items() if name in unet]
    first_stage = _section(params, "first_stage_config", path, required=False)
    first_stage = _section(first_stage, "params", path, "first_stage_config", required=False)
    ddconfig = _section(first_stage, "ddconfig", path, "first_stage_config params", required=False)
    shapes += [Stated(f"first_stage_config ddconfig {name}", "vae", target, _as_shape(ddconfig[name]))
               for name, target in VAE_SHAPES.items() if name in ddconfig]
    if "embed_dim" in first_stage:
        shapes.append(Stated("first_stage_config embed_dim", "vae", "z_channels", first_stage["embed_dim"]))
    cond_target = str(_section(params, "cond_stage_config", path, required=False).get("target", ""))
    kind = TEXT_ENCODERS.get(cond_target.rsplit(".", 1)[-1])
    if kind is not None:
        shapes.append(Stated(f"cond_stage_config target {cond_target.rsplit('.', 1)[-1]}", "text", "kind", kind))
    return Sidecar(path, PARAMETERIZATIONS[parameterization], schedule, scale_factor, num_heads, head_channels,
                   attention, tuple(shapes))


def apply_sidecar(config: ModelConfig, sidecar: Sidecar, buffers: Mapping[str, torch.Tensor],
                  checkpoint: str = "the checkpoint") -> ModelConfig:
    """`config` (read from the weights, prediction already settled) with the YAML's heads, schedule and
    latent scale, after checking that every shape the YAML states is the weights' own."""
    for stated in sidecar.shapes:
        found = getattr(getattr(config, stated.part), stated.attribute)
        if stated.value != found:
            raise _contradiction(sidecar.path, stated.name, stated.value, found, checkpoint)
    unet = config.unet
    if sidecar.attention_resolutions is not None:
        factors = [2**level for level in range(len(unet.channel_mult))]  # ldm's `ds` at each level
        stated = sorted(r for r in sidecar.attention_resolutions if r in factors)
        found = sorted(2**level for level in unet.attention_levels)
        if stated != found:
            raise _contradiction(sidecar.path, "unet_config attention_resolutions", stated, found, checkpoint)

    if sidecar.head_channels is not None:
        unet = dataclasses.replace(unet, head_channels=sidecar.head_channels)
    elif sidecar.num_heads is not None:
        unet = dataclasses.replace(unet, num_heads=sidecar.num_heads, head_channels=None)
    for mult in unet.channel_mult:
        width = unet.model_channels * mult
        heads, head_dim = unet.heads_at(width)
        if heads * head_dim != width:
            name, value = (("num_head_channels", unet.head_channels) if sidecar.head_channels is not None
                           else ("num_heads", unet.num_heads))
            raise _refusal(sidecar.path, f"unet_config {name} {value} does not divide the {width} channels of a "
                                         f"UNet level of {checkpoint}")

    schedule = config.schedule
    if sidecar.schedule:
        schedule = dataclasses.replace(schedule, **sidecar.schedule)
        trained = schedule_from_betas(buffers.get("betas"))
        if trained is not None and not _same_schedule(schedule, trained):
            raise _contradiction(sidecar.path, "schedule (linear_start, linear_end, timesteps)",
                                 _schedule_text(schedule), f"{_schedule_text(trained)} by its betas buffer", checkpoint)
    vae = config.vae
    if sidecar.scale_factor is not None and "scale_factor" not in buffers:
        vae = dataclasses.replace(vae, scaling_factor=sidecar.scale_factor)
    return config.replace(unet=unet, vae=vae, schedule=schedule)


def _same_schedule(a, b) -> bool:
    # the betas buffer is float32 (and rounded to 3 digits when read): compare ends to 0.1 %
    return (a.num_train_timesteps == b.num_train_timesteps
            and abs(a.beta_start - b.beta_start) <= 1e-3 * b.beta_start
            and abs(a.beta_end - b.beta_end) <= 1e-3 * b.beta_end)


def _schedule_text(schedule) -> str:
    return f"{schedule.beta_start:g}..{schedule.beta_end:g} over {schedule.num_train_timesteps} steps"


def _section(document: Any, key: str, path: Path, parent: str = "", required: bool = True) -> dict:
    """`document[key]` as a dict; {} when absent and not required."""
    where = f"{parent} {key}".strip()
    if not isinstance(document, dict):
        raise _refusal(path, f"not an ldm model config ('{where}' is not inside a mapping)")
    value = document.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _refusal(path, f"not an ldm model config (no '{where}:' section of settings)")
    return value


class _Values:
    """YAML scalars as numbers, with one refusal naming the field for anything else."""

    def __init__(self, path: Path):
        self.path = path

    def number(self, value: Any, name: str) -> float:
        # PyYAML reads `1e-4` (no dot) as a string, where OmegaConf (which ldm uses) reads a float
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        raise _refusal(self.path, f"{name} must be a number, got {value!r}")

    def positive_number(self, value: Any, name: str) -> float:
        number = self.number(value, name)
        if not number > 0:
            raise _refusal(self.path, f"{name} must be positive, got {value!r}")
        return number

    def positive_int(self, value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _refusal(self.path, f"{name} must be a positive integer, got {value!r}")
        return value

    def int_tuple(self, value: Any, name: str) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)):
            raise _refusal(self.path, f"{name} must be a list of integers, got {value!r}")
        return tuple(self.positive_int(item, name) for item in value)



def _as_shape(value: Any) -> Any:
    """A stated shape in ModelConfig's terms: lists become tuples, the rest is compared as given."""
    return tuple(value) if isinstance(value, list) else value


_WHAT_TO_DO = "fix or delete this YAML (sdlab reads the .yaml named like the checkpoint as the model's ldm config)"


def _refusal(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; {_WHAT_TO_DO}")


def _contradiction(path: Path, name: str, stated: Any, found: Any, checkpoint: str) -> CheckpointError:
    return CheckpointError(
        f"{path} contradicts the weights: {name} is {_show(stated)} there but {_show(found)} in {checkpoint}, "
        f"so it was written for another model; {_WHAT_TO_DO}"
    )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return str(list(value))
    return value if isinstance(value, str) else repr(value)
