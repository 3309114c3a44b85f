"""Relaxed structures from ASE FIRE + sevenn's calculator, for comparison with molopt.

Run it where sevenn and torch are installed::

    /tmp/venv-sevenn/bin/python data/sevennet/make_relax_reference.py

Takes a spread of structures from ``reference.extxyz`` (their rattled coordinates as the
start), relaxes each at fixed cell with ``ase.optimize.FIRE`` (ASE's defaults) and
``SevenNetCalculator("7net-0")`` to fmax 0.005 eV/A, and writes pairs of frames (start,
minimum; ``info["stage"]``) to ``relax_reference.extxyz`` with the minimum's energy in
``info["f32_energy"]``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
FMAX = 0.005
LABELS = (
    "rocksalt-MgO",
    "wurtzite-ZnO",
    "perovskite-SrTiO3",
    "fluorite-CaF2",
    "rutile-TiO2",
    "zincblende-GaAs",
    "fcc-Cu",
    "slab-Pt111-O",
    "molecule-H2O",
    "molecule-CH3CH2OH",
)


def main():
    from make_reference import need_sevenn, stored_frames

    need_sevenn()
    import ase.io
    import torch
    from ase.optimize import FIRE
    from sevenn.calculator import SevenNetCalculator

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    calc = SevenNetCalculator("7net-0", device="cpu")
    out = []
    for label, start in zip(LABELS, stored_frames(LABELS), strict=True):
        work = start.copy()
        work.calc = calc
        optimizer = FIRE(work, logfile=None)
        converged = optimizer.run(fmax=FMAX, steps=2000)
        start.info["stage"] = "start"
        final = work.copy()
        final.info.update(
            label=label,
            stage="minimum",
            f32_energy=work.get_potential_energy(),
            steps=optimizer.nsteps,
            converged=bool(converged),
        )
        out += [start, final]
        print(f"{label:22s} {optimizer.nsteps:4d} steps  E {work.get_potential_energy():.6f}")
    ase.io.write(HERE / "relax_reference.extxyz", out, format="extxyz")


if __name__ == "__main__":
    main()
