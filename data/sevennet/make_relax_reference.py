"""Relaxed structures from ASE FIRE + sevenn's calculator, for comparison with molopt.

Run it where sevenn and torch are installed::

    /tmp/venv-sevenn/bin/python data/sevennet/make_relax_reference.py          # 10, fixed cell
    /tmp/venv-sevenn/bin/python data/sevennet/make_relax_reference.py --wide   # 30 + 30

Takes a spread of structures from ``reference.extxyz`` (their rattled coordinates and strained
cells as the start), relaxes each with ``ase.optimize.FIRE`` (ASE's defaults) and
``SevenNetCalculator("7net-0")`` to fmax 0.005 eV/A, and writes pairs of frames (start,
minimum; ``info["stage"]``) with the minimum's energy in ``info["f32_energy"]``: ten at fixed
cell to ``relax_reference.extxyz``; with ``--wide``, thirty at fixed cell and thirty crystals
with their cell relaxed too (``FrechetCellFilter``, ASE's defaults; ``info["relax_cell"]``) to
``relax_reference_wide.extxyz``.
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
#: --wide: the ten above and twenty more at fixed cell; thirty crystals with the cell free
WIDE_FIXED = LABELS + (
    "fcc-Al", "bcc-Fe", "hcp-Mg", "diamond-Si", "rocksalt-NaCl", "rocksalt-LiF",
    "zincblende-ZnS", "wurtzite-GaN", "cscl-CsCl", "fluorite-ZrO2", "perovskite-BaTiO3",
    "rutile-SnO2", "corundum-Al2O3", "layered-LiCoO2", "spinel-MgAl2O4", "slab-Cu100-CO",
    "slab-Ag111-H2O", "molecule-CH4", "molecule-C6H6", "cluster-Cu13",
)  # fmt: skip
WIDE_CELL = (
    "fcc-Cu", "fcc-Al", "bcc-Fe", "bcc-W", "hcp-Mg", "hcp-Ti", "diamond-Si", "diamond-C",
    "rocksalt-MgO", "rocksalt-NaCl", "rocksalt-LiF", "rocksalt-NiO", "zincblende-GaAs",
    "zincblende-ZnS", "wurtzite-ZnO", "wurtzite-GaN", "cscl-CsCl", "fluorite-CaF2",
    "fluorite-ZrO2", "perovskite-SrTiO3", "perovskite-BaTiO3", "rutile-TiO2", "rutile-SnO2",
    "corundum-Al2O3", "quartz-SiO2", "layered-LiCoO2", "spinel-MgAl2O4", "CdI2-MgCl2",
    "L12-Ni3Al", "heusler-Cu2MnAl",
)  # fmt: skip


def main():
    import sys

    from make_reference import need_sevenn, stored_frames

    need_sevenn()
    import ase.io
    import torch
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from sevenn.calculator import SevenNetCalculator

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    calc = SevenNetCalculator("7net-0", device="cpu")
    wide = "--wide" in sys.argv[1:]
    runs = [(label, False) for label in (WIDE_FIXED if wide else LABELS)]
    runs += [(label, True) for label in WIDE_CELL] if wide else []
    starts = stored_frames([label for label, _ in runs])
    out = []
    for (label, relax_cell), start in zip(runs, starts, strict=True):
        work = start.copy()
        work.calc = calc
        optimizer = FIRE(FrechetCellFilter(work) if relax_cell else work, logfile=None)
        converged = optimizer.run(fmax=FMAX, steps=3000)
        start.info["stage"] = "start"
        final = work.copy()
        final.info.update(
            label=label,
            stage="minimum",
            f32_energy=work.get_potential_energy(),
            steps=optimizer.nsteps,
            converged=bool(converged),
        )
        if wide:
            start.info["relax_cell"] = final.info["relax_cell"] = relax_cell
        out += [start, final]
        cell = "cell" if relax_cell else "    "
        print(
            f"{label:22s} {cell} {optimizer.nsteps:4d} steps  E {work.get_potential_energy():.6f}"
        )
    name = "relax_reference_wide.extxyz" if wide else "relax_reference.extxyz"
    ase.io.write(HERE / name, out, format="extxyz")


if __name__ == "__main__":
    main()
