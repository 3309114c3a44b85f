"""``molopt hessian``: the vibrational analysis of :func:`molopt.hessian_report.report`."""

from __future__ import annotations

import json as jsonlib
from typing import Annotated

import typer

from molopt.cli import Overwrite, err, fail, output_file, reported
from molopt.io.atomic import write_atomically


def hessian(
    structure: Annotated[str, typer.Argument(help="Structure file (first frame unless --index).")],
    potential: Annotated[
        str | None,
        typer.Option(
            "--potential",
            "-p",
            help="Shipped potential name or potential file. [default: a shipped potential "
            "covering the structure]",
        ),
    ] = None,
    index: Annotated[str, typer.Option(help="Frame of a multi-frame file (ASE index).")] = "0",
    json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Also write the JSON here.")
    ] = None,
    overwrite: Overwrite = False,
):
    """Hessian eigenvalues (eV/A^2) and harmonic frequencies (cm^-1) of a structure, from the
    exact (autodiff) Hessian; negative numbers are imaginary modes, and a structure that has
    them is not at a minimum (said on stderr and in the JSON)."""
    from molopt.config import parse_index

    try:
        parse_index(index)
    except ValueError as exc:
        fail(f"--index {exc}")
    if output:
        target = output_file(output, overwrite)
    from molopt.cli.display import hessian_table
    from molopt.hessian_report import report

    with reported():
        result = report(structure, potential, index)
    if result["warning"]:
        err.print(f"warning: {result['warning']}", markup=False, highlight=False)
    if output:
        text = jsonlib.dumps(result, indent=1)
        try:
            write_atomically(target, lambda tmp: tmp.write_text(text))
        except OSError as exc:
            fail(f"cannot write {output}: {exc}")
    if json:
        typer.echo(jsonlib.dumps(result, indent=1))
    else:
        hessian_table(result)
