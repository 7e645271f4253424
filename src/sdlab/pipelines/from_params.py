"""Re-running an image from its parameters: the web UI's infotext fields read back as sdlab's options.

The inverse of params.generation_params (and of the hires, img2img and inpaint fields): an sdlab PNG
gives back exactly the options that made it, a web UI PNG the closest sdlab has. A single image re-runs
alone under its own seed, so "Batch size" and "Batch pos" are not read back; LoRA tags stay in the prompt,
where the run finds them (the web UI does the same).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from ..config import NOISE_MODES
from ..errors import InputError
from ..fast.modes import parse_fast
from ..infotext import parse_infotext
from ..samplers import sampler_and_schedule_names
from ..schedules import resolve_schedule
from .hires import hires_upscaler_key
from .images import RESIZE_MODES

# the web UI's "RNG" (its randn source) -> sdlab's noise mode giving its numbers. A missing RNG is the web
# UI's default, GPU; "NV" is its CPU copy of the NVIDIA numbers, which a1111-gpu computes on any device.
# sdlab writes "Noise" beside RNG for its own modes, and that field is read first.
_NOISE_OF_RNG = {"CPU": "a1111-cpu", "GPU": "a1111-gpu", "NV": "a1111-gpu"}

# fields that name things a run does not set: the model (InfotextOptions.model), the adapters' hashes (the
# tags in the prompt pick them), the writer, and the batch the image was one of (it re-runs alone)
_INFORMATIONAL = {"Model", "Model hash", "VAE", "VAE hash", "Lora hashes", "TI hashes", "Version", "Batch size",
                  "Batch pos", "Prediction"}

# the web UI's "Masked content" and "Mask mode" / "Inpaint area" values
_MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


class InfotextOptions(NamedTuple):
    settings: dict  # pipeline keywords (GenerationOptions, EditOptions, MaskOptions names), prompts included
    hires: Optional[dict]  # HiresOptions keywords when the image had a hires pass, else None
    model: dict  # 'name', 'hash', 'vae', 'vae_hash', 'prediction': each only when the text names it
    notes: list  # one line per field that could not be used as written


def _size(text: str) -> Optional[tuple[int, int]]:
    width, height = (int(v) for v in text.lower().split("x"))
    return (width, height) if width > 0 and height > 0 else None


def _noise(fields: dict, notes: list) -> Optional[str]:
    if "Noise" in fields:
        if fields["Noise"] in NOISE_MODES:
            return fields["Noise"]
        notes.append(f"unknown Noise '{fields['Noise']}'; using the default noise")
        return None
    rng = fields.get("RNG", "GPU")
    if rng not in _NOISE_OF_RNG:
        notes.append(f"unknown RNG '{rng}'; using the default noise")
        return None
    return _NOISE_OF_RNG[rng]


def _sampler(fields: dict, settings: dict, notes: list) -> None:
    """'DPM++ 2M' and 'karras' from "Sampler" and "Schedule type", or from an old 'DPM++ 2M Karras' alone
    (no "Schedule type" field: the name's own schedule, else Automatic, as the web UI reads it)."""
    if "Sampler" not in fields:
        return
    try:
        name, label = sampler_and_schedule_names(fields["Sampler"], fields.get("Schedule type"))
    except InputError as exc:
        notes.append(f"{exc}; using the default sampler")
        return
    settings["sampler"] = name
    schedule = resolve_schedule(label).key
    settings["schedule_type"] = None if schedule == "automatic" else schedule


def _hires(fields: dict, size: Optional[tuple[int, int]], notes: list) -> Optional[dict]:
    """The hires pass, from "Hires upscale" (or "Hires resize" that scales both sides alike)."""
    if "Hires upscale" in fields:
        scale = float(fields["Hires upscale"])
    elif "Hires resize" in fields and size is not None:
        target = _size(fields["Hires resize"])
        if target is None or target[0] * size[1] != target[1] * size[0]:
            notes.append(f"Hires resize {fields['Hires resize']} is not one scale of {size[0]}x{size[1]}; "
                         "no hires pass")
            return None
        scale = target[0] / size[0]
    else:
        return None
    hires = {"hires_scale": scale}
    if "Denoising strength" in fields:
        hires["hires_strength"] = float(fields["Denoising strength"])
    steps = int(fields.get("Hires steps", 0))
    hires["hires_steps"] = steps or None  # the web UI's 0: as many as the first pass
    upscaler = fields.get("Hires upscaler")
    if upscaler is not None:
        try:
            hires["hires_upscaler"] = hires_upscaler_key(upscaler)
        except InputError:
            closest = "latent" if upscaler.lower().startswith("latent") else "lanczos"
            notes.append(f"hires upscaler '{upscaler}' is not sdlab's; using {closest}")
            hires["hires_upscaler"] = closest
    return hires


def _edit_and_mask(fields: dict, settings: dict, notes: list) -> None:
    """img2img and inpaint fields; a txt2img run leaves out the ones it does not take."""
    if "Resize mode" in fields:
        modes = {label: key for key, label in RESIZE_MODES.items()}
        if fields["Resize mode"] in modes:
            settings["resize_mode"] = modes[fields["Resize mode"]]
        else:
            notes.append(f"resize mode '{fields['Resize mode']}' is not sdlab's")
    if "Mask blur" in fields:
        settings["mask_blur"] = float(fields["Mask blur"])
    if "Masked content" in fields:
        if fields["Masked content"] in _MASKED_CONTENT:
            settings["fill"] = fields["Masked content"]
        else:
            notes.append(f"masked content '{fields['Masked content']}' is not sdlab's")
    if fields.get("Inpaint area") == "Only masked":
        settings["only_masked"] = True
        if "Masked area padding" in fields:
            settings["padding"] = int(fields["Masked area padding"])
    if fields.get("Mask mode") == "Inpaint not masked":
        settings["invert_mask"] = True


def _fast(text: str) -> str:
    """"Fast: deepcache:3,tome:0.5" (sdlab's fast modes) as the spec the run takes, checked."""
    try:
        return parse_fast(text).spec()
    except InputError as exc:
        raise ValueError(str(exc)) from None


# field -> (pipeline keyword, how its text is read)
_SIMPLE = {
    "Steps": ("steps", int),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int),
    "Eta": ("eta", float),
    "Eta DDIM": ("eta", float),  # the web UI's name for DDIM's eta
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Seed resize from": ("seed_resize_from", _size),
    "Tiling": ("tiling", lambda text: text == "True"),
    "Fast": ("fast", _fast),
    "Self-attention scale": ("self_attention_scale", float),
}

