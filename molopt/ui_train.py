"""Rich display for ``molopt train``: a progress bar over epochs with live metrics."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.table import Table


class TrainDisplay:
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
