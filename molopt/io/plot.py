"""Convergence plots of molopt trajectories (needs matplotlib: ``pip install 'molopt[plot]'``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from molopt.io.atomic import save_figure

#: More trajectories than this are drawn without labels and legend.
MAX_LABELLED = 12


def image_format_problem(output: str | Path) -> str | None:
    """Why matplotlib cannot save a figure as ``output`` (no extension, or one it does not
    write), or None. Raises ImportError without matplotlib."""
    from matplotlib.backend_bases import FigureCanvasBase

    known = FigureCanvasBase.get_supported_filetypes()
    extension = Path(output).suffix.lower().lstrip(".")
    if extension in known:
        return None
    what = f"'.{extension}' is not an image format" if extension else "no file extension"
    return f"{what} matplotlib writes (use one of {', '.join(sorted(known))})"


def plot_convergence(paths: Sequence[Path], output: str | Path, relative: bool = True) -> None:
    """Draw the energy (top axes; E - E(final) when ``relative``) and fmax (bottom axes, log
    scale) against the optimizer step of each H5MD trajectory in ``paths``, one line per
    trajectory labelled with its file stem, plus the fmax target (of the last trajectory) as a
    dashed line, and save the figure to ``output`` (format from its extension). Raises
    ImportError without matplotlib."""
    import matplotlib

    from molopt.io.h5md import read

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [Path(p) for p in paths]
    labelled = len(paths) <= MAX_LABELLED
    fig, (ax_e, ax_f) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True, constrained_layout=True)
    target = None
    for path in paths:
        data = read(path)
        energy = data["energy"] - (data["energy"][-1] if relative else 0.0)
        label = path.stem if labelled else None
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
    if labelled:
        ax_f.legend(fontsize=8, frameon=False)
    save_figure(fig, Path(output), dpi=200)
