"""ASE's constraints and FixSymmetry in molopt's batches, step for step against ASE (float64)."""

import numpy as np
import pytest
from ase import Atoms
from ase.constraints import (
    FixAtoms,
    FixBondLength,
    FixCartesian,
    FixCom,
    FixedLine,
    FixedPlane,
    FixScaled,
    FixSubsetCom,
    Hookean,
)
from conftest import rattled_cluster, structure_from_atoms
from test_optimizers import ase_relax, crystal

from molopt.engine import EngineSettings, relax
from molopt.errors import InputError


def cluster():
    s = rattled_cluster(13, seed=1)
    return Atoms(numbers=s.numbers, positions=s.positions)


#: name -> (structure maker, constraints); each relaxes within a few hundred steps at
#: fmax 0.01, where ASE's and molopt's paths agree to rounding
CASES = {
    "FixCartesian": (cluster, lambda: [FixCartesian([1, 4], mask=(True, False, True))]),
    "FixedLine": (cluster, lambda: [FixedLine([2, 6], direction=[1, 1, 0])]),
    "FixedPlane": (cluster, lambda: [FixedPlane([3, 8], direction=[0, 0.6, 0.8])]),
    "FixCom": (cluster, lambda: [FixCom()]),
    "FixSubsetCom": (cluster, lambda: [FixSubsetCom([0, 1, 2, 5])]),
    "Hookean": (
        cluster,
        lambda: [
            Hookean(0, 5, k=2.0, rt=3.0),  # atom-atom
            Hookean(7, (1.0, 2.0, 3.0), k=1.0, rt=1.0),  # atom-point
            Hookean(9, (0.0, 0.0, 1.0, -5.0), k=3.0),  # atom-plane
        ],
    ),
    "mixed": (
        cluster,
        lambda: [Hookean(0, 1, k=1.0, rt=3.5), FixAtoms([0]), FixedPlane([1], [0, 1, 0]), FixCom()],
    ),
    "FixScaled": (crystal, lambda: [FixScaled([0, 3], mask=(False, True, False))]),
    "Hookean-periodic": (crystal, lambda: [Hookean(0, 7, k=5.0, rt=2.0)]),
}


def constrained(name):
    make, constraints = CASES[name]
    atoms = make()
    atoms.set_constraint(constraints())
    return atoms


def molopt_relax(items, potential, optimizer, fmax, steps=2000, **kw):
    settings = EngineSettings(optimizer=optimizer, fmax=fmax, steps=steps, **kw)
    return {r.key: r for r in relax(items, potential, settings)}


@pytest.mark.parametrize("optimizer", ["fire", "lbfgs"])
@pytest.mark.parametrize("name", list(CASES))
def test_constraint_parity_with_ase(argon, name, optimizer):
    atoms = constrained(name)
    ref, ref_steps = ase_relax(atoms, optimizer, fmax=0.01)
    result = molopt_relax([("x", structure_from_atoms(atoms))], argon, optimizer, 0.01)["x"]
    assert result.status == "converged"
    assert result.steps == ref_steps
    # ASE's get_potential_energy includes the springs' energy (Hookean)
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(result.structure.positions, ref.positions, atol=1e-8)


def test_constraints_hold_as_in_ase(argon):
    """What each constraint promises, on molopt's own result."""
    atoms = cluster()
    atoms.set_constraint(
        [
            FixCartesian([1], mask=(True, False, True)),
            FixedLine([2], direction=[1, 1, 0]),
            FixedPlane([3], direction=[0, 0, 1]),
        ]
    )
    start = atoms.positions
    result = molopt_relax([("x", structure_from_atoms(atoms))], argon, "fire", 0.01)["x"]
    moved = result.structure.positions - start
    assert np.linalg.norm(moved[1]) > 1e-3
    np.testing.assert_allclose(moved[1, [0, 2]], 0.0, atol=1e-12)
    np.testing.assert_allclose(np.cross(moved[2], [1, 1, 0]), 0.0, atol=1e-12)
    assert moved[3, 2] == pytest.approx(0.0, abs=1e-12)

    atoms = cluster()
    atoms.set_constraint(FixCom())
    result = molopt_relax([("x", structure_from_atoms(atoms))], argon, "lbfgs", 0.01)["x"]
    np.testing.assert_allclose(
        result.structure.positions.mean(axis=0), atoms.positions.mean(axis=0), atol=1e-12
    )


def test_batch_of_different_constraints_equals_each_alone(argon):
    names = ["FixedLine", "Hookean", "FixCom", "FixScaled"]
    items = [(name, structure_from_atoms(constrained(name))) for name in names]
    items.append(("plain", structure_from_atoms(cluster())))
    together = molopt_relax(items, argon, "lbfgs", 0.01)
    for key, structure in items:
        alone = molopt_relax([(key, structure)], argon, "lbfgs", 0.01)[key]
        assert together[key].steps == alone.steps
        assert together[key].energy == pytest.approx(alone.energy, abs=1e-10)
        np.testing.assert_allclose(
            together[key].structure.positions, alone.structure.positions, atol=1e-9
        )


@pytest.mark.parametrize(
    "constraint, named",
    [
        (lambda: FixBondLength(0, 1), "FixBondLength"),
        (lambda: [FixCom(), FixAtoms([0])], "FixAtoms is listed after FixCom"),
    ],
)
def test_unsupported_constraint_is_an_error_naming_it(constraint, named):
    atoms = cluster()
    atoms.set_constraint(constraint())
    with pytest.raises(InputError) as info:
        structure_from_atoms(atoms)
    assert named in str(info.value)
