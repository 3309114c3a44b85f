"""Optimizers against ASE's own: same steps, same minima (float64), and the engine's rules."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, FIRE2, LBFGS
from conftest import rattled_cluster, structure_from_atoms

from molopt.config import GPA
from molopt.engine import EngineSettings, relax_structures
from molopt.potentials.lennard_jones import LennardJones

ASE_OPTIMIZERS = {"fire": FIRE, "lbfgs": LBFGS, "fire2": FIRE2, "bfgs": BFGS}


def ase_relax(atoms, name, fmax, cell=False, pressure=0.0, steps=5000):
    atoms = atoms.copy()
    atoms.calc = AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5)
    target = FrechetCellFilter(atoms, scalar_pressure=pressure) if cell else atoms
    opt = ASE_OPTIMIZERS[name](target, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return atoms, opt.nsteps


def molopt_relax(atoms, potential, name, fmax, cell=False, pressure=0.0, steps=5000, **kw):
    settings = EngineSettings(
        optimizer=name, fmax=fmax, steps=steps, relax_cell=cell, pressure=pressure, **kw
    )
    (result,) = relax_structures([("x", structure_from_atoms(atoms))], potential, settings)
    return result


def cluster():
    s = rattled_cluster(22, seed=7)
    return Atoms(numbers=s.numbers, positions=s.positions)


def crystal():
    atoms = bulk("Ar", "fcc", a=5.0).repeat((2, 2, 2))
    atoms.rattle(0.1, seed=3)
    strain = np.array([[0.02, 0.01, 0.0], [0.0, -0.01, 0.005], [0.0, 0.0, 0.03]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    return atoms


@pytest.mark.parametrize("name", ["fire", "lbfgs", "fire2"])
@pytest.mark.parametrize("make", [cluster, crystal])
def test_parity_with_ase_fixed_cell(argon, name, make):
    atoms = make()
    ref, ref_steps = ase_relax(atoms, name, fmax=1e-3)
    result = molopt_relax(atoms, argon, name, fmax=1e-3)
    assert result.status == "converged"
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-8)
    assert result.steps == ref_steps
    np.testing.assert_allclose(result.structure.positions, ref.positions, atol=1e-4)


@pytest.mark.parametrize(
    "name, options, make",
    [
        ("fire2", {"dtmin": 0.095}, crystal),  # back-offs here clamp dt at dtmin
        ("fire", {"dt": 0.05, "n_min": 3, "finc": 1.2, "astart": 0.2, "a": 0.15}, cluster),
        ("lbfgs", {"memory": 5, "alpha": 50.0, "maxstep": 0.1}, cluster),
    ],
)
def test_parity_with_ase_non_default_options(argon, name, options, make):
    """Optimizer options other than the defaults keep ASE's step rules step for step."""
    ase_names = {"n_min": "Nmin"}
    atoms = make()
    ref = atoms.copy()
    ref.calc = AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5)
    opt = ASE_OPTIMIZERS[name](
        ref, logfile=None, **{ase_names.get(k, k): v for k, v in options.items()}
    )
    opt.run(fmax=1e-3, steps=5000)
    result = molopt_relax(
        atoms, argon, name, fmax=1e-3, optimizer_options=tuple(sorted(options.items()))
    )
    assert result.status == "converged"
    assert result.steps == opt.nsteps
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-8)


@pytest.mark.parametrize("name", ["fire", "lbfgs"])
@pytest.mark.parametrize("pressure_gpa", [0.0, 0.5])
def test_parity_with_ase_frechet_cell_filter(argon, name, pressure_gpa):
    atoms = crystal()
    p = pressure_gpa * GPA
    ref, ref_steps = ase_relax(atoms, name, fmax=1e-4, cell=True, pressure=p)
    result = molopt_relax(atoms, argon, name, fmax=1e-4, cell=True, pressure=p)
    assert result.status == "converged"
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-8)
    assert result.steps == ref_steps
    np.testing.assert_allclose(result.structure.cell, ref.cell.array, atol=1e-6)
    # the relaxed stress balances the applied pressure
    np.testing.assert_allclose(result.stress, -p * np.eye(3), atol=2e-4 / len(atoms) + 1e-6)


