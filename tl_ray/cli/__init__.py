"""Command-line interface; `tl-ray --help` lists the commands."""

from tl_ray.cli.app import main

__all__ = ["main"]
