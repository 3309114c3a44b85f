"""What the user sees while ``molopt relax`` runs: a Rich progress bar on stderr (only on a
terminal), failures as they happen, JSON records on stdout, a summary table at the end."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class RelaxReporter:
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
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("relax", total=None)
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
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)

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
        if not self.json_out and len(summary.records) <= 20:
            for rec in summary.records:
                if rec["status"] != "failed" and rec["energy"] is not None:
                    where = rec["input"] + ("" if rec["index"] is None else f"[{rec['index']}]")
                    self.console.print(
                        f"{rec['status']:>13}  {where}  "
                        f"E = {rec['energy']:.8f} eV  fmax = {rec['fmax']:.2e} eV/A  "
                        f"steps = {rec['steps']}",
                        markup=False,
                        highlight=False,
                    )
