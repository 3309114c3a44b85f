"""Reference results of SevenNet-l3i5 (sevenn's calculator, float32) for a few structures.

    /tmp/venv-sevenn/bin/python data/sevennet/make_reference_l3i5.py

Evaluates the structures named in ``LABELS`` (taken from ``reference.extxyz``, the SevenNet-0
reference set) with ``SevenNetCalculator("7net-l3i5")`` and writes them to
``reference-l3i5.extxyz`` with ``f32_energy`` (eV), ``f32_forces`` (eV/A) and, for fully
periodic ones, ``f32_stress`` (3x3 flattened, eV/A^3).
"""

from __future__ import annotations

import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = (
    "rocksalt-MgO",
    "wurtzite-ZnO",
    "perovskite-SrTiO3",
    "alloy-fcc-FeCoNiCrMn",
    "slab-Pt111-O",
    "molecule-CH3CH2OH",
)


def main():
    from make_reference import need_sevenn, stored_frames

    need_sevenn()
    import ase.io
    import numpy as np
    import torch
    from sevenn.calculator import SevenNetCalculator

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    calc = SevenNetCalculator("7net-l3i5", device="cpu")
    out = stored_frames(LABELS)
    for atoms in out:
        work = atoms.copy()
        work.calc = calc
        atoms.info["f32_energy"] = work.get_potential_energy()
        atoms.arrays["f32_forces"] = np.asarray(work.get_forces(), np.float64)
        if atoms.pbc.all():
            atoms.info["f32_stress"] = work.get_stress(voigt=False).reshape(-1)
    ase.io.write(HERE / "reference-l3i5.extxyz", out, format="extxyz")


if __name__ == "__main__":
    main()