# fields read by the functions above
_READ_APART = {"Sampler", "Schedule type", "Size", "RNG", "Noise", "Denoising strength", "Hires upscale",
               "Hires resize", "Hires steps", "Hires upscaler", "Resize mode", "Mask blur", "Masked content",
               "Inpaint area", "Masked area padding", "Mask mode"}


def options_from_infotext(text: str) -> InfotextOptions:
    """An image's `parameters` text as the options that re-make it. Fields with a value sdlab cannot read
    and fields it does not know are left out, each said in `notes`; nothing here fails."""
    fields = parse_infotext(text)
    settings = {"prompt": fields.pop("Prompt"), "negative_prompt": fields.pop("Negative prompt")}
    notes = []
    for field, (name, read) in _SIMPLE.items():
        if field in fields:
            try:
                value = read(fields[field])
            except ValueError:
                notes.append(f"cannot read {field}: '{fields[field]}'")
                continue
            if value is not None:
                settings[name] = value
    size = None
    if "Size" in fields:
        try:
            size = _size(fields["Size"])
        except ValueError:
            notes.append(f"cannot read Size: '{fields['Size']}'")
        if size is not None:
            settings["width"], settings["height"] = size
    _sampler(fields, settings, notes)
    noise = _noise(fields, notes)
    if noise is not None:
        settings["noise"] = noise
    try:
        hires = _hires(fields, size, notes)
    except ValueError:
        notes.append("cannot read the Hires fields")
        hires = None
    try:
        if hires is None and "Denoising strength" in fields:
            settings["strength"] = float(fields["Denoising strength"])
        _edit_and_mask(fields, settings, notes)
    except ValueError:
        notes.append("cannot read the img2img or inpaint fields")
    model = {key: fields[field] for key, field in (("name", "Model"), ("hash", "Model hash"), ("vae", "VAE"),
                                                    ("vae_hash", "VAE hash"), ("prediction", "Prediction"))
             if field in fields}
    unknown = [field for field in fields if field not in _SIMPLE and field not in _READ_APART
               and field not in _INFORMATIONAL]
    if unknown:
        notes.append(f"fields sdlab does not use: {', '.join(unknown)}")
    return InfotextOptions(settings, hires, model, notes)
