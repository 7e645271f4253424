"""A run's resolved settings as a recipe: OUT/config.toml, which `--config OUT/config.toml` reads back to
the same TrainConfig, and the compact summary a run prints as it starts.

The file has the layout of recipes/*.toml: the shared keys first, then the trainer's section ([lora]),
the sections a package added ([shapes]) and a [model] table when the model was given as one. TOML has
no null, so an unset key (None) is left out, which reads back as its default: every option that can be
unset defaults to unset. Written by hand for the few value types a recipe holds (strings, integers,
floats, booleans, lists, tables), so no TOML-writing dependency is needed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap

from .config import TrainConfig

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def recipe_values(config: TrainConfig) -> dict:
    """`config` as the plain tables of a recipe (what build_config reads), unset keys left out."""
    values = {"trainer": config.trainer}
    for field in dataclasses.fields(config):
        if field.name not in ("trainer", "options", "sections"):
            values[field.name] = getattr(config, field.name)
    values[config.trainer] = dataclasses.asdict(config.options)
    for name, options in config.sections.items():
        values[name] = dataclasses.asdict(options)
    return _without_unset(values)


def _without_unset(table: dict) -> dict:
    return {key: _without_unset(value) if isinstance(value, dict) else value
            for key, value in table.items() if value is not None}


def toml_value(value) -> str:
    """One TOML value: a string, number, boolean or list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # '1e-06', '4.0', 'inf', '-inf': all TOML floats
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r} ({type(value).__name__})")


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes and backslashes escaped, control characters as \\u and four hex digits."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if " " <= c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped) + '"'


def _toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else _toml_string(key)


def toml_text(table: dict, path: tuple[str, ...] = ()) -> str:
    """A TOML document of nested dicts: each level's plain keys, then its tables as [a.b] headers."""
    lines = [f"{_toml_key(key)} = {toml_value(value)}" for key, value in table.items() if not isinstance(value, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            inner = path + (key,)
            lines += ["", f"[{'.'.join(_toml_key(k) for k in inner)}]", toml_text(value, inner).strip("\n")]
    return "\n".join(lines) + "\n"


def recipe_toml(config: TrainConfig) -> str:
    """OUT/config.toml's text."""
    return f"# the resolved settings of `sdlab train {config.trainer}`; rerun with --config\n" + \
        toml_text(recipe_values(config))


def settings_summary(config: TrainConfig, width: int = 110) -> str:
    """The resolved settings in a few lines: the shared keys, then one paragraph per table."""

    def paragraphs(table: dict, path: tuple[str, ...] = ()) -> list[str]:
        title = f"[{'.'.join(path)}] " if path else ""
        plain = ", ".join(f"{key}={toml_value(value)}" for key, value in table.items() if not isinstance(value, dict))
        lines = textwrap.wrap(title + plain, width, initial_indent="  ", subsequent_indent="      ",
                              break_on_hyphens=False)
        for key, value in table.items():
            if isinstance(value, dict):
                lines += paragraphs(value, path + (key,))
        return lines

    values = recipe_values(config)
    del values["trainer"]  # the title names it
    return "\n".join([f"sdlab: train {config.trainer} with these settings:", *paragraphs(values)])
