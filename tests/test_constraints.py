"""ASE's constraints and FixSymmetry in molopt's batches, step for step against ASE (float64)."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones as AseLJ
from ase.constraints import (
    FixAtoms,
    FixBondLength,
    FixCartesian,
    FixCom,
    FixedLine,
    FixedPlane,
    FixScaled,
    FixSubsetCom,
    FixSymmetry,
    Hookean,
    dict2constraint,
)
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, FIRE2, LBFGS
from ase.spacegroup import crystal as spacegroup_crystal
from ase.spacegroup.symmetrize import check_symmetry, symmetrize_rank2
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from conftest import rattled_cluster, structure_from_atoms
from test_optimizers import ase_relax, crystal
from typer.testing import CliRunner

from molopt import symmetry
from molopt.batch import plan_layout
from molopt.cli import app
from molopt.constraints import parse_fix, selected_by_fix
from molopt.engine import EngineSettings, kernel, relax_structures
from molopt.engine.packing import pack_structures
from molopt.errors import InputError
from molopt.io import h5md
from molopt.optimizers.cell_options import CellOptions


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
    return {r.key: r for r in relax_structures(items, potential, settings)}


@pytest.mark.parametrize(
    "optimizer", ["fire", pytest.param("fire2", marks=pytest.mark.slow), "lbfgs", "bfgs"]
)
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
    """Structures with different constraints, one keeping its symmetry, one with none."""
    names = ["FixedLine", "Hookean", "FixCom", "FixScaled"]
    items = [(name, structure_from_atoms(constrained(name))) for name in names]
    items.append(("plain", structure_from_atoms(cluster())))
    items.append(("symmetry", symmetry.prepare(structure_from_atoms(symmetric_crystal()))))
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


# --- outputs and the command line --------------------------------------------------------


def relax_cli(tmp_path, inputs, *args):
    result = CliRunner().invoke(
        app,
        [
            "relax",
            *map(str, inputs),
            "--potential",
            "argon",
            "--out-dir",
            str(tmp_path / "out"),
            "--json",
            "--fmax",
            "0.01",
            *args,
        ],
    )
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, {Path(r["input"]).stem: r for r in records}


def test_outputs_keep_the_constraints(tmp_path):
    atoms = cluster()
    atoms.set_constraint(
        [
            FixAtoms([0, 2]),
            FixCartesian([4], mask=(False, False, True)),
            FixedLine([5], direction=[0, 0, 1]),
            Hookean(6, 7, k=1.0, rt=3.0),
        ]
    )
    ase.io.write(tmp_path / "c.traj", atoms)
    result, records = relax_cli(tmp_path, [tmp_path / "c.traj"])
    assert result.exit_code == 0, result.output
    assert records["c"]["status"] == "converged"
    want = [c.todict() for c in atoms.constraints]

    # the extxyz: FixAtoms/FixCartesian in ASE's move_mask, all of them for molopt
    relaxed = ase.io.read(tmp_path / "out" / "c.extxyz")
    mask = np.ones((len(atoms), 3), bool)
    mask[[0, 2]] = False
    mask[4, 2] = False
    got = np.ones((len(atoms), 3), bool)
    for c in relaxed.constraints:
        got[c.index] &= ~np.asarray(getattr(c, "mask", (True,) * 3))
    np.testing.assert_array_equal(got, mask)
    again = structure_from_atoms(relaxed)
    assert [c["name"] for c in again.constraints] == [c["name"] for c in want]
    # molopt's energy is ASE's get_potential_energy (springs included) when read back (to
    # the 1e-8 A that extxyz prints positions with)
    relaxed.set_constraint([dict2constraint(c) for c in again.constraints])
    assert relaxed.get_potential_energy() == pytest.approx(records["c"]["energy"], abs=1e-7)

    # the trajectory's /parameters, and molopt convert
    params = h5md.read_parameters(tmp_path / "out" / "c.h5md")
    assert [c["name"] for c in params["constraints"]] == [c["name"] for c in want]
    converted = tmp_path / "c-out.traj"
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "out" / "c.h5md"), str(converted), "--frames", "-1"]
    )
    assert result.exit_code == 0, result.output
    back = ase.io.read(converted)
    assert [c.todict()["name"] for c in back.constraints] == [c["name"] for c in want]
    np.testing.assert_allclose(back.constraints[2].dir, [0, 0, 1])


def test_fix_from_the_command_line(tmp_path):
    atoms = cluster()
    ase.io.write(tmp_path / "a.xyz", atoms)
    result, records = relax_cli(tmp_path, [tmp_path / "a.xyz"], "--fix", "0-2, 7,z<1.0")
    assert result.exit_code == 0, result.output
    relaxed = ase.io.read(tmp_path / "out" / "a.extxyz")
    want = {0, 1, 2, 7} | set(np.nonzero(atoms.positions[:, 2] < 1.0)[0].tolist())
    (fix,) = relaxed.constraints
    assert set(fix.index.tolist()) == want
    moved = np.linalg.norm(relaxed.positions - atoms.positions, axis=1)
    assert np.all(moved[sorted(want)] < 1e-7) and moved.max() > 1e-3  # extxyz prints 1e-8 A


def test_fix_syntax():
    numbers = np.array([18, 78, 18, 78])
    positions = np.array([[0, 0, 1.0], [0, 0, 6.0], [0, 0, 4.0], [0, 0, 9.0]])
    chosen = selected_by_fix("element:Pt", numbers, positions)
    np.testing.assert_array_equal(chosen, [False, True, False, True])
    np.testing.assert_array_equal(selected_by_fix("z<5", numbers, positions), [1, 0, 1, 0])
    np.testing.assert_array_equal(selected_by_fix("3,z>8.5,0-1", numbers, positions), [1, 1, 0, 1])
    for bad in ("element:Xx", "z<", "3-1", "q>1", ""):
        with pytest.raises(ValueError):
            parse_fix(bad)
    with pytest.raises(ValueError, match="atom 9 of a 4-atom"):
        selected_by_fix("5-9", numbers, positions)


def test_unsupported_constraint_fails_that_structure_alone(tmp_path):
    bad = cluster()
    bad.set_constraint(FixBondLength(0, 1))
    ase.io.write(tmp_path / "bad.traj", bad)
    ase.io.write(tmp_path / "good.xyz", cluster())
    result, records = relax_cli(tmp_path, [tmp_path / "bad.traj", tmp_path / "good.xyz"])
    assert result.exit_code == 1
    assert records["bad"]["status"] == "failed"
    assert "FixBondLength" in records["bad"]["error"] and "bad.traj" in records["bad"]["error"]
    assert records["good"]["status"] == "converged"


# --- symmetry -------------------------------------------------------------------------------


def symmetric_crystal():
    """fcc argon with one atom pushed along z and the cell stretched along z (P4mm), then
    rattled well inside the symmetry tolerance: refining gives P4mm back."""
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((2, 2, 2))
    atoms.positions[0] += [0.0, 0.0, 0.3]
    atoms.set_cell(atoms.cell.array @ np.diag([1.0, 1.0, 1.03]), scale_atoms=True)
    atoms.rattle(0.001, seed=2)
    return atoms


def test_refine_and_operations_match_ase():
    atoms = symmetric_crystal()
    ref = atoms.copy()
    constraint = FixSymmetry(ref, symprec=0.01)  # refines ref in place
    mine = symmetry.prepare(structure_from_atoms(atoms), 0.01)
    np.testing.assert_allclose(mine.cell, ref.cell.array, atol=1e-12)
    np.testing.assert_allclose(mine.positions, ref.positions, atol=1e-12)
    assert (mine.symmetry.number, mine.symmetry.symbol) == (99, "P4mm")
    np.testing.assert_array_equal(mine.symmetry.rotations, constraint.rotations)
    np.testing.assert_array_equal(mine.symmetry.image, constraint.symm_map)


def test_group_averages_match_ase():
    """Forces and stress averaged over the operations as ASE's symmetrize_rank1/rank2."""
    atoms = symmetric_crystal()
    constraint = FixSymmetry(atoms)
    structure = symmetry.prepare(structure_from_atoms(atoms))
    layout = plan_layout([structure.n_atoms])
    packed = symmetry.pack([structure.symmetry], layout, np.float64)
    rng = np.random.default_rng(0)
    forces = np.zeros((layout.n_padded_atoms, 3))
    forces[: len(atoms)] = rng.normal(size=(len(atoms), 3))
    stress = rng.normal(size=(3, 3))
    stress = stress + stress.T
    cells = np.zeros((layout.n_systems, 3, 3))
    cells[0] = atoms.cell.array
    system_idx = np.full(layout.n_padded_atoms, layout.n_systems)
    system_idx[: len(atoms)] = 0
    mine = symmetry.symmetrize_vectors(packed, forces, cells, system_idx, layout.n_systems)
    want = forces[: len(atoms)].copy()
    constraint.adjust_forces(atoms, want)
    np.testing.assert_allclose(np.asarray(mine)[: len(atoms)], want, atol=1e-13)
    tensors = np.zeros((layout.n_systems, 3, 3))
    tensors[0] = stress
    voigt = full_3x3_to_voigt_6_stress(stress)
    constraint.adjust_stress(atoms, voigt)
    mine = symmetry.symmetrize_tensors(packed, tensors, cells)
    np.testing.assert_allclose(np.asarray(mine)[0], voigt_6_to_full_3x3_stress(voigt), atol=1e-13)