def test_fix_atoms_parity(argon):
    atoms = cluster()
    atoms.set_constraint(FixAtoms(indices=[0, 3, 5]))
    ref, ref_steps = ase_relax(atoms, "fire", fmax=1e-3)
    result = molopt_relax(atoms, argon, "fire", fmax=1e-3)
    np.testing.assert_array_equal(result.structure.positions[[0, 3, 5]], atoms.positions[[0, 3, 5]])
    assert result.energy == pytest.approx(ref.get_potential_energy(), abs=1e-8)
    assert result.steps == ref_steps


def test_lj13_global_minimum_reduced_units():
    """Wales & Doye, J. Phys. Chem. A 101, 5111 (1997): LJ13 = -44.326801 epsilon."""
    lj = LennardJones.single(epsilon=1.0, sigma=1.0, cutoff=50.0, shift=False)
    result = molopt_relax(lj13_start(), lj, "lbfgs", fmax=1e-6)
    assert result.status == "converged"
    assert result.energy == pytest.approx(-44.326801, abs=5e-7)


def test_max_steps_gives_not_converged(argon):
    result = molopt_relax(cluster(), argon, "fire", fmax=1e-6, steps=7)
    assert result.status == "not_converged"
    assert result.steps == 7


def test_already_converged_takes_zero_steps(argon):
    atoms = cluster()
    ref, _ = ase_relax(atoms, "lbfgs", fmax=1e-5)
    result = molopt_relax(ref, argon, "fire", fmax=1e-3)
    assert result.status == "converged" and result.steps == 0


def test_zero_max_steps_only_evaluates(argon):
    """``steps = 0``: the structure is evaluated (step 0), not moved, and not converged."""
    atoms = cluster()
    result = molopt_relax(atoms, argon, "fire", fmax=1e-3, steps=0)
    assert result.status == "not_converged" and result.steps == 0
    np.testing.assert_array_equal(result.structure.positions, atoms.positions)
    atoms.calc = AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5, smooth=False)
    assert result.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    assert result.initial_energy == result.energy


def test_convergence_test_is_strict(argon):
    """ASE's test is fmax < target: a structure whose fmax equals the target exactly has not
    converged; one just above that fmax has, at step 0."""
    atoms = cluster()
    (probe,) = [molopt_relax(atoms, argon, "fire", fmax=1e-3, steps=0)]
    at = molopt_relax(atoms, argon, "fire", fmax=probe.fmax, steps=0)
    assert at.fmax == probe.fmax and at.status == "not_converged"
    above = molopt_relax(atoms, argon, "fire", fmax=float(np.nextafter(probe.fmax, 1.0)), steps=0)
    assert above.status == "converged" and above.steps == 0


def lj13_start():
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Ar", 2, latticeconstant=2 ** (1 / 6) * np.sqrt(2))
    atoms.rattle(0.05, seed=1)
    return atoms


@pytest.mark.parametrize("name", ["fire", "fire2", "lbfgs", "gd"])
def test_float32_reaches_the_minimum(name):
    lj = LennardJones.single(epsilon=1.0, sigma=1.0, cutoff=50.0, shift=False)
    steps = 20000 if name == "gd" else 3000
    result = molopt_relax(lj13_start(), lj, name, fmax=1e-3, precision="float32", steps=steps)
    assert result.status == "converged"
    assert result.fmax < 1e-3
    assert result.energy == pytest.approx(-44.326801, abs=1e-4)


def test_batch_relaxes_each_system_as_if_alone(argon):
    a, b, c = cluster(), crystal(), bulk("Ar", "fcc", a=5.3).repeat(2)
    c.rattle(0.05, seed=9)
    settings = EngineSettings(optimizer="fire", fmax=1e-3)
    items = [(k, structure_from_atoms(x)) for k, x in enumerate((a, b, c))]
    together = {r.key: r for r in relax_structures(items, argon, settings)}
    for key, s in items:
        (alone,) = relax_structures([(key, s)], argon, settings)
        assert together[key].steps == alone.steps
        assert together[key].energy == pytest.approx(alone.energy, abs=1e-10)
        np.testing.assert_allclose(
            together[key].structure.positions, alone.structure.positions, atol=1e-9
        )


