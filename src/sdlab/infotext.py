"""Generation parameters as the popular SD web UI writes them into a PNG's `parameters` text chunk.

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

Values that contain a comma, colon or newline are written as JSON strings, as the web UI does, so
existing readers (the web UI's "PNG Info" tab, civitai, image browsers) parse them.
"""

from __future__ import annotations

import json
import re


def _quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _format_number(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """`params` is an ordered dict of web-UI names to values; None values are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = ", ".join(
        f"{key}: {_quote(_format_number(value))}" for key, value in params.items() if value is not None
    )
    lines.append(fields)
    return "\n".join(lines)


_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    """Inverse of format_infotext: {'Prompt', 'Negative prompt', and each field as a string}."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:  # no parameter line: the whole text is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _FIELD.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        result[key.strip()] = value
    return result
