"""The opt-in fast modes, as a user names them: `--fast deepcache:3,cfg-trunc:0.8,tome:0.5`.

Each mode trades the exact image for time, so none is on unless asked for, and an image made with one
says so in its parameters ("Fast: deepcache:3"). What each costs in quality is measured by
benchmarks/fast_modes.py (docs/performance-fast-modes.md).

- deepcache:N[:D[:S]]  the whole UNet every N-th call, only its shallow branch (skip connection D, default 1)
                   in between, reusing the deep features (Ma et al. 2023, "DeepCache"; fast/deepcache.py);
                   with S, the first share S of the steps all run whole (they decide the layout)
- cfg-trunc:F      no unconditional pass after fraction F of the steps: guidance shapes the layout early
                   on and matters little for the last details (guidance.CFGDenoiser)
- tome:R           merge fraction R of the full-resolution image tokens before self-attention, unmerge
                   after (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"; fast/tome.py)

This module needs no torch, so the command line can check a spec before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..errors import InputError

DEFAULT_DEEPCACHE_DEPTH = 1  # conv_in and the first block: DeepCache's choice for SD 1.5 (its sec. 4.1)
MAX_TOKEN_MERGING = 0.75  # one token in four is a merge destination, so at most three in four can move
SPEC_HELP = "deepcache:N[:D[:S]], cfg-trunc:F or tome:R, comma-separated (e.g. deepcache:3,tome:0.5)"


@dataclass(frozen=True)
class FastModes:
    """Which fast modes a run uses; every field None is the exact network."""

    deepcache: Optional[int] = None  # N: full UNet every N calls (1 is the exact network)
    deepcache_depth: int = DEFAULT_DEEPCACHE_DEPTH  # D: the skip connection where the cached features join
    deepcache_whole_first: float = 0.0  # S in [0, 1): the first share S of the steps run the whole UNet
    cfg_truncation: Optional[float] = None  # F in [0, 1]: steps from F * steps on run the conditional pass only
    token_merging: Optional[float] = None  # R in (0, 0.75]: share of full-resolution tokens merged

    @property
    def exact(self) -> bool:
        return self.deepcache is None and self.cfg_truncation is None and self.token_merging is None

    def spec(self) -> Optional[str]:
        """The modes as `--fast` takes them (and the images' "Fast" field writes them); None when exact."""
        parts = []
        if self.deepcache is not None:
            suffix = ""  # D is written when it is not the default or when S follows it
            if self.deepcache_whole_first:
                suffix = f":{self.deepcache_depth}:{self.deepcache_whole_first:g}"
            elif self.deepcache_depth != DEFAULT_DEEPCACHE_DEPTH:
                suffix = f":{self.deepcache_depth}"
            parts.append(f"deepcache:{self.deepcache}{suffix}")
        if self.cfg_truncation is not None:
            parts.append(f"cfg-trunc:{self.cfg_truncation:g}")
        if self.token_merging is not None:
            parts.append(f"tome:{self.token_merging:g}")
        return ",".join(parts) or None


def _number(mode: str, text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise InputError(f"fast mode {mode} needs {what}, got '{text}'; use {SPEC_HELP}") from None


def parse_fast(text: str) -> FastModes:
    """'deepcache:3,tome:0.5' -> FastModes; an unknown mode, a bad value or a mode named twice is an
    InputError that says what is accepted. An empty text is the exact network."""
    values = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, rest = part.partition(":")
        name = name.strip().lower()
        if name in values:
            raise InputError(f"fast mode {name} is given twice in '{text}'; name each mode once")
        if name == "deepcache":
            interval, _, rest = rest.partition(":")
            depth, _, whole_first = rest.partition(":")
            values[name] = (_number(name, interval, int), _number(name, depth, int) if depth else None,
                            _number(name, whole_first, float) if whole_first else 0.0)
            if values[name][0] < 1 or (values[name][1] is not None and values[name][1] < 0):
                raise InputError(f"deepcache:N[:D[:S]] needs N >= 1 (1 is exact) and D >= 0, got '{part}'")
            if not 0 <= values[name][2] < 1:
                raise InputError(f"deepcache:N:D:S needs S, the share of the first steps run whole, from 0 to "
                                 f"below 1 (e.g. 0.3), got '{part}'")
        elif name == "cfg-trunc":
            values[name] = _number(name, rest, float)
            if not 0 <= values[name] <= 1:
                raise InputError(f"cfg-trunc:F needs a fraction of the steps, 0 to 1 (e.g. 0.8), got '{part}'")
        elif name == "tome":
            values[name] = _number(name, rest, float)
            if not 0 < values[name] <= MAX_TOKEN_MERGING:
                raise InputError(f"tome:R needs a share of tokens above 0 and at most {MAX_TOKEN_MERGING} "
                                 f"(e.g. 0.5), got '{part}'")
        else:
            raise InputError(f"unknown fast mode '{part}'; use {SPEC_HELP}")
    interval, depth, whole_first = values.get("deepcache", (None, None, 0.0))
    return FastModes(interval, DEFAULT_DEEPCACHE_DEPTH if depth is None else depth, whole_first,
                     values.get("cfg-trunc"), values.get("tome"))


def as_fast_modes(value: Union[None, str, FastModes]) -> FastModes:
    """GenerationOptions.fast as FastModes: None (exact), a spec text, or FastModes as they are."""
    if value is None:
        return FastModes()
    if isinstance(value, FastModes):
        return value
    if isinstance(value, str):
        return parse_fast(value)
    raise InputError(f"fast must be a text like 'deepcache:3,tome:0.5' or None, got {value!r}")