@pytest.mark.parametrize("optimizer", ["fire", "lbfgs"])
@pytest.mark.parametrize("cell", [False, True])
def test_fix_symmetry_parity_with_ase(argon, optimizer, cell):
    """ASE's FixSymmetry (+ FrechetCellFilter with a variable cell), step for step; the
    relaxed structure still has every operation it started with."""
    atoms = symmetric_crystal()
    ref = atoms.copy()
    ref.calc = AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5)
    ref.set_constraint(FixSymmetry(ref))
    opt = {"fire": FIRE, "lbfgs": LBFGS}[optimizer](
        FrechetCellFilter(ref) if cell else ref, logfile=None
    )
    opt.run(fmax=1e-3, steps=1000)
    start = symmetry.prepare(structure_from_atoms(atoms))
    result = molopt_relax([("x", start)], argon, optimizer, 1e-3, relax_cell=cell)["x"]
    assert result.status == "converged"
    assert result.steps == opt.nsteps
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(result.structure.positions, ref.positions, atol=1e-8)
    np.testing.assert_allclose(result.structure.cell, ref.cell.array, atol=1e-8)
    assert_keeps_operations(result.structure, start.symmetry)


def assert_keeps_operations(structure, kept):
    """Every operation of ``kept`` still maps ``structure`` onto itself (to 1e-8)."""
    fractional = np.linalg.solve(structure.cell.T, structure.positions.T).T
    for rotation, translation, image in zip(
        kept.rotations, kept.translations, kept.image, strict=True
    ):
        offset = fractional @ rotation.T + translation - fractional[image]
        offset -= np.round(offset)
        assert np.abs(offset).max() < 1e-8


