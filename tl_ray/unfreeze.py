"""Unfreeze schedules: which unfreeze depth is in force at each epoch (pure; no torch, no TF).

`backbone.unfreeze_schedule` is a list of `[epoch, depth]` steps or a `gradual` rule. Epochs
count from 1, as the `epoch` metric does: a step `[3, 4]` trains epochs 3, 4, ... at depth 4
(up to the next step), so epoch 3's metrics are the first to report `unfreeze_depth: 4`.
Before the first step the depth is `base` (the backbone's `unfreeze_depth`, or 0 when that
is null; keras-image trains the head alone there, its head phase). The rule
`{gradual: {start: s, every: n, step: k}}` is the list `[[s, base], [s+n, base+k], ...]`,
capped at the layer count.

Example:
    >>> schedule = parse_schedule({"gradual": {"start": 1, "every": 2}})
    >>> [depth_at(schedule, epoch, base=0, layers=2) for epoch in range(1, 7)]
    [0, 0, 1, 1, 2, 2]
    >>> depth_at([[2, 1], [4, 3]], 1, base=0, layers=6), depth_at([[2, 1], [4, 3]], 5, base=0, layers=6)
    (None, 3)
"""

from __future__ import annotations

from typing import Any

__all__ = ["GRADUAL_DEFAULTS", "check_base", "check_epochs", "depth_at", "max_depth", "parse_schedule",
           "steps_of"]

GRADUAL_DEFAULTS = {"start": 1, "every": 1, "step": 1}
_MINIMUM = {"start": 0, "every": 1, "step": 1}
FIELD = "backbone.unfreeze_schedule"


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_schedule(value: Any) -> list[list[int]] | dict[str, dict[str, int]] | None:
    """A schedule as given in YAML, checked and normalised; ValueError (one line) if malformed.

    >>> parse_schedule({"gradual": {}})
    {'gradual': {'start': 1, 'every': 1, 'step': 1}}
    >>> parse_schedule([[1, 0], [1, 2]])
    Traceback (most recent call last):
    ValueError: epochs must be strictly increasing, but got [[1, 0], [1, 2]] (epoch 1 after 1)
    """
    if value is None:
        return None
    if isinstance(value, dict):
        return _parse_rule(value)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a list of [epoch, depth] steps like [[1, 0], [3, 2]] or "
                         f"{{gradual: {{start: 1, every: 1, step: 1}}}}, but got {value!r}"[:300])
    steps: list[list[int]] = []
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or not all(_integer(v) for v in item)):  # fmt: skip
            raise ValueError(f"each step must be a pair of integers [epoch, depth], but got {item!r}"[:300])
        if item[0] < 0 or item[1] < 0:
            raise ValueError(f"epochs and depths must be >= 0, but got [{item[0]}, {item[1]}]")
        steps.append([int(item[0]), int(item[1])])
    for before, after in zip(steps, steps[1:]):
        if after[0] <= before[0]:
            raise ValueError(f"epochs must be strictly increasing, but got {steps} "
                             f"(epoch {after[0]} after {before[0]})"[:300])
        if after[1] < before[1]:
            raise ValueError(f"depths must not decrease (a schedule only unfreezes), but got {steps} "
                             f"(depth {after[1]} after {before[1]})"[:300])
    return steps


def _parse_rule(value: dict) -> dict[str, dict[str, int]]:
    if set(value) != {"gradual"} or not isinstance(value["gradual"], (dict, type(None))):
        raise ValueError(f"a rule must be {{gradual: {{start: 1, every: 1, step: 1}}}}, but got {value!r}"[:300])
    rule = dict(value["gradual"] or {})
    unknown = sorted(set(rule) - set(GRADUAL_DEFAULTS), key=str)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in gradual; allowed: start, every, step")
    merged = {**GRADUAL_DEFAULTS, **rule}
    for key, number in merged.items():
        if not _integer(number) or number < _MINIMUM[key]:
            raise ValueError(f"gradual.{key} must be an integer >= {_MINIMUM[key]}, but got {number!r}"[:300])
    return {"gradual": {key: int(merged[key]) for key in GRADUAL_DEFAULTS}}


def check_epochs(schedule: Any, epochs: int) -> None:
    """ValueError unless every step can take effect within epochs 1..`epochs`."""
    if schedule is None:
        return
    if isinstance(schedule, dict):
        start = schedule["gradual"]["start"]
        if start > epochs:
            raise ValueError(f"{FIELD}: gradual.start ({start}) must be <= train.epochs ({epochs}); "
                             "epochs count from 1, like the epoch metric")
        return
    last = schedule[-1][0]
    if last > epochs:
        raise ValueError(f"{FIELD}: a step at epoch {last} is past train.epochs ({epochs}) and would "
                         "never take effect; epochs count from 1, like the epoch metric")


def check_base(schedule: Any, base: int | None) -> None:
    """ValueError when the first step would lower the depth in force before it."""
    if base is None or not isinstance(schedule, list) or schedule[0][0] <= 1:
        return
    if schedule[0][1] < base:
        raise ValueError(f"{FIELD}: depths must not decrease (a schedule only unfreezes), but the first "
                         f"step [{schedule[0][0]}, {schedule[0][1]}] follows backbone.unfreeze_depth {base}")


def max_depth(schedule: Any) -> int:
    """The deepest step of a list (0 for a rule: it is capped at the layer count)."""
    return max((depth for _, depth in schedule), default=0) if isinstance(schedule, list) else 0


def depth_at(schedule: Any, epoch: int, *, base: int, layers: int) -> int | None:
    """The depth in force at `epoch` (1-based), or None before the first step."""
    if isinstance(schedule, dict):
        rule = schedule["gradual"]
        if epoch < rule["start"]:
            return None
        return min(layers, max(base, 0) + rule["step"] * ((epoch - rule["start"]) // rule["every"]))
    found = None
    for step_epoch, depth in schedule or ():
        if step_epoch <= epoch:
            found = depth
    return found


def steps_of(schedule: Any, *, base: int, layers: int, epochs: int) -> list[tuple[int, int]]:
    """The (epoch, depth) pairs at which the depth changes within epochs 1..`epochs`.

    >>> steps_of({"gradual": {"start": 2, "every": 1, "step": 4}}, base=0, layers=6, epochs=9)
    [(2, 0), (3, 4), (4, 6)]
    """
    found: list[tuple[int, int]] = []
    for epoch in range(1, epochs + 1):
        depth = depth_at(schedule, epoch, base=base, layers=layers)
        if depth is not None and (not found or found[-1][1] != depth):
            found.append((epoch, depth))
    return found
