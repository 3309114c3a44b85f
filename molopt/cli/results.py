"""Commands over finished trajectories: ``molopt info`` (:func:`molopt.io.h5md.summary`),
``molopt convert`` (:func:`molopt.api.read_trajectory`, written by ASE) and ``molopt plot``
(:func:`molopt.io.plot.plot_convergence`)."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer

from molopt.cli import err, fail


def _trajectories(paths: list[str]) -> list[Path]:
    """The files in ``paths``, a directory standing for its ``*.h5md``; exits 2 when a path
    does not exist or nothing is found."""
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files.extend(sorted(path.glob("*.h5md")))
        elif path.is_file():
            files.append(path)
        else:
            fail(f"{text}: no such file or directory")
    if not files:
        fail("no .h5md trajectories found in " + ", ".join(paths))
    return files


def info(
    paths: Annotated[list[str], typer.Argument(help="Trajectories (.h5md) or directories.")],
    json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
):
    """What is inside molopt trajectories; a directory is summarised by status."""
    from molopt.cli.display import trajectories_table

    rows = [_summary(path) for path in _trajectories(paths)]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("status") or "unknown"] = counts.get(r.get("status") or "unknown", 0) + 1
    if json:
        typer.echo(jsonlib.dumps({"trajectories": rows, "counts": counts}, indent=1))
    else:
        trajectories_table(rows, counts)


def _summary(path: Path) -> dict:
    """:func:`molopt.io.h5md.summary`, or a row with status ``unreadable`` and the error."""
    from molopt.io.h5md import summary

    try:
        return summary(path)
    except (OSError, KeyError) as exc:
        return {"file": str(path), "status": "unreadable", "error": str(exc)}


def convert(
    trajectory: Annotated[str, typer.Argument(help="A molopt trajectory (.h5md).")],
    output: Annotated[str, typer.Argument(help="Output file; format from its extension.")],
    frames: Annotated[str, typer.Option(help="ASE index syntax: -1, ::10, :")] = ":",
    format: Annotated[str | None, typer.Option(help="ASE format name (default: guess).")] = None,
):
    """Write trajectory frames in any format ASE writes (energies/forces where it can)."""
    from molopt.api import read_trajectory
    from molopt.io.ase_import import ase_io

    path = Path(trajectory)
    if not path.is_file():
        fail(f"{trajectory}: no such file")
    try:
        images = read_trajectory(path, frames)
    except (OSError, KeyError) as exc:
        fail(f"{trajectory}: not a molopt trajectory ({exc})")
    except (IndexError, ValueError) as exc:
        fail(f"--frames {frames}: {exc}")
    try:
        ase_io().write(output, images if len(images) > 1 else images[0], format=format)
    except Exception as exc:  # ASE raises many kinds for formats it cannot write
        fail(f"cannot write {output}: {exc}")
    err.print(f"wrote {len(images)} frame(s) to {output}")


def plot(
    trajectories: Annotated[list[str], typer.Argument(help="Trajectories or directories.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Image file (png, pdf, svg).")],
    relative: Annotated[bool, typer.Option(help="Energies relative to each final energy.")] = True,
):
    """Energy and fmax (log scale) against optimizer step, one line per trajectory."""
    from molopt.io.plot import plot_convergence

    files = _trajectories(trajectories)
    try:
        plot_convergence(files, output, relative=relative)
    except ImportError:
        fail("molopt plot needs matplotlib: pip install 'molopt[plot]'")
    err.print(f"wrote {output}")
