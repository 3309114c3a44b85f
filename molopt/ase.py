"""``MoloptCalculator``: any molopt potential as an ASE calculator (energy, forces, stress),
evaluated by the same jit-compiled code as ``molopt relax``.

    from molopt.ase import MoloptCalculator
    atoms.calc = MoloptCalculator("argon")
    BFGS(atoms).run(fmax=0.01)
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress


class MoloptCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, potential="argon", precision: str = "float64", **kwargs):
        super().__init__(**kwargs)
        from molopt.api import load_potential

        self.potential = load_potential(potential)
        self.precision = precision

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        from molopt.engine import evaluate_structures
        from molopt.io.read import from_atoms

        a = self.atoms.copy()
        a.set_constraint()  # constraints are ASE's business, not the potential's
        structure = from_atoms(a, "<ase calculator>")
        want_stress = "stress" in properties and a.pbc.all()
        ((energy, forces, stress),) = evaluate_structures(
            [structure], self.potential, stress=want_stress, precision=self.precision
        )
        self.results = {"energy": energy, "free_energy": energy, "forces": np.array(forces)}
        if stress is not None:
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
