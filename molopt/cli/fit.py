"""``molopt fit``: Lennard-Jones parameters fitted by :class:`molopt.analysis.fitting.Fit`."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer

from molopt.cli import err, reported


def fit(
    config: Annotated[
        str, typer.Argument(help="Fit settings (TOML), e.g. configs/fit-argon.toml.")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Fitted potential file.")],
    steps: Annotated[int | None, typer.Option(help="Override the config's steps.")] = None,
    json: Annotated[bool, typer.Option("--json", help="Report as JSON on stdout.")] = False,
):
    """Fit Lennard-Jones parameters to properties of relaxed structures (implicit gradients)."""
    from molopt.analysis.fitting import Fit, FitConfig
    from molopt.cli.display import fit_progress, fit_report

    with reported():
        settings = FitConfig.from_toml(config)
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