class _EachAtomCapped(Atoms):
    """Atoms whose moves are capped atom by atom at ``dmax`` when an optimizer sets new
    positions: with ASE's FIRE at a whole-step cap that never applies, the per-atom rule of
    molopt's ``dmax`` (LAMMPS's), written independently of molopt's code."""

    dmax = 0.05
    capped = 0

    def set_positions(self, newpositions, apply_constraint=True):
        step = np.asarray(newpositions) - self.positions
        norm = np.linalg.norm(step, axis=1, keepdims=True)
        over = norm > self.dmax
        type(self).capped += int(over.sum())
        step = np.where(over, step * self.dmax / np.where(over, norm, 1.0), step)
        super().set_positions(self.positions + step, apply_constraint)


@pytest.mark.parametrize("make", [cluster, crystal])
def test_fire_dmax_equals_ase_fire_with_each_atom_capped(argon, make):
    """``dmax`` against a reference: ASE's FIRE moving atoms capped one by one (its own
    whole-step cap out of reach). Same steps, same minimum; the cap was hit."""
    atoms = make()
    atoms.rattle(0.25, seed=11)  # long first moves, so that the cap is hit
    reference = _EachAtomCapped(atoms)
    reference.calc = AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5)
    _EachAtomCapped.capped = 0
    opt = FIRE(reference, maxstep=1e9, logfile=None)
    opt.run(fmax=1e-3, steps=5000)
    assert _EachAtomCapped.capped > 0
    result = molopt_relax(atoms, argon, "fire", fmax=1e-3, optimizer_options=(("dmax", 0.05),))
    assert result.status == "converged"
    assert result.steps == opt.nsteps
    assert result.energy == pytest.approx(reference.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(result.structure.positions, reference.positions, atol=1e-4)


@pytest.mark.parametrize("name", ["fire", "fire2"])
def test_dmax_caps_each_row_alone(name):
    """One step with large forces: no row moves more than dmax, a row under it moves as with
    no cap at all, and a capped row keeps its direction."""
    import jax.numpy as jnp

    from molopt.optimizers import optimizer_class
    from molopt.optimizers.rows import Rows

    cls = optimizer_class(name)
    rows = Rows(jnp.asarray([0, 0, 0, 1, 1, 2], jnp.int32), 2)  # the last row is padding
    forces = jnp.asarray(
        [[3.0, 0, 0], [0, 0.01, 0], [0.5, -0.5, 0.2], [0, 0, 0.02], [-4.0, 1.0, 0], [0, 0, 0]]
    )
    x = jnp.zeros((6, 3))
    active = jnp.asarray([True, True])
    free = cls(maxstep=1e9)
    capped = cls(maxstep=1e9, dmax=0.05)
    # two steps: the first starts the velocities, the second moves with them
    s_free, s_capped = free.init(6, 2, x.dtype), capped.init(6, 2, x.dtype)
    for _ in range(2):
        s_free, d_free, _ = free.step(s_free, x, forces, active, rows)
        s_capped, d_capped, _ = capped.step(s_capped, x, forces, active, rows)
    d_free, d_capped = np.asarray(d_free), np.asarray(d_capped)
    n_free, n_capped = np.linalg.norm(d_free, axis=1), np.linalg.norm(d_capped, axis=1)
    assert n_capped.max() <= 0.05 * (1 + 1e-12)
    small = n_free < 0.05
    assert small.any() and (~small).any()
    np.testing.assert_array_equal(d_capped[small], d_free[small])
    big = ~small
    np.testing.assert_allclose(
        d_capped[big], d_free[big] * (0.05 / n_free[big])[:, None], rtol=1e-12
    )


def test_batch_with_dmax_relaxes_each_system_as_if_alone(argon):
    a, b = cluster(), crystal()
    settings = EngineSettings(optimizer="fire2", fmax=1e-3, optimizer_options=(("dmax", 0.1),))
    items = [(k, structure_from_atoms(x)) for k, x in enumerate((a, b))]
    together = {r.key: r for r in relax_structures(items, argon, settings)}
    for key, s in items:
        (alone,) = relax_structures([(key, s)], argon, settings)
        assert together[key].status == "converged"
        assert together[key].steps == alone.steps
        np.testing.assert_array_equal(together[key].structure.positions, alone.structure.positions)


def test_dmax_flag_reaches_fire_and_is_refused_elsewhere():
    from molopt import config as cfg

    settings = cfg.build(None, optimizer="fire2", dmax=0.1)
    assert settings.optimizer_options == {"dmax": 0.1}
    with pytest.raises(cfg.ConfigError, match="dmax do not apply to lbfgs"):
        cfg.build(None, optimizer="lbfgs", dmax=0.1)
