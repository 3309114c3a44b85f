"""``molopt relax``: settings from defaults < ``--config`` < flags (:func:`molopt.config.build`),
then :func:`molopt.run.relax_files` with the terminal display as its callbacks."""

from __future__ import annotations

from typing import Annotated

import typer

from molopt.cli import OptimizerName, Precision, err, interruptible, reported

#: Parameters of :func:`relax` that are not settings flags.
_NOT_FLAGS = ("inputs", "config", "quiet")


def relax(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Structure files (any format ASE reads), directories or glob patterns.",
            show_default=False,
        ),
    ],
    potential: Annotated[
        str | None,
        typer.Option(
            "--potential",
            "-p",
            help="Shipped potential name (see `molopt potentials`) or a "
            "potential file (.toml). Default: a shipped potential covering the input.",
        ),
    ] = None,
    optimizer: Annotated[
        OptimizerName | None, typer.Option(help="Optimizer (ASE semantics). [default: fire]")
    ] = None,
    fmax: Annotated[
        float | None, typer.Option(help="Converged when max_i |F_i| < fmax (eV/A). [default: 0.05]")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Max optimizer steps per structure. [default: 10000]")
    ] = None,
    relax_cell: Annotated[
        bool | None,
        typer.Option(
            "--relax-cell/--fixed-cell",
            help="Relax the cell too (ASE FrechetCellFilter semantics). [default: fixed]",
        ),
    ] = None,
    pressure: Annotated[
        float | None, typer.Option(help="External pressure in GPa for --relax-cell. [default: 0]")
    ] = None,
    cell_mask: Annotated[
        str | None,
        typer.Option(
            help="Free cell components for --relax-cell: names (xx,yy,xy) or six 0/1 in "
            "Voigt order xx,yy,zz,yz,xz,xy. Only periodic directions are free (a slab "
            "relaxes its in-plane cell). [default: all]",
        ),
    ] = None,
    hydrostatic: Annotated[
        bool | None,
        typer.Option(
            "--hydrostatic/--no-hydrostatic", help="--relax-cell scales the cell only (ASE)."
        ),
    ] = None,
    constant_volume: Annotated[
        bool | None,
        typer.Option(
            "--constant-volume/--no-constant-volume",
            help="--relax-cell keeps the volume (ASE's constant_volume).",
        ),
    ] = None,
    stress: Annotated[
        str | None,
        typer.Option(
            help="Target stress for --relax-cell, six values in GPa, Voigt order "
            "xx,yy,zz,yz,xz,xy, positive = tensile (as ASE reports stress); the relaxed "
            "stress equals it. --pressure P is --stress=-P,-P,-P,0,0,0.",
        ),
    ] = None,
    fix: Annotated[
        str | None,
        typer.Option(
            help="Fix atoms (ASE FixAtoms) in every structure, added to its own constraints: "
            "comma-separated 0-based indices and ranges (0-11,15), elements (element:Pt), "
            "heights (z<5.0; also x, y and >); an atom any term selects is fixed.",
        ),
    ] = None,
    fix_symmetry: Annotated[
        bool | None,
        typer.Option(
            "--fix-symmetry/--no-fix-symmetry",
            help="Keep each structure's space group (ASE FixSymmetry: refined at the start, "
            "forces, stress and steps symmetrized).",
        ),
    ] = None,
    symprec: Annotated[
        float | None,
        typer.Option(help="Symmetry tolerance (A) of --fix-symmetry/--symmetrize. [default: 0.01]"),
    ] = None,
    symmetrize: Annotated[
        bool | None,
        typer.Option(
            "--symmetrize/--no-symmetrize",
            help="Refine each relaxed structure to its space group (at --symprec).",
        ),
    ] = None,
    precision: Annotated[
        Precision | None, typer.Option(help="Floating-point precision. [default: float64]")
    ] = None,
    maxstep: Annotated[
        float | None, typer.Option(help="Optimizer max step (A). [default: as in ASE, 0.2]")
    ] = None,
    dmax: Annotated[
        float | None,
        typer.Option(
            help="fire/fire2: cap each atom's move alone at this length (A; LAMMPS's dmax) "
            "instead of the whole step's norm at --maxstep; the fast route for large "
            "crystals. [default: none, ASE's rule]",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="Settings file (TOML) or the name of a relax preset in configs/ (e.g. tight); "
            "flags override it.",
        ),
    ] = None,
    json: Annotated[
        bool | None,
        typer.Option(
            "--json/--no-json", help="One JSON record per structure on stdout. [default: no-json]"
        ),
    ] = None,
    out_dir: Annotated[
        str | None,
        typer.Option("--out-dir", "-o", help="Where outputs go. [default: current directory]"),
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(
            help="Frames of multi-frame files, ASE index syntax (e.g. -1, ::10). [default: all]"
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Max structures relaxed together in one compiled batch. [default: 1024]"),
    ] = None,
    max_batch_atoms: Annotated[
        int | None,
        typer.Option(
            help="Max atoms per batch (bigger structures run alone). "
            "[default: 32768; SevenNet on a CPU 256]"
        ),
    ] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option(
            "--overwrite/--no-overwrite",
            help="Replace outputs written with different inputs or settings. "
            "[default: no-overwrite]",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Relax only part I of N (0-based, e.g. 2/8) of the input files. [default: all]"
        ),
    ] = None,
    recursive: Annotated[
        bool | None,
        typer.Option(
            "--recursive/--no-recursive",
            help="Search directories recursively. [default: no-recursive]",
        ),
    ] = None,
    trajectory_interval: Annotated[
        int | None,
        typer.Option(
            "--traj-interval",
            help="Write every N-th step to the trajectory (0: first and last only). [default: 1]",
        ),
    ] = None,
    skin: Annotated[
        float | None,
        typer.Option(help="Neighbour-list skin (A). [default: the potential's: 1.0; SevenNet 0.5]"),
    ] = None,
    check_hessian: Annotated[
        bool | None,
        typer.Option(
            "--check-hessian/--no-check-hessian",
            help="Check the lowest Hessian eigenvalue at the end; leave saddle points. "
            "[default: no-check-hessian]",
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory a batch may need, e.g. 8G or 512M; a structure that alone needs "
            "more fails with the reason. [default: half the available memory, or 80% of "
            "the GPU's]",
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="Relax on a Dask cluster: local:N (N worker processes here), or slurm, pbs, "
            "lsf, sge (jobs from the config file's [cluster] table, via dask-jobqueue). "
            "Needs pip install 'molopt[dask]'. [default: this process]",
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Relax on the workers of a running Dask scheduler, e.g. tcp://host:8786. "
            "[default: none]",
        ),
    ] = None,
    cluster_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds to wait for the scheduler and a first worker before giving up "
            "(exit 2). [default: 60]",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
):
    """Relax structures to a local energy minimum; write <stem>.h5md and <stem>.extxyz."""
    # the parameters exactly, read before any other local exists (None: flag not given)
    given = dict(locals())
    from molopt import config as cfg
    from molopt.cli.display import RelaxReporter
    from molopt.run import relax_files

    flags = {name: _plain(value) for name, value in given.items() if name not in _NOT_FLAGS}
    with reported():
        settings = cfg.build(config, **flags)
    reporter = RelaxReporter(err, json_out=settings.json, quiet=quiet)
    resume = "interrupted: completed outputs are kept; rerun the same command to resume"
    with reported(), interruptible(resume), reporter:
        summary = relax_files(
            inputs,
            settings,
            on_record=reporter.record,
            on_note=reporter.note,
            progress=reporter.progress,
            on_workers=reporter.workers,
        )
    reporter.summary(summary)
    if summary.stopped:
        err.print(
            f"error: the run stopped: {summary.stopped}. Every structure has its record; "
            "rerun the same command to relax the rest.",
            markup=False,
            highlight=False,
        )
    raise typer.Exit(summary.exit_code)


def _plain(value):
    """A choice's value (settings hold plain strings), anything else as it is."""
    return value.value if isinstance(value, OptimizerName | Precision) else value