def test_symmetry_records_and_symmetrize(tmp_path):
    atoms = symmetric_crystal()
    ase.io.write(tmp_path / "p4mm.traj", atoms)
    result, records = relax_cli(
        tmp_path, [tmp_path / "p4mm.traj"], "--fix-symmetry", "--relax-cell", "--symmetrize"
    )
    assert result.exit_code == 0, result.output
    rec = records["p4mm"]
    assert rec["spacegroup_initial"] == {"symbol": "P4mm", "number": 99}
    assert rec["spacegroup_final"]["number"] in (99, 123, 129, 139, 221, 225)  # P4mm or above
    params = h5md.read_parameters(tmp_path / "out" / "p4mm.h5md")
    assert params["spacegroup_initial"] == {"symbol": "P4mm", "number": 99}
    relaxed = ase.io.read(tmp_path / "out" / "p4mm.extxyz")
    assert check_symmetry(relaxed, 1e-6).number == rec["spacegroup_final"]["number"]


@pytest.mark.parametrize("variable_cell", [False, True])
def test_steps_are_symmetrized_as_ase(argon, variable_cell):
    """A step that breaks the symmetry is averaged as FixSymmetry.adjust_positions does (in
    the reference cell's fractional coordinates with a variable cell), the cell step as
    symmetrize_rank2 averages a deformation."""
    atoms = symmetric_crystal()
    constraint = FixSymmetry(atoms)
    structure = symmetry.prepare(structure_from_atoms(atoms))
    batch, positions, cells, layout = pack_structures([structure], argon, np.float64)
    n = len(atoms)
    rng = np.random.default_rng(1)
    step = np.zeros((layout.n_padded_atoms + (3 * layout.n_systems if variable_cell else 0), 3))
    step[:n] = rng.normal(scale=0.01, size=(n, 3))
    cell_step = rng.normal(scale=0.01, size=(3, 3))
    if variable_cell:
        step[layout.n_padded_atoms : layout.n_padded_atoms + 3] = cell_step
    program = SimpleNamespace(variable_cell=variable_cell)
    reference = SimpleNamespace(cell=cells)
    # with a variable cell the current cell has moved away from the reference
    current = cells @ (np.eye(3) + rng.normal(scale=0.02, size=(3, 3))) if variable_cell else cells
    x = np.zeros_like(step)  # read only for the deformation of constraints' maps
    mine = np.asarray(kernel._constrain_step(step, x, current, batch, program, reference))
    new = atoms.positions + step[:n]
    constraint.adjust_positions(atoms, new)
    np.testing.assert_allclose(mine[:n], new - atoms.positions, atol=1e-14)
    if variable_cell:
        cell = atoms.cell.array
        want = symmetrize_rank2(cell, np.linalg.inv(cell), cell_step, constraint.rotations)
        got = mine[layout.n_padded_atoms : layout.n_padded_atoms + 3]
        np.testing.assert_allclose(got, want, atol=1e-14)


