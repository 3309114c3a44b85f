"""The ``molopt`` command line: parse, merge settings, call the library, map errors to exit
codes (0 all converged, 1 some structure failed or did not converge, 2 usage/configuration).
Diagnostics go to stderr; ``--json`` records to stdout. JAX is imported only by commands
that compute, so ``molopt --help`` is instant."""

from __future__ import annotations

import json as jsonlib
import os
import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from molopt import __version__
from molopt.errors import MoloptError

app = typer.Typer(
    name="molopt",
    help="Relax molecules, clusters and crystals with differentiable JAX potentials.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)


class OptimizerName(StrEnum):
    fire = "fire"
    fire2 = "fire2"
    lbfgs = "lbfgs"
    gd = "gd"


class Precision(StrEnum):
    float64 = "float64"
    float32 = "float32"


def _version(value: bool):
    if value:
        typer.echo(f"molopt {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
):
    """molopt: structure optimization with JAX (FIRE, L-BFGS, variable cell), H5MD output."""


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
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
    precision: Annotated[
        Precision | None, typer.Option(help="Floating-point precision. [default: float64]")
    ] = None,
    maxstep: Annotated[
        float | None, typer.Option(help="Optimizer max step (A); default as in ASE (0.2).")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="Settings file (TOML) or preset name from configs/; flags override it.",
        ),
    ] = None,
    json: Annotated[
        bool | None,
        typer.Option("--json/--no-json", help="One JSON record per structure on stdout."),
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
        typer.Option(help="Max atoms per batch (bigger structures run alone). [default: 32768]"),
    ] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option(
            "--overwrite/--no-overwrite",
            help="Replace outputs written with different inputs or settings.",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="Relax only part I of N (0-based, e.g. 2/8) of the input files."),
    ] = None,
    recursive: Annotated[
        bool | None,
        typer.Option("--recursive/--no-recursive", help="Search directories recursively."),
    ] = None,
    trajectory_interval: Annotated[
        int | None,
        typer.Option(
            "--traj-interval",
            help="Write every N-th step to the trajectory (0: first and last only). [default: 1]",
        ),
    ] = None,
    skin: Annotated[
        float | None, typer.Option(help="Neighbour-list skin (A). [default: 1.0]")
    ] = None,
    check_hessian: Annotated[
        bool | None,
        typer.Option(
            "--check-hessian/--no-check-hessian",
            help="Check the lowest Hessian eigenvalue at the end; leave saddle points.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
):
    """Relax structures to a local energy minimum; write <stem>.h5md and <stem>.extxyz."""
    from molopt import config as cfg
    from molopt.run import relax_files

    flags = dict(
        potential=potential,
        optimizer=optimizer.value if optimizer else None,
        fmax=fmax,
        steps=steps,
        relax_cell=relax_cell,
        pressure=pressure,
        precision=precision.value if precision else None,
        json=json,
        out_dir=out_dir,
        index=index,
        batch_size=batch_size,
        max_batch_atoms=max_batch_atoms,
        overwrite=overwrite,
        shard=shard,
        recursive=recursive,
        trajectory_interval=trajectory_interval,
        skin=skin,
        check_hessian=check_hessian,
    )
    try:
        settings = cfg.build(config, **flags)
        if maxstep is not None:
            options = dict(settings.optimizer_options, maxstep=maxstep)
            settings = cfg.validate(
                {**{k: getattr(settings, k) for k in cfg.FIELDS}, "optimizer_options": options},
                "command line",
            )
    except MoloptError as exc:
        _fail(str(exc))
    from molopt import interrupt
    from molopt.ui import RelaxReporter

    reporter = RelaxReporter(err, json_out=settings.json, quiet=quiet)
    try:
        with interrupt.deferred(), reporter:
            summary = relax_files(
                inputs,
                settings,
                on_record=reporter.record,
                on_note=reporter.note,
                progress=reporter.progress,
            )
    except MoloptError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted: completed outputs are kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    reporter.summary(summary)
    raise typer.Exit(summary.exit_code)


@app.command()
def potentials(
    json: Annotated[bool, typer.Option("--json", help="JSON list on stdout.")] = False,
):
    """List the shipped potentials."""
    from rich.table import Table

    from molopt import elements as el
    from molopt.potentials import registry

    try:
        specs = registry.shipped()
    except MoloptError as exc:
        _fail(str(exc))
    rows = []
    for name, spec in sorted(specs.items()):
        rows.append(
            {
                "name": name,
                "kind": spec.kind,
                "elements": [el.symbol(z) for z in spec.elements] or ["any"],
                "cutoff": spec.data.get("cutoff"),
                "description": spec.description,
                "path": str(spec.path),
            }
        )
    if json:
        typer.echo(jsonlib.dumps(rows, indent=1))
        return
    table = Table(title="Shipped potentials")
    for column in ("name", "kind", "elements", "cutoff (A)", "description"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["name"], r["kind"], " ".join(r["elements"]), str(r["cutoff"] or ""), r["description"]
        )
    Console().print(table)


@app.command()
def train(
    data: Annotated[
        list[str],
        typer.Argument(
            help="Labelled configurations (any ASE format with energy and forces: extxyz, OUTCAR).",
            show_default=False,
        ),
    ],
    config: Annotated[
        str,
        typer.Option(
            "--config", "-c", help="Training settings (TOML), e.g. configs/train-emt-metals.toml."
        ),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory.")],
    valid: Annotated[
        list[str] | None, typer.Option(help="Validation data (default: a random split of DATA).")
    ] = None,
    test: Annotated[
        list[str] | None,
        typer.Option(help="Held-out test data: errors on it go into the model card."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints.")] = False,
    init: Annotated[
        str | None,
        typer.Option(
            help="Fine-tune: start from this neural potential's weights (name or file), with "
            "a fresh optimizer and schedule; the config must match its architecture. Give it "
            "again with --resume to continue an interrupted fine-tuning."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the config's epochs.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
):
    """Train a PaiNN potential; writes OUT/<name>.toml and OUT/<name>.eqx with a model card."""
    import dataclasses

    from molopt.training.data import read_labelled
    from molopt.training.train import TrainConfig, Trainer
    from molopt.ui_train import TrainDisplay

    try:
        settings = TrainConfig.from_toml(config)
        if epochs is not None:
            settings = dataclasses.replace(settings, epochs=epochs)
        start = None
        if init:
            from molopt.potentials import registry

            start = registry.load(init)
        labelled = read_labelled(data)
        valid_data = read_labelled(valid) if valid else None
        trainer = Trainer(settings, labelled, Path(out), valid=valid_data, sources=data, init=start)
    except MoloptError as exc:
        _fail(str(exc))
    from molopt import interrupt

    try:
        with interrupt.deferred(), TrainDisplay(err, settings.epochs, quiet) as display:
            trainer.run(resume=resume, progress=display.update)
    except MoloptError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        err.print(
            "interrupted: the last checkpoint is kept; continue with --resume"
            + (f" --init {init}" if init else "")
        )
        raise typer.Exit(130) from None
    errors = {}
    if test:
        from molopt.training.evaluate import errors as measure

        result = measure(trainer.best, read_labelled(test))
        result.pop("_parity")
        errors = {"test_data": [str(t) for t in test], **result}
    path = trainer.write_potential(errors)
    err.print(
        f"wrote {path} (best epoch {trainer.state['best_epoch'] + 1}, "
        f"stopped by {trainer.state['stopped']})"
    )


@app.command()
def evaluate(
    potential: Annotated[str, typer.Argument(help="Potential name or file.")],
    data: Annotated[list[str], typer.Argument(help="Labelled configurations.")],
    json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    plot: Annotated[str | None, typer.Option(help="Write a parity plot (PNG/PDF).")] = None,
    precision: Annotated[Precision, typer.Option()] = Precision.float64,
):
    """Energy/force/stress errors (MAE, RMSE; forces per element) of POTENTIAL on DATA."""
    from rich.table import Table

    from molopt.potentials import registry
    from molopt.training.data import read_labelled
    from molopt.training.evaluate import errors, parity_plot

    try:
        spec = registry.load(potential)
        labelled = read_labelled(data)
        missing = {int(z) for d in labelled for z in d.structure.numbers} - set(spec.elements or ())
        if spec.elements and missing:
            from molopt import elements as el

            _fail(
                "element(s) "
                + ", ".join(el.symbol(z) for z in sorted(missing))
                + f" in the data are not covered by potential '{spec.name}'"
            )
        result = errors(spec.potential, labelled, precision.value)
    except MoloptError as exc:
        _fail(str(exc))
    if plot:
        try:
            parity_plot(result, plot, title=f"{spec.name} on {len(labelled)} configurations")
        except ImportError:
            _fail("--plot needs matplotlib: pip install 'molopt[plot]'")
    result.pop("_parity")
    if json:
        typer.echo(jsonlib.dumps(result, indent=1))
        return
    table = Table(
        title=f"{spec.name}: {result['n_configurations']} configurations, "
        f"{result['n_atoms']} atoms",
        title_justify="left",
    )
    table.add_column("quantity")
    table.add_column("MAE", justify="right")
    table.add_column("RMSE", justify="right")
    table.add_row(
        "energy (meV/atom)",
        f"{result['energy_mae_meV_per_atom']:.2f}",
        f"{result['energy_rmse_meV_per_atom']:.2f}",
    )
    table.add_row(
        "forces (meV/A)",
        f"{result['force_mae_meV_per_A']:.1f}",
        f"{result['force_rmse_meV_per_A']:.1f}",
    )
    for symbol, row in result["per_element"].items():
        table.add_row(
            f"  forces on {symbol}",
            f"{row['force_mae_meV_per_A']:.1f}",
            f"{row['force_rmse_meV_per_A']:.1f}",
        )
    if "stress_mae_meV_per_A3" in result:
        table.add_row(
            "stress (meV/A^3)",
            f"{result['stress_mae_meV_per_A3']:.3f}",
            f"{result['stress_rmse_meV_per_A3']:.3f}",
        )
    Console().print(table)


@app.command()
def fit(
    config: Annotated[
        str, typer.Argument(help="Fit settings (TOML), e.g. configs/fit-argon.toml.")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Fitted potential file.")],
    steps: Annotated[int | None, typer.Option(help="Override the config's steps.")] = None,
    json: Annotated[bool, typer.Option("--json", help="Report as JSON on stdout.")] = False,
):
    """Fit Lennard-Jones parameters to properties of relaxed structures (implicit gradients)."""
    from rich.table import Table

    from molopt.fitting import Fit, FitConfig

    try:
        settings = FitConfig.from_toml(config)
        if steps is not None:
            settings.steps = steps
        fitter = Fit(settings)
    except MoloptError as exc:
        _fail(str(exc))

    def progress(step, loss, params):
        if step % 10 == 0 and not json:
            shown = ", ".join(f"{k} {np.array2string(v, precision=6)}" for k, v in params.items())
            err.print(f"step {step}: loss {loss:.3e}  {shown}", highlight=False)

    import numpy as np

    try:
        report = fitter.run(progress)
    except (MoloptError, RuntimeError) as exc:
        _fail(str(exc), 1)
    path = fitter.write(Path(output))
    if json:
        typer.echo(jsonlib.dumps({**report, "output": str(path)}, indent=1, default=float))
        return
    table = Table(
        title=f"fit: {len(report['loss'])} steps, {report['wall_time_s']:.1f} s",
        title_justify="left",
    )
    for column in ("target", "of", "value", "before", "after"):
        table.add_column(column, justify="right" if column not in ("target", "of") else "left")
    for b, a in zip(report["before"], report["after"], strict=True):
        table.add_row(
            b["kind"],
            str(b["what"]),
            "" if b["target"] is None else f"{b['target']:g}",
            f"{b['predicted']:.6g}",
            f"{a['predicted']:.6g}",
        )
    Console().print(table)
    for name, values in report["parameters"].items():
        err.print(f"{name}: {values}")
    err.print(f"wrote {path}")


@app.command()
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
    from rich.table import Table

    from molopt.differentiable import frequencies_cm1
    from molopt.differentiable import hessian as exact_hessian
    from molopt.io.read import read_frames
    from molopt.potentials import registry

    path = Path(structure)
    if not path.is_file():
        _fail(f"{structure}: no such file")
    frames = read_frames(path, index)
    frame = frames[0]
    if frame.structure is None:
        _fail(f"{structure}: {frame.error}")
    s = frame.structure
    try:
        spec = registry.load(potential) if potential else registry.choose(s.numbers)
    except MoloptError as exc:
        _fail(str(exc))
    if not spec.covers(s.numbers):
        _fail(f"{structure}: elements not covered by potential '{spec.name}'")
    import numpy as np

    h = exact_hessian(s, spec.potential)
    eigenvalues = np.linalg.eigvalsh(0.5 * (h + h.T))
    frequencies = frequencies_cm1(s, spec.potential)
    result = {
        "file": str(path),
        "potential": spec.name,
        "n_atoms": s.n_atoms,
        "eigenvalues_eV_per_A2": eigenvalues.tolist(),
        "frequencies_cm1": frequencies.tolist(),
        "n_imaginary": int(np.sum(frequencies < -10.0)),
    }
    if output:
        Path(output).write_text(jsonlib.dumps(result, indent=1))
    if json:
        typer.echo(jsonlib.dumps(result, indent=1))
        return
    table = Table(
        title=f"{path.name} with {spec.name}: {3 * s.n_atoms} modes", title_justify="left"
    )
    table.add_column("mode", justify="right")
    table.add_column("frequency (cm^-1)", justify="right")
    table.add_column("Hessian eigenvalue (eV/A^2)", justify="right")
    for k, (f, e) in enumerate(zip(frequencies, eigenvalues, strict=True)):
        table.add_row(str(k), f"{f:.2f}" + ("i" if f < -10 else ""), f"{e:.6f}")
    Console().print(table)


def _trajectories(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files.extend(sorted(path.glob("*.h5md")))
        elif path.is_file():
            files.append(path)
        else:
            _fail(f"{text}: no such file or directory")
    if not files:
        _fail("no .h5md trajectories found in " + ", ".join(paths))
    return files


@app.command()
def info(
    paths: Annotated[list[str], typer.Argument(help="Trajectories (.h5md) or directories.")],
    json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
):
    """What is inside molopt trajectories; a directory is summarised by status."""
    from rich.table import Table

    from molopt.io.h5md import summary

    rows = []
    for path in _trajectories(paths):
        try:
            rows.append(summary(path))
        except (OSError, KeyError) as exc:
            rows.append({"file": str(path), "status": "unreadable", "error": str(exc)})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("status") or "unknown"] = counts.get(r.get("status") or "unknown", 0) + 1
    if json:
        typer.echo(jsonlib.dumps({"trajectories": rows, "counts": counts}, indent=1))
        return
    readable = [r for r in rows if r.get("status") != "unreadable"]
    used = sorted({f"{r['potential']}/{r['optimizer']}" for r in readable})
    table = Table(title=f"{len(rows)} trajectories ({', '.join(used)})", title_justify="left")
    for column in (
        "file",
        "structure",
        "atoms",
        "frames",
        "status",
        "steps",
        "E0 (eV)",
        "E (eV)",
        "fmax (eV/A)",
    ):
        table.add_column(column, justify="left" if column in ("file", "status") else "right")
    for r in rows:
        if r.get("status") == "unreadable":
            table.add_row(r["file"], "", "", "", "unreadable", "", "", "", "")
            continue
        table.add_row(
            Path(r["file"]).name,
            r["formula"],
            str(r["n_atoms"]),
            str(r["n_frames"]),
            str(r["status"]),
            str(r["steps"]),
            f"{r['initial_energy']:.5f}",
            f"{r['final_energy']:.5f}",
            f"{r['final_fmax']:.1e}",
        )
    console = Console()
    console.print(table)
    if len(rows) > 1:
        console.print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


@app.command()
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
        _fail(f"{trajectory}: no such file")
    try:
        images = read_trajectory(path, frames)
    except (OSError, KeyError) as exc:
        _fail(f"{trajectory}: not a molopt trajectory ({exc})")
    except (IndexError, ValueError) as exc:
        _fail(f"--frames {frames}: {exc}")
    try:
        ase_io().write(output, images if len(images) > 1 else images[0], format=format)
    except Exception as exc:  # ASE raises many kinds for formats it cannot write
        _fail(f"cannot write {output}: {exc}")
    err.print(f"wrote {len(images)} frame(s) to {output}")


@app.command()
def plot(
    trajectories: Annotated[list[str], typer.Argument(help="Trajectories or directories.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Image file (png, pdf, svg).")],
    relative: Annotated[bool, typer.Option(help="Energies relative to each final energy.")] = True,
):
    """Energy and fmax (log scale) against optimizer step, one line per trajectory."""
    from molopt.api import read_trajectory

    files = _trajectories(trajectories)
    try:
        import matplotlib
    except ImportError:
        _fail("molopt plot needs matplotlib: pip install 'molopt[plot]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_f) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True, constrained_layout=True)
    for path in files:
        data = read_trajectory(path, as_atoms=False)
        energy = data["energy"] - (data["energy"][-1] if relative else 0.0)
        label = path.stem if len(files) <= 12 else None
        ax_e.plot(data["step"], energy, lw=1.2, label=label)
        ax_f.semilogy(data["step"], data["fmax"], lw=1.2, label=label)
        target = data["parameters"].get("fmax_target")
    if target:
        ax_f.axhline(float(target), color="k", ls="--", lw=0.8, label="fmax target")
    ax_e.set_ylabel("E - E(final) (eV)" if relative else "energy (eV)")
    ax_f.set_ylabel("fmax (eV/\u00c5)")
    ax_f.set_xlabel("optimizer step")
    for ax in (ax_e, ax_f):
        ax.grid(alpha=0.3, which="both")
    if len(files) <= 12:
        ax_f.legend(fontsize=8, frameon=False)
    fig.savefig(output, dpi=200)
    err.print(f"wrote {output}")


def main():  # console-script entry point
    from . import _vesin

    _vesin.standalone()  # this process is molopt's alone: vesin without PyTorch and CuPy
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # pragma: no cover - interrupted outside a command body
        code = 130
    _leave(code)


def _leave(code) -> None:
    """Exit with ``code``. After a command that computed, every output is written, closed
    and renamed by now (the writer thread has been joined), and what the interpreter's
    normal teardown would still do is free JAX's backends, XLA's thread pools and every
    module: 0.3 s of each `molopt relax` (a third of the whole of a small run). That is
    skipped, after flushing the standard streams, when no other thread is alive."""
    if isinstance(code, str):
        err.print(code, markup=False, highlight=False)
        code = 1
    code = 0 if code is None else int(code)
    jax = sys.modules.get("jax")
    if jax is None or threading.active_count() > 1:
        sys.exit(code)
    jax.effects_barrier()  # (nothing is in flight; what JAX's own exit handler waits for)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (molopt ... | head): nothing to keep
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
