"""Parity of molopt's SevenNet-0 with sevenn's reference results (no torch needed).

    python data/sevennet/parity.py

Evaluates every structure of ``data/sevennet/reference.extxyz`` in one padded batch, in
float64 and in float32, and prints the largest and the median deviation from sevenn's float64
and float32 results: energy per atom (eV/atom), force components (eV/A) and stress components
(eV/A^3, fully periodic structures only).
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np

from molopt.engine.single_point import evaluate_structures
from molopt.io.read import from_atoms
from molopt.potentials import registry

REFERENCE = Path(__file__).resolve().parent / "reference.extxyz"


def deviations(frames, results, tag):
    de, df, ds = [], [], []
    for atoms, (energy, forces, stress) in zip(frames, results, strict=True):
        de.append(abs(energy - atoms.info[f"{tag}_energy"]) / len(atoms))
        df.append(np.abs(forces - atoms.arrays[f"{tag}_forces"]).max())
        if atoms.pbc.all():
            ds.append(np.abs(stress.reshape(-1) - atoms.info[f"{tag}_stress"]).max())
    return de, df, ds


def main():
    frames = ase.io.read(REFERENCE, ":")
    potential = registry.load("sevennet-0").potential
    structures = [from_atoms(a, source=a.info.get("label", "?")) for a in frames]
    print(f"{len(frames)} structures, {sum(len(a) for a in frames)} atoms")
    print(
        "| molopt | sevenn | energy eV/atom max (median) | force eV/A max (median) "
        "| stress eV/A^3 max (median) |"
    )
    print("|---|---|---|---|---|")
    for precision, tags in (("float64", ("f64", "f32")), ("float32", ("f32",))):
        results = evaluate_structures(structures, potential, stress=True, precision=precision)
        for tag in tags:
            cells = [f"{max(v):.1e} ({np.median(v):.1e})" for v in deviations(frames, results, tag)]
            reference = {"f64": "float64", "f32": "float32"}[tag]
            print(f"| {precision} | {reference} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
