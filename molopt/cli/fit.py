"""``molopt fit``: Lennard-Jones parameters fitted by :class:`molopt.analysis.fitting.Fit`."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer

from molopt.cli import Overwrite, err, output_file, reported


def fit(
    config: Annotated[
        str, typer.Argument(help="Fit settings: a TOML file or a preset name (e.g. fit-argon).")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Fitted potential file.")],
    steps: Annotated[int | None, typer.Option(min=1, help="Override the config's steps.")] = None,
    json: Annotated[bool, typer.Option("--json", help="Report as JSON on stdout.")] = False,
    overwrite: Overwrite = False,
):
    """Fit Lennard-Jones parameters to properties of relaxed structures (implicit gradients).
    CONFIG is a file or the name of a fit preset in configs/ (fit-*.toml)."""
    from molopt import config as cfg
    from molopt.analysis.fitting import Fit, FitConfig
    from molopt.cli.display import fit_progress, fit_report

    output_file(output, overwrite)
    with reported():
        settings = FitConfig.from_toml(cfg.config_path(config, "fit"))
        if steps is not None:
            settings.steps = steps
        fitter = Fit(settings)
    with reported(RuntimeError, code=1):  # RuntimeError: the fit itself went wrong
        report = fitter.run(fit_progress(err, quiet=json))
    path = fitter.write(Path(output))
    if json:
        typer.echo(jsonlib.dumps({**report, "output": str(path)}, indent=1, default=float))
        return
    fit_report(report, err)
    err.print(f"wrote {path}")
