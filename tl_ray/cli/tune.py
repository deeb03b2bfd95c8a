"""`tl-ray tune CONFIG.yaml --space SPACE.yaml [--trials N]` and `tl-ray tune --resume DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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

    if resume is not None:
        if config is not None or space is not None or set_ or sampler:
            raise ConfigError("--resume takes only the experiment folder (and --trials, --address)")
        best = resume_search(resume, address=address, trials=trials, echo=_echo)
    else:
        if config is None or space is None:
            raise ConfigError("give CONFIG.yaml and --space SPACE.yaml, or --resume DIR")
        overrides = list(set_)
        overrides += [f"search.trials={trials}"] if trials else []
        overrides += [f"search.sampler={sampler}"] if sampler else []
        cfg = load_config(config, overrides)
        fixed = [item.partition("=")[0].strip() for item in set_]
        best = run_search(cfg, load_space(space), address=address, fixed_keys=fixed, echo=_echo)
    emit(best)
