"""BFGS against ASE's own (``ase.optimize.BFGS``): same steps, same energies in float64,
fixed and variable cell, constraints, options; in batches, refilled and compacted."""

import dataclasses
import json
import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.lj import LennardJones as AseLJ
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.io import read
from ase.optimize import BFGS as AseBFGS
from conftest import EXAMPLES, rattled_cluster, structure_from_atoms
from test_batch import compact_cluster, mixed_structures
from test_optimizers import cluster, crystal, lj13_start, molopt_relax
from typer.testing import CliRunner

from molopt import engine as E
from molopt.cli import app
from molopt.config import GPA
from molopt.engine import EngineSettings, relax_structures
from molopt.optimizers import option_names
from molopt.optimizers.bfgs import BFGS, LARGE_SYSTEM_ATOMS, block_rows
from molopt.optimizers.rows import Rows
from molopt.potentials.lennard_jones import LennardJones


def ase_bfgs(atoms, fmax, cell=False, pressure=0.0, **options):
    """ASE's BFGS on a copy of ``atoms`` (argon LJ as molopt's shipped ``argon``)."""
    atoms = atoms.copy()
    atoms.calc = AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5)
    target = FrechetCellFilter(atoms, scalar_pressure=pressure) if cell else atoms
    opt = AseBFGS(target, logfile=None, **options)
    opt.run(fmax=fmax, steps=5000)
    return atoms, opt.nsteps


def ar55():
    """The shipped example: a rattled 55-atom argon cluster."""
    return read(os.path.join(EXAMPLES, "ar55-cluster.xyz"))


def rattled19():
    """19 argon atoms rattled off a grid: 373 BFGS steps. (Some rattled clusters are
    chaotic under BFGS: from 13 atoms with seed 1, ASE itself takes 437 or 438 steps when one
    coordinate of the start moves by 1e-14 A; no two implementations agree step for step
    there.)"""
    s = rattled_cluster(19, seed=2)
    return Atoms(numbers=s.numbers, positions=s.positions)


def fixed_crystal():
    atoms = crystal()
    atoms.set_constraint(FixAtoms(indices=[0, 5]))
    return atoms


def assert_same_relaxation(result, ref, ref_steps, atol_energy=1e-10):
    assert result.status == "converged"
    assert result.steps == ref_steps
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=atol_energy)
    np.testing.assert_allclose(result.structure.positions, ref.positions, atol=1e-6)


@pytest.mark.parametrize("make", [ar55, rattled19, crystal, fixed_crystal])
def test_parity_with_ase_fixed_cell(argon, make):
    atoms = make()
    ref, ref_steps = ase_bfgs(atoms, fmax=1e-4)
    result = molopt_relax(atoms, argon, "bfgs", fmax=1e-4)
    assert_same_relaxation(result, ref, ref_steps)
    fixed = atoms.constraints[0].index if atoms.constraints else []
    np.testing.assert_array_equal(result.structure.positions[fixed], atoms.positions[fixed])


@pytest.mark.parametrize("pressure_gpa", [0.0, 0.5])
def test_parity_with_ase_frechet_cell_filter(argon, pressure_gpa):
    atoms = crystal()
    p = pressure_gpa * GPA
    ref, ref_steps = ase_bfgs(atoms, fmax=1e-4, cell=True, pressure=p)
    result = molopt_relax(atoms, argon, "bfgs", fmax=1e-4, cell=True, pressure=p)
    assert_same_relaxation(result, ref, ref_steps)
    np.testing.assert_allclose(result.structure.cell, ref.cell.array, atol=1e-8)


@pytest.mark.parametrize(
    "options, make",
    [
        ({"maxstep": 0.05}, cluster),
        ({"alpha": 20.0}, crystal),
        ({"maxstep": 0.1, "alpha": 150.0}, cluster),
    ],
)
def test_parity_with_ase_non_default_options(argon, options, make):
    atoms = make()
    ref, ref_steps = ase_bfgs(atoms, fmax=1e-4, **options)
    result = molopt_relax(
        atoms, argon, "bfgs", fmax=1e-4, optimizer_options=tuple(sorted(options.items()))
    )
    assert_same_relaxation(result, ref, ref_steps)


