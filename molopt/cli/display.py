"""What the terminal shows: Rich progress displays on stderr (only on a terminal) and the
result tables of each command on stdout. Rendering only: the numbers come from the library,
already computed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console, ConsoleDimensions
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

#: The width of a console off a terminal: wide enough that no line is wrapped and no
#: table column is cut.
UNWRAPPED_WIDTH = 100_000


class LogConsole(Console):
    """A Rich console that writes plain, unwrapped lines when its stream is not a terminal
    (a log file, a pipe, a batch job): Rich would wrap them at 80 columns, in the middle of
    numbers, and shrink table columns until their text is cut. On a terminal it is Rich's
    console unchanged. A ``width`` given here is kept; the ``COLUMNS`` of the environment
    (which Rich reads as a width too) is not, off a terminal."""

    def __init__(self, *args, width: int | None = None, **kwargs):
        super().__init__(*args, width=width, **kwargs)
        self._given_width = width is not None

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self.is_terminal or self._given_width:
            return size
        return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


class RelaxReporter:
    """``molopt relax``: a progress bar, failures as they happen, JSON records on stdout, a
    summary table at the end."""

    def __init__(self, console: Console, json_out: bool = False, quiet: bool = False):
        self.console = console
        self.json_out = json_out
        self.quiet = quiet
        self.bar: Progress | None = None
        self.task = None

    def __enter__(self):
        if not self.quiet and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("relaxing"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[workers]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("relax", total=None, rate="", workers="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
            self.bar = None
        return False

    def note(self, text: str):
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False)

    def progress(self, done: int, total: int):
        """``done`` structures of ``total`` have their record (called as each one does)."""
        if self.bar is not None:
            speed = self.bar.tasks[0].speed if done else None
            rate = f"{speed:.3g}/s" if speed else ""
            self.bar.update(self.task, completed=done, total=total, rate=rate)

    def workers(self, alive: int):
        """On a Dask cluster: the number of workers alive (called when it changes)."""
        if self.bar is not None:
            self.bar.update(self.task, workers=f"{alive} worker{'s' if alive != 1 else ''}")

    def record(self, rec: dict):
        if self.json_out:
            sys.stdout.write(json.dumps(rec) + "\n")
            sys.stdout.flush()
        if rec["status"] == "failed":
            self.console.print(
                f"failed: {rec['error']}", markup=False, highlight=False, soft_wrap=True
            )

    def summary(self, summary):
        if self.quiet:
            return
        table = Table(title=f"molopt relax ({summary.wall_time:.1f} s)", title_justify="left")
        for column in ("status", "structures"):
            table.add_column(column)
        for status in ("converged", "not_converged", "failed", "skipped"):
            n = summary.count(status)
            if n:
                table.add_row(status, str(n))
        if not summary.records:
            table.add_row("(no structures)", "0")
        self.console.print(table)
        relaxed = [r for r in summary.records if r["status"] in ("converged", "not_converged")]
        if relaxed:
            steps = sum(r["steps"] or 0 for r in relaxed)
            self.console.print(
                f"relaxed {len(relaxed)} structure{'s' if len(relaxed) != 1 else ''}, "
                f"{steps} steps in all, "
                f"{len(relaxed) / max(summary.wall_time, 1e-9):.3g} structures/s",
                markup=False,
                highlight=False,
            )
        if self.json_out:
            return
        shown = summary.records if len(summary.records) <= 20 else _slowest(relaxed, 5)
        if shown is not summary.records and shown:
            self.console.print("slowest:", markup=False, highlight=False)
        for rec in shown:
            if rec["status"] != "failed" and rec["energy"] is not None:
                self.console.print(_line(rec), markup=False, highlight=False)


def _slowest(records: list, n: int) -> list:
    return sorted(records, key=lambda r: -(r.get("relax_time_s") or 0.0))[:n]


def _line(rec: dict) -> str:
    where = rec["input"] + ("" if rec["index"] is None else f"[{rec['index']}]")
    seconds = rec.get("relax_time_s")
    took = "" if seconds is None else f"  {seconds:.2f} s"
    return (
        f"{rec['status']:>13}  {where}  E = {rec['energy']:.8f} eV  "
        f"fmax = {rec['fmax']:.2e} eV/A  steps = {rec['steps']}{took}"
    )


class TrainDisplay:
    """``molopt train``: a live table over epochs with the latest metrics."""

    def __init__(self, console: Console, epochs: int, quiet: bool = False):
        self.console = console
        self.epochs = epochs
        self.quiet = quiet
        self.live: Live | None = None
        self.rows: list[dict] = []

    def __enter__(self):
        if not self.quiet and self.console.is_terminal:
            self.live = Live(
                self._table(), console=self.console, refresh_per_second=4, transient=False
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
        return False

    def _table(self) -> Table:
        table = Table(
            title=f"training ({len(self.rows)}/{self.epochs} epochs)", title_justify="left"
        )
        for column in (
            "epoch",
            "train loss",
            "valid E MAE (meV/atom)",
            "valid F MAE (meV/A)",
            "learning rate",
        ):
            table.add_column(column, justify="right")
        for m in self.rows[-8:]:
            table.add_row(
                str(m["epoch"]),
                f"{m['train_loss']:.4g}",
                f"{m['valid_energy_mae_meV_per_atom']:.2f}",
                f"{m['valid_force_mae_meV_per_A']:.1f}",
                f"{m['learning_rate']:.2e}",
            )
        return table

    def update(self, metrics: dict, state: dict):
        self.rows.append(metrics)
        self.epochs = state.get("epochs", self.epochs)
        if self.live is not None:
            self.live.update(self._table())
        elif not self.quiet:
            self.console.print(
                f"epoch {metrics['epoch']}: loss {metrics['train_loss']:.4g}, valid E MAE "
                f"{metrics['valid_energy_mae_meV_per_atom']:.2f} meV/atom, F MAE "
                f"{metrics['valid_force_mae_meV_per_A']:.1f} meV/A",
                highlight=False,
            )


def potentials_table(rows: list[dict]) -> None:
    """``molopt potentials``: one row per shipped potential."""
    table = Table(title="Shipped potentials", title_justify="left")
    for column in ("name", "kind", "elements", "cutoff (A)", "description"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["name"], r["kind"], " ".join(r["elements"]), str(r["cutoff"] or ""), r["description"]
        )
    LogConsole().print(table)


def errors_table(name: str, result: dict) -> None:
    """``molopt evaluate``: MAE and RMSE of energy, forces (per element) and stress."""
    table = Table(
        title=f"{name}: {result['n_configurations']} configurations, {result['n_atoms']} atoms",
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
    LogConsole().print(table)


def fit_progress(err: Console, quiet: bool = False):
    """``molopt fit``'s progress callback ``(step, loss, parameters)``: every tenth step on
    ``err`` (nothing when ``quiet``)."""
    import numpy as np

    def progress(step: int, loss: float, params: dict) -> None:
        if step % 10 == 0 and not quiet:
            shown = ", ".join(f"{k} {np.array2string(v, precision=6)}" for k, v in params.items())
            err.print(f"step {step}: loss {loss:.3e}  {shown}", highlight=False)

    return progress


def fit_report(report: dict, err: Console) -> None:
    """``molopt fit``: each target before and after (stdout), the fitted parameters (``err``)."""
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
    LogConsole().print(table)
    for name, values in report["parameters"].items():
        err.print(f"{name}: {values}")


def hessian_table(result: dict) -> None:
    """``molopt hessian``: frequency and Hessian eigenvalue of every mode, imaginary ones
    marked."""
    from molopt.hessian_report import IMAGINARY_BELOW_CM1

    table = Table(
        title=f"{Path(result['file']).name} with {result['potential']}: "
        f"{3 * result['n_atoms']} modes"
        + ("" if result.get("at_minimum", True) else " (NOT at a minimum)"),
        title_justify="left",
    )
    table.add_column("mode", justify="right")
    table.add_column("frequency (cm^-1)", justify="right")
    table.add_column("Hessian eigenvalue (eV/A^2)", justify="right")
    modes = zip(result["frequencies_cm1"], result["eigenvalues_eV_per_A2"], strict=True)
    for k, (f, e) in enumerate(modes):
        table.add_row(str(k), f"{f:.2f}" + ("i" if f < IMAGINARY_BELOW_CM1 else ""), f"{e:.6f}")
    LogConsole().print(table)


def trajectories_table(rows: list[dict], counts: dict[str, int]) -> None:
    """``molopt info``: one row per trajectory, and the count by status when several."""
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
    console = LogConsole()
    console.print(table)
    if len(rows) > 1:
        console.print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
