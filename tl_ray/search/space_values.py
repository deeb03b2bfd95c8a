"""Values in search spaces: numbers and dotted paths as YAML gives them, choices as Optuna
stores them, and flat `--set` overrides (used by `tl_ray.search.space`, re-exported there).

Example:
    >>> to_overrides({"backbone.unfreeze_schedule": {"gradual": {"start": 2}}})
    ['backbone.unfreeze_schedule={gradual: {start: 2}}']
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from tl_ray.errors import brief
from tl_ray.errors import ConfigError

__all__ = ["STRUCTURED", "flatten", "to_overrides"]

DOC_END = "\n..."  # what yaml.safe_dump appends after a lone scalar
# Settings whose value is a list or mapping: `flatten` keeps them whole.
STRUCTURED = frozenset({"backbone.unfreeze_schedule"})


def _structured(choice: Any) -> bool:
    return isinstance(choice, (list, dict))


def _encode(choice: Any) -> Any:
    """What Optuna stores for a choice: a list or mapping as one line of YAML, else itself."""
    if not _structured(choice):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True, sort_keys=False, width=float("inf")).strip()


def _number(name: str, key: str, value: Any, integer: bool) -> float | int:
    """A number from YAML; numeric strings such as PyYAML's '1e-5' are accepted."""
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not _finite(number):
        raise ConfigError(f"{name}: `{key}` must be a finite number, but got ({key}={brief(value)})")
    if integer:
        if float(number) != int(number):
            raise ConfigError(f"{name}: `{key}` must be an integer, but got ({key}={brief(value)})")
        return int(number)
    return float(number)


def _finite(number: float | int) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def _check_path(path: Any, what: str) -> str:
    """A dotted config path as text; one that could not be a `--set` key is a ConfigError."""
    text = str(path)
    if not text.isprintable() or "=" in text or not all(text.split(".")):
        raise ConfigError(f"{what}: {brief(text)} is not a dotted config path like train.lr")
    return text


def _choice_key(choice: Any) -> tuple:
    """What makes two choices the same: type and value (1, 1.0 and True differ; NaN is NaN)."""
    if _structured(choice) or isinstance(choice, str):
        return ("text", _encode(choice))  # a list or mapping is its YAML text to Optuna
    return ("nan",) if isinstance(choice, float) and math.isnan(choice) else (type(choice), choice)


def _plain(value: Any, nested: bool = False) -> bool:
    """null, a bool, a number or a string; or a list or mapping (string keys) of those, whose
    numbers are finite and integers fit in 64 bits (so their YAML text reads back the same)."""
    if isinstance(value, list):
        return all(_plain(item, True) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item, True) for key, item in value.items())
    if nested and isinstance(value, float) and not math.isfinite(value):
        return False
    if nested and isinstance(value, int) and value.bit_length() > 63:
        return False
    return value is None or isinstance(value, (bool, int, float, str))


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted.key: leaf}, e.g. for `SearchSpace.sample(fixed=...)`.

    >>> flatten({"backbone": {"mode": "lora"}, "output": "runs/x"})
    {'backbone.mode': 'lora', 'output': 'runs/x'}
    """
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in STRUCTURED:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def to_overrides(params: dict[str, Any]) -> list[str]:
    """Sampled values -> `--set` strings that `apply_overrides` parses back exactly.

    >>> to_overrides({"train.lr": 1e-05, "backbone.mode": "lora"})
    ['train.lr=1.0e-05', 'backbone.mode=lora']
    """
    out = []
    for name, value in params.items():
        if hasattr(value, "item") and callable(value.item):  # numpy scalars
            value = value.item()
        text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).rstrip("\n")
        out.append(f"{name}={text.removesuffix(DOC_END).strip()}")
    return out
