"""Whether a state dict fits the module it is meant for, said in one line a user can act on.

`load_state_dict(strict=True)` would list every key, often hundreds of them; this says how many keys
are missing, how many unexpected and how many shapes differ, with a few examples of each.
"""

from __future__ import annotations

from typing import Mapping


def key_problems(expected: Mapping, state_dict: Mapping, prefix: str = "") -> list[str]:
    """What keeps `state_dict` from loading strictly into a module whose state dict is `expected`
    ([] when it fits). `prefix` is put before each key named, to name it as the file does."""
    missing = [prefix + k for k in expected if k not in state_dict]
    unexpected = [prefix + k for k in state_dict if k not in expected]
    shapes = [
        f"{prefix + k} is {tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shapes differ ({'; '.join(shapes[:3])})")
    return problems