def test_bad_fix_and_symmetry_requests(tmp_path):
    ase.io.write(tmp_path / "a.xyz", cluster())
    result, _ = relax_cli(tmp_path, [tmp_path / "a.xyz"], "--fix", "0-x")
    assert result.exit_code == 2 and "fix" in result.output and "0-x" in result.output
    result, _ = relax_cli(tmp_path, [tmp_path / "a.xyz"], "--fix-symmetry", "--symprec", "0")
    assert result.exit_code == 2 and "symprec" in result.output
    result, records = relax_cli(tmp_path, [tmp_path / "a.xyz"], "--fix-symmetry")
    assert records["a"]["status"] == "failed"
    assert "periodic in all three directions" in records["a"]["error"]
    result, records = relax_cli(tmp_path, [tmp_path / "a.xyz"], "--fix", "40")
    assert records["a"]["status"] == "failed" and "atom 40 of a 13-atom" in records["a"]["error"]


# --- with a variable cell ----------------------------------------------------------------

ASE_OPTIMIZERS = {"fire": FIRE, "fire2": FIRE2, "lbfgs": LBFGS, "bfgs": BFGS}

#: each constraint on the sheared, rattled 8-atom argon crystal whose cell relaxes
CELL_CASES = {
    "FixAtoms": lambda: [FixAtoms([0, 5])],
    "FixCartesian": lambda: [FixCartesian([1, 4], mask=(True, False, True))],
    "FixScaled": lambda: [FixScaled([0, 3], mask=(False, True, False))],
    "FixedLine": lambda: [FixedLine([2, 6], direction=[1, 1, 0])],
    "FixedPlane": lambda: [FixedPlane([3, 7], direction=[0, 0.6, 0.8])],
    "FixCom": lambda: [FixCom()],
    # soft, so that springs the stress does not see still let the cell settle (as in ASE)
    "Hookean": lambda: [Hookean(0, 7, k=0.5, rt=3.4), Hookean(6, (0.0, 0.0, 1.0, -20.0), k=1.0)],
    "mixed": lambda: [
        FixScaled([2], mask=(True, False, False)),
        FixedLine([4], [0, 0, 1]),
        Hookean(0, 1, k=1.0, rt=3.5),
        FixAtoms([5]),
    ],
}


