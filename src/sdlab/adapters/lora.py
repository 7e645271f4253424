"""LoRA: low-rank updates of the UNet's and text encoder's weights (Hu et al. 2021, "LoRA", eq. 3).

A layer of a LoRA file holds `down` (rank, in[, kh, kw]), `up` (out, rank[, 1, 1]) and optionally
`alpha`; applying it with a multiplier w changes the layer's weight W (out, in[, kh, kw]) by

    W' = W + w * (alpha / rank) * up @ down          (scale 1 without alpha, as in the web UI)

For convolutions (kohya "LoCon") `down` is a conv with the layer's kernel, stride and padding and `up`
a 1x1 conv, so up @ down contracts the rank and keeps down's kernel. LyCORIS's CP decomposition adds
`mid` (rank', rank, kh, kw) between a 1x1 `down` and a 1x1 `up`. diffusers/PEFT files scale by
lora_alpha / rank from their `lora_adapter_metadata` (alpha / sqrt(rank) with use_rslora), else 1.

Two ways to apply, both undone exactly by `unload`:
- "merge": W is changed in place; a copy of each touched tensor is kept and copied back on unload.
- "dynamic": nothing is copied; a forward hook adds w * scale * up(down(x)) to the layer's output.
  OpenCLIP's packed q/k/v weight has no layer of its own, so there a parametrization adds the delta
  to the affected rows each time the weight is read (its state_dict shows torch's parametrization
  keys meanwhile: unload before saving a checkpoint).

A file is checked completely against the model (every layer known, every shape right) before any
weight changes: a LoRA for another model fails with the reasons and leaves the model as it was.

In prompts, `<lora:name:w>` (the web UI's syntax; `<lora:name:te:unet>` and te=/unet= set the text
encoder's and UNet's multipliers apart) names a file by its stem. The web UI's `Lora hashes`
infotext field lists "name: hash" with the hash kohya's trainer stores as `sshs_model_hash`, else
the SHA-256 of the safetensors data after the header (sd-webui-additional-networks' "addnet" hash),
else the SHA-256 of the whole file; 12 hex digits.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..checkpoint.io import read_state_dict
from ..errors import InputError
from .lora_keys import LoraLayer, match_layers

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
MODES = ("merge", "dynamic")


@dataclass
class Lora:
    """A LoRA file's tensors, not yet matched to a model."""

    name: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Optional[str] = None
    _shorthash: Optional[str] = None

    @property
    def shorthash(self) -> Optional[str]:
        """The web UI's 12-digit hash (module docstring); None for a state dict."""
        if self._shorthash is None and self.path is not None:
            self._shorthash = lora_shorthash(self.path, self.metadata)
        return self._shorthash


def read_lora(source, name: Optional[str] = None) -> Lora:
    """A Lora from a file (.safetensors, or a .pt/.ckpt/.bin state dict) or a state dict; named by the
    file stem unless `name` is given."""
    if isinstance(source, Lora):
        return source
    if isinstance(source, dict):
        return Lora(name or "lora", dict(source))
    path = Path(source)
    if path.is_dir() or path.suffix.lower() not in LORA_SUFFIXES:
        raise InputError(f"{path}: a LoRA is a {', '.join(LORA_SUFFIXES)} file")
    tensors, metadata = read_state_dict(path)
    return Lora(name or path.stem, tensors, metadata, str(path))


def lora_shorthash(path: str | os.PathLike, metadata: Optional[dict] = None) -> str:
    """12 hex digits: `sshs_model_hash` from the metadata, else the addnet hash of a safetensors file,
    else the SHA-256 of the file."""
    if metadata and metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"][:12]
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if str(path).lower().endswith(".safetensors"):
            header_size = int.from_bytes(file.read(8), "little")  # safetensors: u64 header length, then JSON
            file.seek(8 + header_size)
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


@dataclass
class _Update:
    module: nn.Module
    layer: LoraLayer
    multiplier: float


# -- applying ---------------------------------------------------------------------------------------------------