def test_steps_equal_ase_bfgs_step_for_step():
    """Two systems (3 and 5 rows, row order interleaved, one padding row) driven with random
    forces, so that the Hessian becomes indefinite (the step divides by |eigenvalue|), a
    step repeats a configuration (ASE skips that update), and steps get scaled to maxstep:
    each system's steps and Hessian are those of ASE's BFGS fed the same points."""
    rng = np.random.default_rng(4)
    system_idx = np.array([1, 1, 0, 1, 0, 0, 1, 1, 2])  # the last row: padding
    optimizer = BFGS(maxstep=0.15, alpha=30.0, system_rows=6)
    rows = Rows(jnp.asarray(system_idx), 2)
    state = optimizer.init(len(system_idx), 2, jnp.float64)
    references = []
    for k in range(2):
        members = system_idx == k
        references.append(
            AseBFGS(Atoms(f"Ar{members.sum()}"), logfile=None, maxstep=0.15, alpha=30.0)
        )
    x = rng.normal(size=(len(system_idx), 3))
    lowest = np.inf
    previous = moved = np.zeros_like(x)
    for step in range(8):
        forces = rng.normal(size=x.shape) * 0.5
        if step == 2:  # forces that grow along the last step: negative curvature
            forces = previous + 100.0 * moved
        forces[system_idx == 2] = 0.0
        state, dx, _ = optimizer.step(
            state, jnp.asarray(x), jnp.asarray(forces), jnp.ones(2, bool), rows
        )
        dx = np.asarray(dx)
        for k, ref in enumerate(references):
            members = system_idx == k
            n = 3 * members.sum()
            expected, lengths = ref.prepare_step(x[members].ravel(), -forces[members].ravel())
            expected = ref.determine_step(expected, lengths).reshape(-1, 3)
            np.testing.assert_allclose(dx[members], expected, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(
                np.asarray(state.hessian[k])[:n, :n], ref.H, rtol=1e-10, atol=1e-12
            )
            lowest = min(lowest, np.linalg.eigvalsh(ref.H).min())
        assert np.all(dx[system_idx == 2] == 0.0)
        previous, moved = forces, dx
        if step != 4:  # step 5 starts where step 4 did: the same configuration
            x = x + dx
    assert lowest < 0.0  # an indefinite Hessian was met


def test_float32_reaches_the_minimum():
    """Wales & Doye, J. Phys. Chem. A 101, 5111 (1997): LJ13 = -44.326801 epsilon."""
    lj = LennardJones.single(epsilon=1.0, sigma=1.0, cutoff=50.0, shift=False)
    result = molopt_relax(lj13_start(), lj, "bfgs", fmax=1e-3, precision="float32", steps=3000)
    assert result.status == "converged"
    assert result.energy == pytest.approx(-44.326801, abs=1e-4)


def test_options_are_maxstep_and_alpha():
    """The user's options are ASE's; the block size the engine sets is not one of them."""
    assert option_names("bfgs") == {"maxstep", "alpha"}
    assert BFGS() == BFGS(maxstep=0.2, alpha=70.0)


def test_command_line_takes_bfgs_and_checks_its_options(tmp_path):
    """``--optimizer bfgs`` with a config's options relaxes as ASE's BFGS with them; an
    option BFGS lacks (or the engine's block size) is exit 2 naming the file and the valid
    options."""
    source = os.path.join(EXAMPLES, "ar55-cluster.xyz")
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[optimizer]\nalpha = 50.0\n")
    bad.write_text("[optimizer]\nsystem_rows = 8\n")
    runner = CliRunner()
    args = ["relax", source, "--optimizer", "bfgs", "--maxstep", "0.05", "--json"]
    out = runner.invoke(app, [*args, "--config", str(good), "--out-dir", str(tmp_path / "a")])
    assert out.exit_code == 0, out.output
    record = json.loads(out.stdout.splitlines()[0])
    ref, ref_steps = ase_bfgs(read(source), fmax=0.05, alpha=50.0, maxstep=0.05)
    assert record["steps"] == ref_steps
    assert record["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    out = runner.invoke(app, [*args, "--config", str(bad), "--out-dir", str(tmp_path / "b")])
    assert out.exit_code == 2
    assert "bad.toml" in out.output and "system_rows" in out.output
    assert "valid: alpha, maxstep" in out.output


def test_block_sizes_and_the_large_system_warning():
    """Blocks hold the batch's largest system (at least 16 rows, padding at most 1/8 past
    that); past LARGE_SYSTEM_ATOMS rows a warning names the cost and suggests lbfgs."""
    assert [block_rows(n) for n in (3, 16, 17, 100, 1000, 1025)] == [16, 16, 18, 104, 1024, 1152]
    assert BFGS().for_batch(100) == BFGS(system_rows=104)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BFGS().for_batch(LARGE_SYSTEM_ATOMS)
    with pytest.warns(UserWarning, match="lbfgs"):
        BFGS().for_batch(LARGE_SYSTEM_ATOMS + 1)


def assert_as_alone(results, items, settings, argon):
    """Each result as the structure relaxed alone: same steps, energy and positions to the
    rounding of its block's size (the eigendecomposition of a padded block rounds
    differently, and hundreds of steps carry that along: up to 1.9e-6 A on an AMD EPYC,
    under 1e-6 on the machines before it; a wrong block would be off by far more)."""
    alone_settings = dataclasses.replace(settings, batch_size=1)
    for key, s in items:
        (alone,) = relax_structures([(key, s)], argon, alone_settings)
        got = results[key]
        assert got.status == alone.status == "converged"
        assert got.steps == alone.steps
        assert got.energy == pytest.approx(alone.energy, abs=1e-9)
        np.testing.assert_allclose(got.structure.positions, alone.structure.positions, atol=1e-5)


def test_batch_of_mixed_sizes_equals_each_alone(argon, monkeypatch):
    """Small systems padded to the largest one's block (the engine sizes the blocks to it)
    follow their own paths."""
    sizes = []
    init = BFGS.init

    def recording_init(self, *args, **kwargs):
        sizes.append(self.system_rows)
        return init(self, *args, **kwargs)

    monkeypatch.setattr(BFGS, "init", recording_init)
    items = list(enumerate([rattled_cluster(n, seed=n) for n in (5, 22, 13)]))
    settings = EngineSettings(optimizer="bfgs", fmax=1e-3)
    results = {r.key: r for r in relax_structures(items, argon, settings)}
    assert set(sizes) == {22}
    assert_as_alone(results, items, settings, argon)


@pytest.mark.parametrize(
    "relax_cell", [False, pytest.param(True, marks=pytest.mark.slow)]
)  # (CI time: the variable-cell refill runs with -m slow; test_batch.py refills cells)
def test_refilled_batches_equal_relaxing_alone(argon, relax_cell):
    """Systems leave, queued ones take their places with a fresh Hessian, and the running
    ones move into the new batch with theirs (a block of another size)."""
    structures = mixed_structures()
    if relax_cell:
        structures = [s for s in structures if s.pbc.all()] * 2
    items = list(enumerate(structures))
    settings = EngineSettings(
        optimizer="bfgs", fmax=1e-3, relax_cell=relax_cell, batch_size=3, chunk=8
    )
    engine = E.Engine(argon, settings)
    engine.compaction_cost = 0.0  # refill as soon as there is room
    results = {r.key: r for r in engine.run(items)}
    assert engine.repacks >= 1  # running systems moved on with new ones
    assert_as_alone(results, items, settings, argon)


def test_tail_compaction_moves_hessians_into_smaller_blocks(argon):
    """The 55-atom cluster finishes first; the two 6-atom ones then move from blocks of 56
    rows into a batch whose blocks hold 16, and go on as if alone."""
    structures = [compact_cluster(7.5, seed=1), rattled_cluster(6, seed=1), rattled_cluster(6, 2)]
    items = list(enumerate(structures))
    settings = EngineSettings(optimizer="bfgs", fmax=1e-3, chunk=8)
    engine = E.Engine(argon, settings)
    engine.compaction_cost = 0.0
    results = {r.key: r for r in engine.run(items)}
    assert {shape[0] for shape in engine.shapes_seen} == {96, 12}  # padded atoms: compacted
    assert results[0].steps < min(results[1].steps, results[2].steps)
    assert_as_alone(results, items, settings, argon)


def test_a_structure_whose_hessian_does_not_fit_fails_alone(argon):
    """BFGS's dense Hessian is counted in the memory estimate: a 2,048-atom cluster needs
    (3 x 2,048)^2 doubles, three times over, about 0.9 GB: under a 500 MB limit it fails alone
    with the reason, before anything is built, and a small cluster beside it relaxes."""
    from ase.build import bulk

    big = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((8, 8, 8))
    big.pbc = False
    assert len(big) == 2048
    items = [
        ("big", structure_from_atoms(big)),
        ("small", structure_from_atoms(cluster())),
    ]
    settings = EngineSettings(optimizer="bfgs", fmax=0.01, steps=500, max_memory=500 * 2**20)
    results = {r.key: r for r in relax_structures(items, argon, settings)}
    assert results["big"].status == "failed"
    assert "memory" in results["big"].error and "--max-memory" in results["big"].error
    assert results["small"].status == "converged"
    assert BFGS().state_bytes([2048, 10], 8) == 3 * 2 * (3 * 2048) ** 2 * 8
