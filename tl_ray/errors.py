"""The exceptions tl-ray raises for bad input; the CLI maps each to one line and exit code 2."""

from __future__ import annotations

__all__ = ["TLRayError", "ConfigError", "DataError", "BackboneError", "CheckpointError"]


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
