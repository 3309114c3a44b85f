"""Relaxations with molopt's SevenNet-0 against ASE FIRE + sevenn's calculator (no torch).

    python data/sevennet/relax_parity.py [--precision float64]

Reads ``relax_reference_wide.extxyz`` (``make_relax_reference.py --wide``: thirty structures
at fixed cell and thirty crystals with the cell relaxed too, each a start and the minimum ASE's
FIRE reached with sevenn's float32 calculator, fmax 0.005 eV/A), relaxes the starts with
molopt's FIRE (fixed cell and ``relax_cell`` each in one batch), and compares the minima: RMSD
of the positions (mean shift removed), the largest cell difference, |dE| per atom, and the
steps. Prints a table and the largest deviations; ``tests/test_sevennet.py`` holds them to the
issue's targets (RMSD <= 1e-3 A, |dE| <= 1e-4 eV/atom).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FMAX = 0.005


def compare(precision: str = "float64") -> list[dict]:
    import ase.io

    import molopt

    frames = ase.io.read(HERE / "relax_reference_wide.extxyz", ":")
    pairs = list(zip(frames[0::2], frames[1::2], strict=True))
    rows = []
    for relax_cell in (False, True):
        chosen = [(s, m) for s, m in pairs if bool(m.info["relax_cell"]) == relax_cell]
        starts = []
        for start, _ in chosen:
            atoms = start.copy()
            atoms.calc = None
            starts.append(atoms)
        relaxed = molopt.relax(
            starts,
            potential="sevennet-0",
            optimizer="fire",
            fmax=FMAX,
            steps=3000,
            relax_cell=relax_cell,
            precision=precision,
        )
        for (start, theirs), mine in zip(chosen, relaxed, strict=True):
            shift = mine.positions - theirs.positions
            shift -= shift.mean(axis=0)
            rows.append(
                {
                    "label": start.info["label"],
                    "relax_cell": relax_cell,
                    "atoms": len(start),
                    "rmsd_A": float(np.sqrt((shift**2).sum(axis=1).mean())),
                    "cell_A": float(np.abs(mine.cell.array - theirs.cell.array).max()),
                    "dE_eV_per_atom": float(
                        (mine.get_potential_energy() - theirs.info["f32_energy"]) / len(start)
                    ),
                    "steps": int(mine.info["molopt_steps"]),
                    "ase_steps": int(theirs.info["steps"]),
                    "status": mine.info["molopt_status"],
                    "ase_converged": bool(theirs.info["converged"]),
                }
            )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="float64", choices=["float64", "float32"])
    args = parser.parse_args()
    rows = compare(args.precision)
    print(f"{'structure':24s} {'cell':>4s} {'RMSD A':>9s} {'dcell A':>9s} {'dE eV/at':>9s} "
          f"{'steps':>5s} {'ASE':>5s}")  # fmt: skip
    for r in rows:
        print(
            f"{r['label']:24s} {'yes' if r['relax_cell'] else 'no':>4s} {r['rmsd_A']:9.1e} "
            f"{r['cell_A']:9.1e} {abs(r['dE_eV_per_atom']):9.1e} {r['steps']:5d} "
            f"{r['ase_steps']:5d}"
        )
    for relax_cell in (False, True):
        part = [r for r in rows if r["relax_cell"] == relax_cell]
        same = sum(r["steps"] == r["ase_steps"] for r in part)
        print(
            f"{'cell relaxed' if relax_cell else 'fixed cell'}: {len(part)} structures, "
            f"max RMSD {max(r['rmsd_A'] for r in part):.1e} A, "
            f"max |dcell| {max(r['cell_A'] for r in part):.1e} A, "
            f"max |dE| {max(abs(r['dE_eV_per_atom']) for r in part):.1e} eV/atom, "
            f"same step count {same}/{len(part)}, "
            f"converged {sum(r['status'] == 'converged' for r in part)}/{len(part)}"
        )


if __name__ == "__main__":
    main()
