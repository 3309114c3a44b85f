"""``molopt hessian``: the vibrational analysis of :func:`molopt.hessian_report.report`."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer

from molopt.cli import reported


def hessian(
    structure: Annotated[str, typer.Argument(help="Structure file (first frame unless --index).")],
    potential: Annotated[str | None, typer.Option("--potential", "-p")] = None,
    index: Annotated[str, typer.Option(help="Frame (ASE index).")] = "0",
    json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Also write the JSON here.")
    ] = None,
):
    """Hessian eigenvalues (eV/A^2) and harmonic frequencies (cm^-1) of a structure, from the
    exact (autodiff) Hessian; negative numbers are imaginary modes."""
    from molopt.cli.display import hessian_table
    from molopt.hessian_report import report

    with reported():
        result = report(structure, potential, index)
    if output:
        Path(output).write_text(jsonlib.dumps(result, indent=1))
    if json:
        typer.echo(jsonlib.dumps(result, indent=1))
    else:
        hessian_table(result)
