"""Cell-relaxation options against ASE's ``FrechetCellFilter`` with the same options, step for
step (float64): a mask of free strain components, hydrostatic strain, constant volume, a
scalar pressure, and a slab periodic in two directions with its in-plane cell free; a target
stress tensor (which ASE lacks) reached exactly; a batch mixing options equal to each alone."""

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111
from ase.calculators.lj import LennardJones as AseLJ
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS
from conftest import structure_from_atoms
from test_optimizers import crystal  # the sheared, rattled fcc argon of the cell tests

from molopt.config import GPA
from molopt.engine import EngineSettings, relax_structures
from molopt.io.h5md import read_parameters
from molopt.optimizers.cell_options import free_components, parse_mask, parse_stress

ASE_OPTIMIZERS = {"fire": FIRE, "lbfgs": LBFGS, "bfgs": BFGS}
IN_PLANE = (True, True, False, False, False, True)


def ase_relax(atoms, name, fmax, steps=3000, **options):
    atoms = atoms.copy()
    atoms.calc = AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5)
    opt = ASE_OPTIMIZERS[name](FrechetCellFilter(atoms, **options), logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return atoms, opt.nsteps


def settings(name, fmax, steps=3000, **options):
    return EngineSettings(optimizer=name, fmax=fmax, steps=steps, relax_cell=True, **options)


def molopt_relax(structures, potential, name, fmax, **options):
    items = [(k, structure_from_atoms(a)) for k, a in enumerate(structures)]
    results = relax_structures(items, potential, settings(name, fmax, **options))
    return {r.key: r for r in results}


def slab():
    """An argon fcc(111) slab periodic in x and y (vacuum along z), rattled and strained in
    the plane."""
    atoms = fcc111("Ar", size=(2, 2, 3), a=5.1, vacuum=6.0)
    atoms.info.clear()  # (its adsorbate_info does not go into extxyz)
    atoms.rattle(0.05, seed=5)
    strain = np.array([[0.03, 0.01, 0.0], [0.0, -0.02, 0.0], [0.0, 0.0, 0.0]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    assert list(atoms.pbc) == [True, True, False]
    return atoms


#: (molopt options, ASE FrechetCellFilter options, structure)
CASES = {
    "in-plane mask": ({"cell_mask": IN_PLANE}, {"mask": IN_PLANE}, crystal),
    "diagonal mask": (
        {"cell_mask": (True, True, True, False, False, False)},
        {"mask": [1, 1, 1, 0, 0, 0]},
        crystal,
    ),
    # masks that are not blocks of axes: U read back from the masked cell (a logm) each step
    "shear xy alone": (
        {"cell_mask": (False,) * 5 + (True,)},
        {"mask": [0, 0, 0, 0, 0, 1]},
        crystal,
    ),
    "all but xy": ({"cell_mask": (True,) * 5 + (False,)}, {"mask": [1, 1, 1, 1, 1, 0]}, crystal),
    "hydrostatic": ({"hydrostatic": True}, {"hydrostatic_strain": True}, crystal),
    "constant volume": ({"constant_volume": True}, {"constant_volume": True}, crystal),
    "constant volume, in-plane mask": (
        {"constant_volume": True, "cell_mask": IN_PLANE},
        {"constant_volume": True, "mask": IN_PLANE},
        crystal,
    ),
    "scalar pressure, hydrostatic": (
        {"pressure": 0.3 * GPA, "hydrostatic": True},
        {"scalar_pressure": 0.3 * GPA, "hydrostatic_strain": True},
        crystal,
    ),
    "2D slab": ({}, {"mask": IN_PLANE}, slab),
}


# BFGS's cell path is the same filter code (tests/test_bfgs.py has it with FrechetCellFilter):
# its nine cases run with -m slow
@pytest.mark.parametrize("name", ["fire", "lbfgs", pytest.param("bfgs", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_ase_filter_options(argon, name, case):
    options, ase_options, make = CASES[case]
    atoms = make()
    ref, ref_steps = ase_relax(atoms, name, fmax=1e-4, **ase_options)
    result = molopt_relax([atoms], argon, name, fmax=1e-4, **options)[0]
    assert result.status == "converged"
    assert result.steps == ref_steps
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(result.structure.cell, ref.cell.array, atol=1e-9)
    np.testing.assert_allclose(result.structure.positions, ref.positions, atol=1e-8)
    mask = free_components(options.get("cell_mask"), atoms.pbc)
    start = atoms.cell.array
    # the fixed components of the cell did not move (the vacuum direction of a slab)
    strain = np.linalg.solve(start, result.structure.cell) - np.eye(3)
    np.testing.assert_allclose(strain[~mask.T], 0.0, atol=1e-12)
    if options.get("constant_volume") and mask.all():
        # (with a mask, ASE's projection also removes a trace from fixed components, and the
        # volume is not kept: molopt does as ASE does)
        assert abs(result.structure.volume - atoms.get_volume()) < 1e-8


def test_in_plane_mask_moves_the_plane(argon):
    """The in-plane relaxations above are not trivially fixed cells: the plane changed."""
    result = molopt_relax([slab()], argon, "fire", fmax=1e-3)[0]
    start = slab().cell.array
    assert np.abs(result.structure.cell[:2] - start[:2]).max() > 1e-2
    np.testing.assert_array_equal(result.structure.cell[2], start[2])


def stress_of(atoms):
    atoms = atoms.copy()
    atoms.calc = AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5)
    return atoms.get_stress(voigt=False)


@pytest.mark.parametrize("name", ["fire", "lbfgs"])
def test_target_stress_is_reached(argon, name):
    """A full target stress tensor (GPa in the CLI; eV/A^3 here, positive = tensile as ASE
    reports stress): ASE's stress of the relaxed structure equals it, to what fmax allows
    (cell forces are virial / N: |stress - target| <~ fmax N / V)."""
    target = np.array([-0.05, -0.1, -0.02, 0.01, 0.0, -0.02]) * GPA
    atoms = crystal()
    fmax = 1e-5
    result = molopt_relax([atoms], argon, name, fmax=fmax, stress=tuple(target))[0]
    assert result.status == "converged"
    relaxed = result.structure
    got = stress_of(_atoms(relaxed))
    expected = np.array([[-0.05, -0.02, 0.0], [-0.02, -0.1, 0.01], [0.0, 0.01, -0.02]]) * GPA
    tolerance = 3 * fmax * len(atoms) / relaxed.volume
    np.testing.assert_allclose(got, expected, atol=tolerance)
    # and far from the unstressed minimum's stress
    free = molopt_relax([atoms], argon, name, fmax=fmax)[0]
    assert np.abs(stress_of(_atoms(free.structure)) - expected).max() > 50 * tolerance


def _atoms(structure):
    from ase import Atoms

    return Atoms(
        numbers=structure.numbers,
        positions=structure.positions,
        cell=structure.cell,
        pbc=structure.pbc,
    )


@pytest.mark.parametrize("name", ["fire", "lbfgs"])
def test_hydrostatic_target_stress_equals_scalar_pressure(argon, name):
    """``stress = -p`` on the diagonal is the pressure ``p``: the same steps, energies, cells."""
    p = 0.4 * GPA
    atoms = crystal()
    by_pressure = molopt_relax([atoms], argon, name, fmax=1e-4, pressure=p)[0]
    by_stress = molopt_relax([atoms], argon, name, fmax=1e-4, stress=(-p, -p, -p, 0, 0, 0))[0]
    assert by_stress.steps == by_pressure.steps
    assert by_stress.energy == pytest.approx(by_pressure.energy, abs=1e-12)
    np.testing.assert_allclose(by_stress.structure.cell, by_pressure.structure.cell, atol=1e-12)


@pytest.mark.parametrize("name", ["fire", "lbfgs"])
def test_batch_of_crystal_and_slab_equals_each_alone(argon, name):
    """A 3D crystal and a 2D slab in one batch: each its own mask, as if relaxed alone."""
    options = {"constant_volume": True}
    together = molopt_relax([crystal(), slab()], argon, name, fmax=1e-4, **options)
    for k, make in enumerate([crystal, slab]):
        alone = molopt_relax([make()], argon, name, fmax=1e-4, **options)[0]
        assert together[k].steps == alone.steps
        assert together[k].energy == pytest.approx(alone.energy, abs=1e-12)
        np.testing.assert_allclose(together[k].structure.cell, alone.structure.cell, atol=1e-12)


def test_parse_mask_and_stress():
    assert parse_mask("xx,yy,xy") == IN_PLANE
    assert parse_mask("yx, yy, xx") == IN_PLANE
    assert parse_mask("1,1,0,0,0,1") == IN_PLANE
    assert parse_mask("zz") == (False, False, True, False, False, False)
    assert parse_mask("xy") == (False,) * 5 + (True,)
    for bad, reason in [
        ("1,1,0", "six"),
        ("xq", "unknown"),
        ("0,0,0,0,0,0", "frees no"),
        ("", "empty"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_mask(bad)
    assert parse_stress("1, 2,3,4,5,6") == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    with pytest.raises(ValueError, match="six"):
        parse_stress("1,2")
    with pytest.raises(ValueError, match="numbers"):
        parse_stress("1,2,3,4,5,a")


# -- the command line -------------------------------------------------------------------------


def invoke(*args):
    from typer.testing import CliRunner

    from molopt.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def json_records(result):
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_cli_relaxes_a_slab_in_plane_beside_a_crystal(tmp_path):
    """A directory with a 2D slab and a 3D crystal: one run, each its own mask (the slab's
    in-plane, said in its record), the slab's cell ASE's with the in-plane mask."""
    (tmp_path / "in").mkdir()
    ase.io.write(tmp_path / "in" / "slab.extxyz", slab())
    ase.io.write(tmp_path / "in" / "bulk.extxyz", crystal())
    result = invoke(
        "relax", tmp_path / "in", "-o", tmp_path / "o", "--relax-cell", "--optimizer", "lbfgs",
        "--fmax", "1e-4", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    masks = {Path(r["input"]).stem: r["cell_mask"] for r in json_records(result)}
    assert masks == {"slab": "xx,yy,xy", "bulk": "xx,yy,zz,yz,xz,xy"}
    ref, _ = ase_relax(slab(), "lbfgs", fmax=1e-4, mask=IN_PLANE)
    relaxed = ase.io.read(tmp_path / "o" / "slab.extxyz")
    np.testing.assert_allclose(relaxed.cell.array, ref.cell.array, atol=1e-8)
    assert read_parameters(tmp_path / "o" / "slab.h5md")["cell_mask"] == "xx,yy,xy"


def test_cli_stress_is_gpa_with_ase_sign(tmp_path):
    """``--stress`` in GPa, positive = tensile: the stress written with the relaxed structure
    (ASE's ``get_stress``) is the target (fails without the GPa conversion or with the sign
    flipped)."""
    ase.io.write(tmp_path / "ar.extxyz", crystal())
    target = "-0.05,-0.1,-0.02,0.01,0,-0.02"
    result = invoke(
        "relax", tmp_path / "ar.extxyz", "-o", tmp_path / "o", "--relax-cell",
        f"--stress={target}", "--fmax", "1e-5", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    relaxed = ase.io.read(tmp_path / "o" / "ar.extxyz")
    expected = np.array([float(v) for v in target.split(",")]) * GPA
    np.testing.assert_allclose(relaxed.get_stress(), expected, atol=1e-6)
    options = read_parameters(tmp_path / "o" / "ar.h5md")["cell_options"]
    assert list(options["stress"]) == [-0.05, -0.1, -0.02, 0.01, 0.0, -0.02]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--relax-cell", "--cell-mask", "xx,qq"], "unknown cell component 'qq'"),
        (["--relax-cell", "--cell-mask", "1,1,0"], "six values"),
        (["--hydrostatic"], "only with relax_cell"),
        (["--relax-cell", "--stress", "1,2"], "six values"),
        (["--relax-cell", "--stress=1,1,1,0,0,0", "--pressure", "1"], "not both"),
        (["--relax-cell", "--hydrostatic", "--constant-volume"], "nothing to relax"),
    ],
)
def test_cli_bad_cell_options_are_usage_errors(tmp_path, args, message):
    ase.io.write(tmp_path / "ar.extxyz", crystal())
    result = invoke("relax", tmp_path / "ar.extxyz", "-o", tmp_path / "o", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_structures_without_a_free_cell_fail_alone(tmp_path):
    """A molecule (nothing periodic) and a slab whose mask frees only zz (its vacuum) fail,
    each with its reason; the crystal beside them relaxes."""
    (tmp_path / "in").mkdir()
    ase.io.write(tmp_path / "in" / "slab.extxyz", slab())
    ase.io.write(tmp_path / "in" / "bulk.extxyz", crystal())
    ase.io.write(tmp_path / "in" / "dimer.xyz", Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3.8]]))
    result = invoke(
        "relax", tmp_path / "in", "-o", tmp_path / "o", "--relax-cell", "--cell-mask", "zz",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 1
    by_stem = {Path(r["input"]).stem: r for r in json_records(result)}
    assert by_stem["bulk"]["status"] == "converged"
    assert "periodic in at least one direction" in by_stem["dimer"]["error"]
    assert "frees no component between the periodic directions (xy)" in by_stem["slab"]["error"]


def test_api_takes_the_cell_options(argon):
    """``molopt.relax`` passes the cell options through (checked as the CLI checks them)."""
    import molopt
    from molopt.errors import ConfigError

    atoms = crystal()
    atoms.calc = None
    relaxed = molopt.relax(
        atoms, "argon", "fire", fmax=1e-4, relax_cell=True, cell_mask="xx,yy,xy", steps=3000
    )
    ref, _ = ase_relax(crystal(), "fire", fmax=1e-4, mask=IN_PLANE)
    np.testing.assert_allclose(relaxed.cell.array, ref.cell.array, atol=1e-9)
    with pytest.raises(ConfigError, match="only with relax_cell"):
        molopt.relax(atoms, "argon", hydrostatic=True)


@pytest.mark.slow  # 16 s; by default test_api_takes_the_cell_options and the batch tests
def test_api_takes_cell_options_per_structure(argon):
    """A list of values gives each structure its own options, in one batch, each as if it
    were relaxed alone with them; a list of the wrong length is a ConfigError."""
    import molopt
    from molopt.errors import ConfigError

    images = [crystal(), crystal(), crystal()]
    options = dict(
        cell_mask=["xx,yy,xy", None, None],
        hydrostatic=[False, True, False],
        pressure=[0.0, 0.2, 0.0],
        fix_symmetry=[False, False, True],
    )
    together = molopt.relax(images, "argon", "lbfgs", fmax=1e-4, relax_cell=True, **options)
    for k, atoms in enumerate(images):
        own = {name: values[k] for name, values in options.items()}
        alone = molopt.relax(atoms, "argon", "lbfgs", fmax=1e-4, relax_cell=True, **own)
        assert together[k].info["molopt_steps"] == alone.info["molopt_steps"]
        np.testing.assert_allclose(together[k].cell.array, alone.cell.array, atol=1e-10)
    ref, _ = ase_relax(crystal(), "lbfgs", fmax=1e-4, mask=IN_PLANE)
    np.testing.assert_allclose(together[0].cell.array, ref.cell.array, atol=1e-9)
    with pytest.raises(ConfigError, match="2 values for 3 structures"):
        molopt.relax(images, "argon", relax_cell=True, hydrostatic=[True, False])