def ase_cell_relax(atoms, optimizer, fmax, calc=None, steps=3000, **options):
    ref = atoms.copy()
    ref.calc = calc or AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5)
    if any(isinstance(c, FixSymmetry) for c in atoms.constraints):
        ref.set_constraint()  # FixSymmetry refines what it is made for: no old one acting
        ref.set_constraint(FixSymmetry(ref))
    opt = ASE_OPTIMIZERS[optimizer](FrechetCellFilter(ref, **options), logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return ref, opt.nsteps


def assert_as_ase(result, ref, ref_steps, tol=1e-8):
    assert result.status == "converged"
    assert result.steps == ref_steps
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(result.structure.positions, ref.positions, atol=tol)
    np.testing.assert_allclose(result.structure.cell, ref.cell.array, atol=tol)


# FIRE, FIRE2 and BFGS take the same constraint code (the kernel's) as LBFGS: run with -m slow
# (about 45 s on two cores, kept out of CI's 20 minutes; test_constraint_parity_with_ase runs
# every constraint under FIRE with a fixed cell by default)
@pytest.mark.parametrize(
    "optimizer",
    [
        pytest.param("fire", marks=pytest.mark.slow),
        pytest.param("fire2", marks=pytest.mark.slow),
        "lbfgs",
        pytest.param("bfgs", marks=pytest.mark.slow),
    ],
)
def test_constraints_with_a_variable_cell_as_ase(argon, optimizer):
    """Every constraint while the cell relaxes, all in one batch, each step for step as ASE's
    FrechetCellFilter on that structure alone (ASE sets the new cell, then the constraints act
    on the Cartesian step in it; FixScaled holds fractional coordinates of the new cell)."""
    structures = {}
    for name, constraints in CELL_CASES.items():
        atoms = crystal()
        atoms.set_constraint(constraints())
        structures[name] = atoms
    items = [(name, structure_from_atoms(a)) for name, a in structures.items()]
    results = molopt_relax(items, argon, optimizer, 1e-3, steps=3000, relax_cell=True)
    for name, atoms in structures.items():
        ref, ref_steps = ase_cell_relax(atoms, optimizer, 1e-3)
        assert_as_ase(results[name], ref, ref_steps)
    moved = results["FixScaled"].structure
    start = structures["FixScaled"]
    fractional = np.linalg.solve(moved.cell.T, moved.positions.T).T
    np.testing.assert_allclose(fractional[[0, 3], 1], start.get_scaled_positions()[[0, 3], 1])
    assert not np.allclose(moved.cell, start.cell.array, atol=1e-3)  # the cell did relax


def test_fixscaled_with_another_constraint_on_the_atom_is_refused_with_a_cell(tmp_path):
    atoms = crystal()
    atoms.set_constraint([FixScaled([1], mask=(True, False, False)), FixedLine([1], [0, 0, 1])])
    ase.io.write(tmp_path / "both.traj", atoms)
    result, records = relax_cli(tmp_path, [tmp_path / "both.traj"], "--relax-cell")
    assert records["both"]["status"] == "failed"
    assert "FixScaled on an atom that another constraint" in records["both"]["error"]
    result, records = relax_cli(tmp_path, [tmp_path / "both.traj"])  # fixed cell: fine
    assert records["both"]["status"] == "converged"


def ase_atoms(structure):
    return Atoms(
        numbers=structure.numbers,
        positions=structure.positions,
        cell=structure.cell,
        pbc=structure.pbc,
    )


def rutile():
    """Rutile (P4_2/mnm, 6 atoms) as AgO2 (EMT has no Ti), rattled inside symprec."""
    atoms = spacegroup_crystal(
        ["Ag", "O"],
        basis=[(0, 0, 0), (0.3, 0.3, 0)],
        spacegroup=136,
        cellpar=[5.2, 5.2, 3.38, 90, 90, 90],
    )
    atoms.rattle(0.0005, seed=4)
    return atoms


def wurtzite():
    """Wurtzite AlN (P6_3mc), rattled inside symprec."""
    atoms = bulk("AlN", "wurtzite", a=3.11, c=4.98)
    atoms.rattle(0.0005, seed=5)
    return atoms


@pytest.mark.parametrize(
    "optimizer", ["fire", "lbfgs", pytest.param("bfgs", marks=pytest.mark.slow)]
)
def test_rattled_rutile_and_wurtzite_keep_their_space_group_as_ase(optimizer):
    """FixSymmetry + FrechetCellFilter with EMT, molopt's EMT beside ASE's: the rattled cells
    (P1 at 1e-5 A) are refined to their group, relax step for step as ASE's (one batch), and
    end in that group at 1e-6 A (or a supergroup: EMT flattens AlN towards P6_3/mmc)."""
    from molopt.potentials.registry import load

    emt = load("emt").potential
    starts = {
        "rutile": (rutile(), "P4_2/mnm"),
        "wurtzite": (wurtzite(), "P6_3mc"),
    }
    allowed = {"rutile": {136}, "wurtzite": {186, 194}}
    items = []
    for name, (atoms, group) in starts.items():
        assert check_symmetry(atoms, 1e-5).international == "P1"
        start = symmetry.prepare(structure_from_atoms(atoms))
        assert start.symmetry.symbol == group
        items.append((name, start))
    results = molopt_relax(items, emt, optimizer, 1e-3, steps=2000, relax_cell=True)
    for name, start in items:
        atoms = starts[name][0].copy()
        atoms.set_constraint(FixSymmetry(atoms.copy()))
        ref, ref_steps = ase_cell_relax(atoms, optimizer, 1e-3, calc=EMT(), steps=2000)
        assert_as_ase(results[name], ref, ref_steps, tol=1e-7)
        for structure in (start, results[name].structure):
            found = check_symmetry(ase_atoms(structure), 1e-6).number
            assert found in allowed[name], (name, found)
        assert not np.allclose(results[name].structure.cell, start.cell, atol=1e-3)


@pytest.mark.slow  # 17 s; by default test_batch_of_different_constraints_equals_each_alone
def test_one_batch_mixing_constraints_symmetry_and_cell_options(argon):
    """Each structure its own cell options, constraints or symmetry, in one batch, each step
    for step as ASE on that structure alone; a target stress tensor (which ASE lacks) equal to
    relaxing that structure alone."""
    in_plane = (True, True, False, False, False, True)
    cases = {
        "in-plane+FixScaled": (
            [FixScaled([0, 3], mask=(False, True, False))],
            CellOptions(mask=in_plane),
            {"mask": in_plane},
        ),
        "hydrostatic+Hookean": (
            [Hookean(0, 7, k=0.5, rt=3.4)],
            CellOptions(hydrostatic=True, pressure=0.02),
            {"hydrostatic_strain": True, "scalar_pressure": 0.02},
        ),
        "constant-volume+FixCom": (
            [FixCom()],
            CellOptions(constant_volume=True),
            {"constant_volume": True},
        ),
        "xy-shear+FixedPlane": (
            [FixedPlane([3, 7], direction=[0, 0.6, 0.8])],
            CellOptions(mask=(False,) * 5 + (True,)),
            {"mask": [0, 0, 0, 0, 0, 1]},
        ),
        "symmetry": (None, None, {}),
    }
    atoms_of, items = {}, []
    for name, (constraints, options, _) in cases.items():
        if constraints is None:
            atoms = symmetric_crystal()
            structure = symmetry.prepare(structure_from_atoms(atoms))
            atoms.set_constraint(FixSymmetry(atoms.copy()))
        else:
            atoms = crystal()
            atoms.set_constraint(constraints)
            structure = structure_from_atoms(atoms)
        atoms_of[name] = atoms
        items.append((name, dataclasses.replace(structure, cell_options=options)))
    stress = (-5e-4, -3e-4, -4e-4, 0.0, 1e-4, 0.0)  # eV/A^3, compressive (argon)
    target = structure_from_atoms(crystal())
    items.append(("stress", dataclasses.replace(target, cell_options=CellOptions(stress=stress))))
    results = molopt_relax(items, argon, "lbfgs", 1e-3, steps=3000, relax_cell=True)
    for name, (_, _, ase_options) in cases.items():
        ref, ref_steps = ase_cell_relax(atoms_of[name], "lbfgs", 1e-3, **ase_options)
        assert_as_ase(results[name], ref, ref_steps)
    alone = molopt_relax([items[-1]], argon, "lbfgs", 1e-3, steps=3000, relax_cell=True)
    assert results["stress"].steps == alone["stress"].steps
    np.testing.assert_allclose(
        results["stress"].structure.cell, alone["stress"].structure.cell, atol=1e-10
    )
    reached = full_3x3_to_voigt_6_stress(results["stress"].stress)
    # cell forces below fmax: the virial / N, so the stress within fmax N / V
    np.testing.assert_allclose(reached, stress, atol=5e-5)