def _delta(layer: LoraLayer, shape: torch.Size) -> torch.Tensor:
    """scale * up @ down (with mid: the CP reconstruction), float32, in the weight's shape."""
    down, up = layer.down.float(), layer.up.float().flatten(1)  # up (out, rank)
    if layer.mid is not None:
        delta = torch.einsum("nmkl,in,mj->ijkl", layer.mid.float(), up, down.flatten(1))
    else:
        delta = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return layer.scale * delta.reshape(shape)


def _raw_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """The stored tensor, also while a parametrization computes what `getattr` returns."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def _merge(updates: Sequence[_Update]) -> Callable[[], None]:
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for update in updates:
            target = update.layer.target
            param = _raw_parameter(update.module, target.param)
            saved.setdefault(id(param), (param, param.detach().clone()))
            view = param if target.rows is None else param[target.rows[0]:target.rows[1]]
            delta = update.multiplier * _delta(update.layer, view.shape).to(view.device)
            view.copy_((view.float() + delta).to(view.dtype))

    def restore() -> None:
        with torch.no_grad():
            for param, original in saved.values():
                param.copy_(original)

    return restore


def _low_rank_path(module: nn.Module, layer: LoraLayer, multiplier: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> multiplier * scale * up(down(x)), computed through the rank (no weight-sized tensor)."""
    weight = module.weight
    factor = multiplier * layer.scale
    down = layer.down.to(weight.device, weight.dtype)
    up = (layer.up.float() * factor).to(weight.device, weight.dtype)
    if not isinstance(module, nn.Conv2d):
        down2, up2 = down.flatten(1), up.flatten(1)
        return lambda x: F.linear(F.linear(x, _like(down2, x)), _like(up2, x))
    down4 = down if down.ndim == 4 else down[:, :, None, None]
    up4 = up if up.ndim == 4 else up[:, :, None, None]
    geometry = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    if layer.mid is None:
        return lambda x: F.conv2d(F.conv2d(x, _like(down4, x), **geometry), _like(up4, x))
    mid = layer.mid.to(weight.device, weight.dtype)
    return lambda x: F.conv2d(F.conv2d(F.conv2d(x, _like(down4, x)), _like(mid, x), **geometry), _like(up4, x))


