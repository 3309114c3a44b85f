"""Commands over finished trajectories: ``molopt info`` (:func:`molopt.io.h5md.summary`),
``molopt convert`` (:func:`molopt.api.read_trajectory`, written by ASE) and ``molopt plot``
(:func:`molopt.io.plot.plot_convergence`)."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer

from molopt.cli import Overwrite, err, fail, image_file, output_file


def _trajectories(paths: list[str], check_found: bool) -> list[Path]:
    """The files in ``paths``, a directory standing for its ``*.h5md``. Exits 2 naming the
    path and the reason when a path named is not a molopt trajectory (missing, a directory
    without trajectories, not HDF5, HDF5 of another layout) or nothing is found; the files
    found in directories are checked too when ``check_found``."""
    from molopt.io.h5md import not_a_trajectory

    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.h5md") if p.is_file())
            if not found:
                fail(f"{text}: a directory with no molopt trajectories (*.h5md) in it")
            files.extend(found)
            checked = found if check_found else []
        else:
            files.append(path)
            checked = [path]
        for file in checked:
            reason = not_a_trajectory(file)
            if reason:
                fail(f"{file}: {reason}")
    return files


def info(
    paths: Annotated[
        list[str], typer.Argument(help="Trajectories (.h5md) or directories of them.")
    ],
    json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
):
    """What is inside molopt trajectories; a directory is summarised by status (its files
    that cannot be read are listed as unreadable, with the reason on stderr)."""
    from molopt.cli.display import trajectories_table

    rows = [_summary(path) for path in _trajectories(paths, check_found=False)]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("status") or "unknown"] = counts.get(r.get("status") or "unknown", 0) + 1
        if r.get("status") == "unreadable":
            err.print(f"{r['file']}: {r['error']}", markup=False, highlight=False)
    if json:
        typer.echo(jsonlib.dumps({"trajectories": rows, "counts": counts}, indent=1))
    else:
        trajectories_table(rows, counts)


def _summary(path: Path) -> dict:
    """:func:`molopt.io.h5md.summary`, or a row with status ``unreadable`` and the reason."""
    from molopt.io.h5md import not_a_trajectory, summary

    reason = not_a_trajectory(path)
    if reason is None:
        try:
            return summary(path)
        except (OSError, KeyError, ValueError) as exc:
            reason = f"cannot be read ({exc})"
    return {"file": str(path), "status": "unreadable", "error": reason}


def convert(
    trajectory: Annotated[str, typer.Argument(help="A molopt trajectory (.h5md).")],
    output: Annotated[
        str, typer.Argument(help="Output file; its format from --format or its extension.")
    ],
    frames: Annotated[str, typer.Option(help="Frames to write, ASE index syntax: -1, ::10.")] = ":",
    format: Annotated[
        str | None, typer.Option(help="ASE format name. [default: from the extension]")
    ] = None,
    overwrite: Overwrite = False,
):
    """Write trajectory frames in any format ASE writes (energies/forces where it can)."""
    from molopt.io.h5md import not_a_trajectory

    fmt = _writable_format(output, format)
    output_file(output, overwrite)
    reason = not_a_trajectory(Path(trajectory))
    if reason:
        fail(f"{trajectory}: {reason}")
    if Path(output).exists() and Path(output).samefile(trajectory):
        fail(f"{output}: is the trajectory being converted")
    from molopt.api import read_trajectory
    from molopt.io.ase_import import ase_io
    from molopt.io.atomic import write_atomically

    try:
        images = read_trajectory(Path(trajectory), frames)
    except (OSError, KeyError) as exc:
        fail(f"{trajectory}: cannot be read ({exc})")
    except (IndexError, ValueError) as exc:
        fail(f"--frames {frames}: {exc}")
    if len(images) > 1 and fmt.single:
        fail(
            f"{output}: the {fmt.name} format holds one frame and --frames {frames} selects "
            f"{len(images)}; select one (e.g. --frames -1) or choose a multi-frame format"
        )
    # written aside and renamed into place: a writer that fails half-way leaves no file
    frames_out = images if len(images) > 1 else images[0]
    try:
        write_atomically(
            Path(output), lambda tmp: ase_io().write(str(tmp), frames_out, format=fmt.name)
        )
    except Exception as exc:  # ASE raises many kinds for formats it cannot write
        fail(f"cannot write {output}: {exc}")
    err.print(f"wrote {len(images)} frame(s) to {output}")


def _writable_format(output: str, name: str | None):
    """ASE's format for writing ``output`` (``name``, or guessed from the file name); exits 2
    when ASE does not know it or cannot write it."""
    from molopt.io.ase_import import ase_io

    ase_io()
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    if name is None:
        try:
            name = filetype(output, read=False)
        except (UnknownFileTypeError, ValueError):
            fail(f"{output}: no format known for this file name; give one with --format")
    if name not in ioformats:
        fail(f"--format {name}: not a format ASE knows (`ase info --formats` lists them)")
    if not ioformats[name].can_write:
        fail(f"{output}: ASE cannot write the {name} format")
    return ioformats[name]


def plot(
    trajectories: Annotated[list[str], typer.Argument(help="Trajectories or directories.")],
    output: Annotated[
        str, typer.Option("--output", "-o", help="Image file; format from its extension.")
    ],
    relative: Annotated[bool, typer.Option(help="Energies relative to each final energy.")] = True,
    overwrite: Overwrite = False,
):
    """Energy and fmax (log scale) against optimizer step, one line per trajectory."""
    from molopt.io.plot import plot_convergence

    image_file(output, overwrite, "molopt plot")
    files = _trajectories(trajectories, check_found=True)
    try:
        plot_convergence(files, output, relative=relative)
    except OSError as exc:  # renamed into place whole: a failed write leaves no file
        fail(f"cannot write {output}: {exc}")
    err.print(f"wrote {output}")
