"""Errors of a potential on labelled data: energy per atom, forces per element, stress."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from molopt import elements as el
from molopt.io.atomic import save_figure
from molopt.training.data import Labelled


def predict(potential, data: list[Labelled], precision: str = "float64", chunk: int = 64):
    """[(energy, forces, stress)] for each configuration, evaluated in padded batches."""
    from molopt.engine import evaluate_structures

    out = []
    for start in range(0, len(data), chunk):
        part = data[start : start + chunk]
        out.extend(
            evaluate_structures(
                [d.structure for d in part], potential, stress=True, precision=precision
            )
        )
    return out


def errors(potential, data: list[Labelled], precision: str = "float64") -> dict:
    """MAE/RMSE: energy per atom (meV/atom), forces per element and overall (meV/A), stress
    (meV/A^3) where the data has it; plus the arrays for a parity plot under ``_parity``."""
    predictions = predict(potential, data, precision)
    e_ref, e_pred, f_ref, f_pred, z_all, s_err = [], [], [], [], [], []
    for d, (energy, forces, stress) in zip(data, predictions, strict=True):
        n = d.structure.n_atoms
        e_ref.append(d.energy / n)
        e_pred.append(energy / n)
        f_ref.append(d.forces)
        f_pred.append(forces)
        z_all.append(d.structure.numbers)
        if d.stress is not None and stress is not None:
            s_err.append((stress - d.stress).ravel())
    e_ref, e_pred = np.array(e_ref), np.array(e_pred)
    f_ref, f_pred = np.concatenate(f_ref), np.concatenate(f_pred)
    z_all = np.concatenate(z_all)
    de = 1000 * (e_pred - e_ref)
    df = 1000 * (f_pred - f_ref)
    result = {
        "n_configurations": len(data),
        "n_atoms": int(len(z_all)),
        "energy_mae_meV_per_atom": float(np.mean(np.abs(de))),
        "energy_rmse_meV_per_atom": float(np.sqrt(np.mean(de**2))),
        "force_mae_meV_per_A": float(np.mean(np.abs(df))),
        "force_rmse_meV_per_A": float(np.sqrt(np.mean(df**2))),
        "per_element": {},
    }
    for z in sorted(set(int(x) for x in z_all)):
        sel = df[z_all == z]
        result["per_element"][el.symbol(z)] = {
            "n_atoms": int((z_all == z).sum()),
            "force_mae_meV_per_A": float(np.mean(np.abs(sel))),
            "force_rmse_meV_per_A": float(np.sqrt(np.mean(sel**2))),
        }
    if s_err:
        ds = 1000 * np.concatenate(s_err)
        result["stress_mae_meV_per_A3"] = float(np.mean(np.abs(ds)))
        result["stress_rmse_meV_per_A3"] = float(np.sqrt(np.mean(ds**2)))
    result["_parity"] = {"energy": (e_ref, e_pred), "forces": (f_ref.ravel(), f_pred.ravel())}
    return result


def parity_plot(result: dict, path, title: str = "") -> None:
    """Energy-per-atom and force-component parity plots (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), constrained_layout=True)
    for ax, key, unit, mae in (
        (axes[0], "energy", "eV/atom", f"MAE {result['energy_mae_meV_per_atom']:.2f} meV/atom"),
        (axes[1], "forces", "eV/A", f"MAE {result['force_mae_meV_per_A']:.1f} meV/A"),
    ):
        ref, pred = result["_parity"][key]
        ax.scatter(ref, pred, s=3, alpha=0.5, rasterized=True)
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"reference {key} ({unit})")
        ax.set_ylabel(f"predicted {key} ({unit})")
        ax.set_title(mae, fontsize=10)
        ax.set_aspect("equal", adjustable="datalim")
    if title:
        fig.suptitle(title)
    save_figure(fig, Path(path), dpi=150)
    plt.close(fig)
