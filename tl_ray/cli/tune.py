"""`tl-ray tune CONFIG.yaml --space SPACE.yaml [--trials N]` and `tl-ray tune --resume DIR`.

Ctrl-C or SIGTERM stops the search gracefully (Ray Tune ends its trials; each trial's last
checkpoint stays): the command then says how far it got and exits 130 / 143, and
`tl-ray tune --resume DIR` continues it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Optional

import typer

from tl_ray.cli import signals
from tl_ray.cli.app import app, emit
from tl_ray.errors import ConfigError


def _echo(line: str) -> None:
    typer.echo(line, err=True)


@app.command()
def tune(
    config: Optional[Path] = typer.Argument(None, help="Run config YAML (as for train)."),
    space: Optional[Path] = typer.Option(None, help="Search space YAML (see search_spaces/)."),
    trials: Optional[int] = typer.Option(None, min=1, help="Number of trials (search.trials)."),
    sampler: Optional[str] = typer.Option(None, help="tpe | random | cmaes | gp (search.sampler)."),
    set_: list[str] = typer.Option([], "--set", help="Fix a config key: key.path=value."),
    resume: Optional[Path] = typer.Option(None, help="Continue the search in this folder."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default: local."),
) -> None:
    """Search learning rate, unfreeze depth and more with Ray Tune + Optuna."""
    from tl_ray.config import load_config
    from tl_ray.search.space import load_space
    from tl_ray.search.tune import resume_search, run_search

    folder: Path | None = None
    with signals.sigterm_as_sigint():  # SIGTERM: Tune's graceful stop, as Ctrl-C
        try:
            if resume is not None:
                if config is not None or space is not None or set_ or sampler:
                    raise ConfigError("--resume takes only the experiment folder (and --trials, --address)")
                folder = resume.expanduser().resolve()
                best = resume_search(resume, address=address, trials=trials, echo=_echo)
            else:
                if config is None or space is None:
                    raise ConfigError("give CONFIG.yaml and --space SPACE.yaml, or --resume DIR")
                overrides = list(set_)
                overrides += [f"search.trials={trials}"] if trials else []
                overrides += [f"search.sampler={sampler}"] if sampler else []
                cfg = load_config(config, overrides)
                folder = Path(cfg.output).expanduser().resolve()
                fixed = [item.partition("=")[0].strip() for item in set_]
                best = run_search(cfg, load_space(space), address=address, fixed_keys=fixed, echo=_echo)
        except KeyboardInterrupt:  # a stop before Tune took over, or a second one during its stop
            _interrupted(folder, None)
    left = _unfinished(folder, trials)
    if left is not None:  # Tune was stopped (Ctrl-C, SIGTERM) and returned what it had
        _interrupted(folder, left)
    emit(best)


def _unfinished(folder: Path, trials: int | None) -> tuple[int, int] | None:
    """(finished, wanted) when the search in `folder` has trials left (Tune was stopped)."""
    from tl_ray.config import parse_config
    from tl_ray.search.space import parse_space
    from tl_ray.search.study import finished_trials, open_study
    from tl_ray.search.tune import SEARCH_FILE

    saved = json.loads((folder / SEARCH_FILE).read_text(encoding="utf-8"))
    cfg = parse_config(saved["config"])
    wanted = trials or cfg.search.trials
    url = cfg.search.storage or f"sqlite:///{folder / 'study.db'}"
    _, study = open_study(url, saved["study"], parse_space(saved["space"]).mode)
    done = finished_trials(study)
    return None if done >= wanted else (done, wanted)


def _interrupted(folder: Path | None, left: tuple[int, int] | None) -> None:
    stop = signal.Signals((signals.received() or [signal.SIGINT])[-1])
    progress = f"{left[0]} of {left[1]} trials finished; " if left else ""
    from tl_ray.search.tune import SEARCH_FILE

    started = folder is not None and (folder / SEARCH_FILE).is_file()
    resume = f"continue with `tl-ray tune --resume {folder}`" if started else "no search was started"
    typer.echo(f"interrupted ({stop.name}): {progress}{resume}", err=True)
    raise typer.Exit(signals.EXIT_CODES[stop])
