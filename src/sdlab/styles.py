"""Prompt styles as the popular SD web UI keeps them: a `styles.csv` with the columns
`name,prompt,negative_prompt`, each a piece of prompt the user picks by name.

    name,prompt,negative_prompt
    cinematic,"{prompt}, film grain, dramatic light",cartoon
    sharp,"highly detailed, sharp focus",blurry

A style's `{prompt}` is replaced by the user's prompt; a style without it is appended after ", ".
Negative prompts combine the same way. Several styles apply in the order given, each to the result
of the one before. The expanded prompt is what the model reads and what the image's parameters say.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import InputError

STYLES_FILE = "styles.csv"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def load_styles(path: str) -> dict[str, Style]:
    """The styles of a web UI styles.csv, by name (a later row of the same name wins, as in the web UI).

    The file may start with a byte-order mark (the web UI writes one); its older format, with a `text`
    column instead of `prompt` and no negative prompt, is read too.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            rows = list(csv.DictReader(file, skipinitialspace=True))
    except FileNotFoundError:
        raise InputError(f"styles file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"styles file {path} is a directory; give the styles.csv file") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read styles file {path}: {exc}") from None
    styles = {}
    for line, row in enumerate(rows, start=2):
        name, prompt = row.get("name"), row.get("prompt", row.get("text"))
        if name is None or prompt is None:
            raise InputError(f"{path}: a styles file needs the columns name,prompt,negative_prompt")
        if not name:
            raise InputError(f"{path}, line {line}: a style without a name")
        styles[name] = Style(name, prompt, row.get("negative_prompt") or "")
    return styles


def merge_prompt(style_text: str, prompt: str) -> str:
    """`style_text` with `{prompt}` replaced by `prompt`; without `{prompt}`, both joined by ", "
    (leaving out whichever is blank)."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative: str, names: Sequence[str], styles: Mapping[str, Style]) -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles applied in order.

    An unknown name raises InputError naming the styles there are."""
    unknown = [name for name in names if name not in styles]
    if unknown:
        known = ", ".join(sorted(styles)) or "none"
        raise InputError(f"unknown style '{unknown[0]}'; the styles file has: {known}")
    for name in names:
        prompt = merge_prompt(styles[name].prompt, prompt)
        negative = merge_prompt(styles[name].negative_prompt, negative)
    return prompt, negative


def default_styles_file() -> str | None:
    """`styles.csv` in the current folder when there is one (where the web UI keeps it), else None."""
    return STYLES_FILE if os.path.isfile(STYLES_FILE) else None