def _like(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The factor on x's device and in its dtype (a no-op unless the model moved after applying)."""
    return factor.to(device=x.device, dtype=x.dtype)


class PackedRowsDelta(nn.Module):
    """Parametrization adding LoRA deltas to row blocks of a packed weight (OpenCLIP's q/k/v in_proj)."""

    def __init__(self, updates: Sequence[_Update]):
        super().__init__()
        self.updates = list(updates)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        deltas = torch.zeros_like(weight, dtype=torch.float32)
        for update in self.updates:
            start, stop = update.layer.target.rows
            delta = _delta(update.layer, (stop - start, weight.shape[1])).to(weight.device)
            deltas[start:stop] += update.multiplier * delta
        return weight + deltas.to(weight.dtype)


def _adding(path: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A forward hook: the layer's output plus path(its input)."""
    return lambda module, args, output: output + path(args[0])


def _attach(updates: Sequence[_Update]) -> Callable[[], None]:
    handles = []
    packed: dict[tuple[int, str], list[_Update]] = {}
    for update in updates:
        target = update.layer.target
        if target.rows is not None:
            packed.setdefault((id(update.module), target.param), []).append(update)
            continue
        path = _low_rank_path(update.module, update.layer, update.multiplier)
        handles.append(update.module.register_forward_hook(_adding(path)))
    attached = []
    for group in packed.values():
        module, name = group[0].module, group[0].layer.target.param
        parametrization = PackedRowsDelta(group)
        parametrize.register_parametrization(module, name, parametrization)
        attached.append((module, name, parametrization))

    def detach() -> None:
        for handle in handles:
            handle.remove()
        for module, name, parametrization in attached:
            chain = module.parametrizations[name]
            del chain[[i for i, p in enumerate(chain) if p is parametrization][0]]
            if len(chain) == 0:
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)

    return detach


@dataclass(eq=False)
class AppliedLora:
    """A LoRA in effect on a model; `unload()` takes it out exactly."""

    lora: Lora
    unet_weight: float
    te_weight: float
    mode: str
    updates: list[_Update]
    _undo: Optional[Callable[[], None]] = None
    _owner: Optional[weakref.ref] = None

    def unload(self) -> None:
        """Undo this LoRA. LoRAs applied after it are taken out first and put back after, so every
        merged weight returns to its exact earlier value."""
        owner = self._owner() if self._owner is not None else None
        stack = _STACKS.get(owner, []) if owner is not None else []
        if self not in stack:
            return
        later = stack[stack.index(self) + 1:]
        for applied in reversed(later):
            applied._undo()
        self._undo()
        del stack[stack.index(self):]
        for applied in later:
            applied._undo = _execute(applied.updates, applied.mode)
            stack.append(applied)


_STACKS: "weakref.WeakKeyDictionary[nn.Module, list[AppliedLora]]" = weakref.WeakKeyDictionary()


def _execute(updates: Sequence[_Update], mode: str) -> Callable[[], None]:
    return _merge(updates) if mode == "merge" else _attach(updates)


def _request(item) -> tuple[object, float, float]:
    """(source, te_weight, unet_weight) from a source, (source, weight) or (source, te_weight, unet_weight)."""
    if isinstance(item, tuple):
        if len(item) == 2:
            return item[0], float(item[1]), float(item[1])
        if len(item) == 3:
            return item[0], float(item[1]), float(item[2])
        raise InputError(f"a LoRA request is (file, weight) or (file, te_weight, unet_weight), got {item!r}")
    return item, 1.0, 1.0


def _plan(pipe, loras: Iterable, mode: str) -> list[AppliedLora]:
    """Read and match every LoRA; nothing is applied yet."""
    if mode not in MODES:
        raise InputError(f"LoRA mode must be one of {', '.join(MODES)}, got {mode!r}")
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    planned = []
    for item in loras:
        source, te_weight, unet_weight = _request(item)
        lora = read_lora(source)
        where = f"LoRA '{lora.name}'" + (f" ({lora.path})" if lora.path else "")
        updates = [_Update(modules[layer.target.component].get_submodule(layer.target.module), layer,
                           unet_weight if layer.target.component == "unet" else te_weight)
                   for layer in match_layers(lora.tensors, lora.metadata, pipe.unet, pipe.text_encoder, where)]
        planned.append(AppliedLora(lora, unet_weight, te_weight, mode, updates, _owner=weakref.ref(pipe.unet)))
    return planned


def _activate(pipe, planned: Sequence[AppliedLora]) -> list[AppliedLora]:
    stack = _STACKS.setdefault(pipe.unet, [])
    for applied in planned:
        applied._undo = _execute(applied.updates, applied.mode)
        stack.append(applied)
    return list(planned)


def apply_loras(pipe, loras: Iterable, mode: str = "merge") -> list[AppliedLora]:
    """Apply several LoRAs to `pipe.unet` and `pipe.text_encoder`.

    Each item is a file path, state dict or Lora, or (that, weight), or (that, te_weight, unet_weight).
    All files are read and matched before any weight changes.
    """
    return _activate(pipe, _plan(pipe, loras, mode))


def apply_lora(pipe, source, weight: float = 1.0, *, te_weight: Optional[float] = None, mode: str = "merge",
               name: Optional[str] = None) -> AppliedLora:
    """Apply one LoRA (file, state dict or Lora) with `weight` on the UNet and `te_weight` (default:
    `weight`) on the text encoder; `name` overrides the file stem in infotexts."""
    lora = read_lora(source, name)
    (applied,) = apply_loras(pipe, [(lora, weight if te_weight is None else te_weight, weight)], mode)
    return applied


def applied_loras(pipe) -> list[AppliedLora]:
    return list(_STACKS.get(pipe.unet, []))


def unload_loras(pipe) -> None:
    """Take every LoRA off the pipeline, newest first: the weights are bit-identical to before."""
    stack = _STACKS.pop(pipe.unet, [])
    for applied in reversed(stack):
        applied._undo()


# -- prompts, files, infotext -----------------------------------------------------------------------------------

_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")  # the web UI's extra-network syntax
LORA_TAG_TYPES = ("lora", "lyco")  # the web UI reads <lyco:...> as <lora:...>


@dataclass(frozen=True)
class LoraTag:
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


def _tag(kind: str, arguments: str, text: str) -> LoraTag:
    if kind not in LORA_TAG_TYPES:
        raise InputError(f"'{text}': sdlab applies <lora:...> networks only; remove the <{kind}:...> tag")
    positional = [a for a in arguments.split(":") if "=" not in a]
    named = dict(a.split("=", 1) for a in arguments.split(":") if "=" in a)
    unknown = set(named) - {"te", "unet"}
    if unknown or not positional or len(positional) > 3:
        raise InputError(f"'{text}': write <lora:name>, <lora:name:weight> or <lora:name:te_weight:unet_weight>")
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    except ValueError:
        raise InputError(f"'{text}': LoRA weights must be numbers") from None
    return LoraTag(positional[0].strip(), te, unet)


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its `<lora:...>` tags, and the tags. '<lora:name:0.8>' sets both multipliers."""
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        tags.append(_tag(match.group(1), match.group(2), match.group(0)))
        return ""

    return _EXTRA_NETWORK_RE.sub(take, prompt), tags


def prompt_lora_tags(prompts: Sequence[str],
                     negative_prompts: Sequence[str] = ()) -> tuple[list[str], list[str], list[LoraTag]]:
    """Prompts and negative prompts without tags, and the tags they ask for.

    A LoRA changes the model for the whole batch, so every batch item (prompt and negative prompt
    together) must ask for the same tags.
    """
    negatives = list(negative_prompts) or [""] * len(prompts)
    clean, clean_negatives, per_item = [], [], []
    for prompt, negative in zip(prompts, negatives):
        text, tags = parse_lora_tags(prompt)
        negative_text, negative_tags = parse_lora_tags(negative)
        clean.append(text)
        clean_negatives.append(negative_text)
        per_item.append(list(dict.fromkeys(tags + negative_tags)))
    if any(tags != per_item[0] for tags in per_item):
        raise InputError("the prompts of one batch ask for different <lora:...> tags; a LoRA changes the model "
                         "for the whole batch, so give every prompt the same tags or generate them separately")
    tags = per_item[0] if per_item else []
    names = [t.name for t in tags]
    if len(set(names)) != len(names):
        raise InputError(f"a prompt names a LoRA twice with different weights: {', '.join(names)}")
    return clean, clean_negatives, tags


def find_lora(name: str, search: Iterable) -> Path:
    """The LoRA file called `name` (its stem) among `search`'s files and folders (searched recursively)."""
    candidates: list[Path] = []
    for entry in search:
        path = Path(entry)
        if path.is_dir():
            candidates.extend(p for p in path.rglob("*") if p.suffix.lower() in LORA_SUFFIXES)
        elif path.suffix.lower() in LORA_SUFFIXES:
            candidates.append(path)
    exact = [p for p in candidates if p.stem == name]
    found = exact or [p for p in candidates if p.stem.lower() == name.lower()]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise InputError(f"several LoRA files are called '{name}': {', '.join(map(str, found))}; keep one")
    known = sorted({p.stem for p in candidates})
    listing = f"; known: {', '.join(known[:12])}" + (" ..." if len(known) > 12 else "") if known else ""
    raise InputError(f"no LoRA file called '{name}' (looked for {'/'.join(LORA_SUFFIXES)} files in the LoRA "
                     f"folders and --lora files){listing}")


def parse_lora_option(text: str) -> tuple[str, float]:
    """'FILE' or 'FILE:weight' (the CLI's --lora) -> (file, weight); a colon in the path stays."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def set_prompt_loras(pipe, tags: Sequence[LoraTag], search: Iterable = (), extra: Iterable = (),
                     mode: str = "merge") -> list[AppliedLora]:
    """Make the LoRAs of `tags` (files found in `search`) plus the `extra` requests the ones this function
    has applied, and return them.

    Unchanged files, weights and mode stay applied (no re-merging between generations with the same
    tags). The new set is read and matched before the old one is taken off, so an error leaves the
    model as it was. LoRAs applied directly with apply_lora are left alone.
    """
    search = list(search)
    wanted = [((find_lora(t.name, search), t.name), t.te_weight, t.unet_weight) for t in tags]
    wanted += [_request(item) for item in extra]
    stack = _STACKS.get(pipe.unet, [])
    current = [a for a in _PROMPT_LORAS.get(pipe.unet, []) if a in stack]  # unload_loras may have taken some off
    if [(_source_key(s), te, unet, mode) for s, te, unet in wanted] == \
            [(_source_key(a.lora), a.te_weight, a.unet_weight, a.mode) for a in current]:
        return current
    planned = _plan(pipe, [(read_lora(*s) if isinstance(s, tuple) else s, te, unet) for s, te, unet in wanted], mode)
    for applied in reversed(current):
        applied.unload()
    _PROMPT_LORAS[pipe.unet] = _activate(pipe, planned)
    return _PROMPT_LORAS[pipe.unet]


_PROMPT_LORAS: "weakref.WeakKeyDictionary[nn.Module, list[AppliedLora]]" = weakref.WeakKeyDictionary()


def _source_key(source) -> object:
    """What makes two requests the same LoRA: its file and name, or the very object."""
    if isinstance(source, Lora):
        return (os.path.abspath(source.path), source.name) if source.path else id(source)
    if isinstance(source, tuple):  # (file, name) of a prompt tag
        return (os.path.abspath(source[0]), source[1])
    if isinstance(source, (str, os.PathLike)):
        return (os.path.abspath(source), Path(source).stem)
    return id(source)


def lora_hashes(applied: Iterable[AppliedLora]) -> Optional[str]:
    """The web UI's `Lora hashes` field: 'name: hash12, ...' with ':' and ',' dropped from names."""
    entries = []
    for a in applied:
        if a.lora.shorthash:
            entries.append(f"{a.lora.name.replace(':', '').replace(',', '')}: {a.lora.shorthash}")
    return ", ".join(entries) or None


def _weight_text(weight: float) -> str:
    return str(int(weight)) if float(weight).is_integer() else repr(float(weight))


def lora_request_tags(loras: Iterable) -> str:
    """The web UI's prompt tags for LoRAs asked for beside the prompt (`loras`: file | (file, weight) |
    (file, te_weight, unet_weight)): '<lora:stem:weight>' each, space-separated. The web UI knows LoRAs
    only as such tags, so an image's parameters carry them in its prompt; --lora-dir then finds the files."""
    tags = []
    for item in loras:
        source, te_weight, unet_weight = _request(item)
        if isinstance(source, Lora):
            name = source.name
        elif isinstance(source, (str, os.PathLike)):
            name = Path(source).stem
        else:
            name = "lora"  # a state dict has no file name; read_lora calls it so
        weights = _weight_text(te_weight)
        if unet_weight != te_weight:
            weights += f":{_weight_text(unet_weight)}"
        tags.append(f"<lora:{name}:{weights}>")
    return " ".join(tags)


def apply_prompt_adapters(pipe, prompts: Sequence[str], negative_prompts: Sequence[str], *, loras: Iterable = (),
                          lora_search: Iterable = (), mode: str = "merge") -> tuple[list[str], list[str], dict]:
    """What a pipeline does with adapters before encoding its prompts.

    Takes the `<lora:...>` tags out of the prompts, applies their files (found in `lora_search`) and
    the `loras` requests (set_prompt_loras), and returns the clean prompts, clean negative prompts
    and the web UI's infotext fields {"Lora hashes", "TI hashes"} (None when empty).
    """
    from .embeddings import ti_hashes, used_embeddings

    clean, clean_negatives, tags = prompt_lora_tags(list(prompts), list(negative_prompts))
    applied = set_prompt_loras(pipe, tags, lora_search, loras, mode)
    embeddings = used_embeddings(pipe.text_encoder, clean + clean_negatives)
    return clean, clean_negatives, {"Lora hashes": lora_hashes(applied), "TI hashes": ti_hashes(embeddings)}
