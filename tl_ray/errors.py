"""The exceptions tl-ray raises for bad input; the CLI maps each to one line and exit code 2."""

from __future__ import annotations

from typing import Any

__all__ = [
    "TLRayError", "ConfigError", "DataError", "BackboneError", "CheckpointError",
    "brief", "first_line", "shown",
]


class TLRayError(Exception):
    """Base class: a problem with what the user gave us, stated in one line."""


class ConfigError(TLRayError):
    """A config file or option is missing, malformed or out of range."""


class DataError(TLRayError):
    """A dataset file cannot be read or does not have the expected shape."""


class BackboneError(TLRayError):
    """A backbone is unknown, cannot be loaded, or cannot honour the requested setting."""


class CheckpointError(TLRayError):
    """A checkpoint folder is missing files or was written by an incompatible version."""


# Message helpers: how a user's value or name goes into a one-line error.

def brief(value: Any, limit: int = 80) -> str:
    """repr(value) on one line, cut to about `limit` characters, for error messages.

    >>> brief("x" * 100, limit=10)
    "'xxxxxx..."
    """
    try:
        text = repr(value)
    except ValueError:  # an int past Python's int-to-string digit limit
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(name: object, limit: int = 80) -> str:
    """A user-given name as it goes into a one-line message, inside quotes: as is when printable
    and short, else with line breaks and control characters escaped, cut to `limit` characters.

    >>> shown("train.lr"), shown("a\\nb")
    ('train.lr', 'a\\\\nb')
    """
    text = str(name)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(text: str, limit: int = 300) -> str:
    """The first line of `text`, cut to `limit` characters."""
    line = (text.splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."
