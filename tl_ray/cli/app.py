"""The `tl-ray` command: a typer app; each command lives in its own small module."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer

from tl_ray.errors import TLRayError

__all__ = ["app", "emit", "main"]

app = typer.Typer(
    name="tl-ray",
    help="Transfer learning on Ray: fine-tune pretrained backbones, search, and serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Ray's own logs live (always in OUTPUT/ray.log)."
    ),
) -> None:
    from tl_ray import ray_logs

    _state["debug"] = debug
    ray_logs.quiet(verbose)  # Ray's chatter to the experiment folder's ray.log, not here


def _global_flags_first(argv: list[str]) -> list[str]:
    """`tl-ray tune x.yaml --verbose` works as `tl-ray --verbose tune x.yaml` does.

    >>> _global_flags_first(["tune", "x.yaml", "--verbose", "--", "-v"])
    ['--verbose', 'tune', 'x.yaml', '--', '-v']
    """
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [arg for arg in argv[:end] if arg in _GLOBAL_FLAGS]
    return flags + [arg for arg in argv[:end] if arg not in _GLOBAL_FLAGS] + argv[end:]


_GLOBAL_FLAGS = ("--verbose", "-v", "--debug")


def emit(payload: Any) -> None:
    """Print one JSON line to stdout (the machine-readable output of every command)."""
    print(json.dumps(payload, sort_keys=True), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: TLRayError becomes one line on stderr and exit code 2."""
    from tl_ray.cli import evaluate, jobs, predict, query, report, serve, submit, train, tune  # noqa: F401  (registers commands)
    from tl_ray.cli import export  # noqa: F401  (`tl-ray export`)
    from tl_ray.cli import w2v  # noqa: F401  (the `w2v` sub-app: train, update, eval)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # Without standalone mode click *returns* the code of a typer.Exit (and 130 for a
        # KeyboardInterrupt) instead of raising it; commands themselves return None.
        code = app(args=_global_flags_first(sys.argv[1:] if argv is None else list(argv)), standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            return code
    except TLRayError as error:
        if _state["debug"]:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as error:  # click usage errors carry their own exit code and message
        if hasattr(error, "show") and isinstance(getattr(error, "exit_code", None), int):
            error.show()
            return error.exit_code
        raise
    return 0


def console_main() -> None:
    sys.exit(main())
