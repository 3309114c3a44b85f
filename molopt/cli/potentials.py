"""``molopt potentials``: the shipped potentials (:func:`molopt.potentials.registry.shipped`)."""

from __future__ import annotations

import json as jsonlib
from typing import Annotated

import typer

from molopt.cli import reported


def potentials(
    json: Annotated[bool, typer.Option("--json", help="JSON list on stdout.")] = False,
):
    """List the shipped potentials."""
    from molopt.cli.display import potentials_table
    from molopt.potentials import registry

    with reported():
        specs = registry.shipped()
    rows = _rows(specs)
    if json:
        typer.echo(jsonlib.dumps(rows, indent=1))
    else:
        potentials_table(rows)


def _rows(specs: dict) -> list[dict]:
    """One JSON-ready row per potential, by name; ``elements`` as symbols (``any``: all)."""
    from molopt import elements as el

    return [
        {
            "name": name,
            "kind": spec.kind,
            "elements": [el.symbol(z) for z in spec.elements] or ["any"],
            "cutoff": spec.data.get("cutoff"),
            "description": spec.description,
            "path": str(spec.path),
        }
        for name, spec in sorted(specs.items())
    ]
