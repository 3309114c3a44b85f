"""Lennard-Jones: agreement with ASE's own calculator, derivatives, invariances."""

import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.calculators.lj import LennardJones as AseLJ
from conftest import rattled_cluster, structure_from_atoms

from molopt import testing
from molopt.engine import evaluate_structures
from molopt.potentials.lennard_jones import LennardJones
from molopt.structure import make_structure


def ase_reference(atoms, eps=0.0104, sig=3.40, rc=8.5):
    atoms = atoms.copy()
    atoms.calc = AseLJ(epsilon=eps, sigma=sig, rc=rc)
    stress = atoms.get_stress(voigt=False) if atoms.pbc.all() else None
    return atoms.get_potential_energy(), atoms.get_forces(), stress


def triclinic_small_cell():
    """Primitive fcc cell (3.7 A vectors) x (2,1,1): many periodic images within 8.5 A."""
    atoms = bulk("Ar", "fcc", a=5.26).repeat((2, 1, 1))
    atoms.rattle(0.15, seed=2)
    return atoms


def slab():
    atoms = fcc111("Ar", size=(3, 3, 3), a=5.26, vacuum=6.0)
    atoms.rattle(0.1, seed=4)
    return atoms


def cluster_atoms():
    from ase import Atoms

    s = rattled_cluster(19, seed=1)
    return Atoms(numbers=s.numbers, positions=s.positions)


@pytest.mark.parametrize("make", [cluster_atoms, triclinic_small_cell, slab])
def test_matches_ase_calculator(argon, make):
    atoms = make()
    e_ref, f_ref, s_ref = ase_reference(atoms)
    ((energy, forces, stress),) = evaluate_structures([structure_from_atoms(atoms)], argon)
    assert energy == pytest.approx(e_ref, abs=1e-12)
    np.testing.assert_allclose(forces, f_ref, atol=1e-12)
    if s_ref is not None:
        np.testing.assert_allclose(stress, s_ref, atol=1e-14)


def test_fused_path_equals_autodiff(argon):
    import jax.numpy as jnp

    from molopt import batch as B
    from molopt import neighbors as N
    from molopt.potentials.base import autodiff_evaluate

    s = structure_from_atoms(triclinic_small_cell())
    batch, pos, cells, layout = B.pack([s], argon.species_of(s.numbers), np.float64)
    nbrs = N.build(pos, cells, np.asarray(batch.pbc), layout, argon.cutoff, 1.0).to_device()
    fused = argon.evaluate(jnp.asarray(pos), jnp.asarray(cells), batch, nbrs, True)
    auto = autodiff_evaluate(argon, jnp.asarray(pos), jnp.asarray(cells), batch, nbrs, True)
    np.testing.assert_allclose(fused.energy, auto.energy, atol=1e-13)
    np.testing.assert_allclose(fused.forces, auto.forces, atol=1e-13)
    np.testing.assert_allclose(fused.dE_dstrain, auto.dE_dstrain, atol=1e-12)


def mixed_cluster():
    atoms = cluster_atoms()
    atoms.numbers[::2] = 36  # Ar/Kr: per-pair parameters gathered per slot
    return atoms


@pytest.mark.parametrize("rows_per_group", [1, 3])
@pytest.mark.parametrize("make", [cluster_atoms, triclinic_small_cell, mixed_cluster])
def test_slot_groups_equal_all_at_once(argon, make, rows_per_group, monkeypatch):
    """Large lists on CPU are summed over groups of neighbour slots in a scan: same numbers."""
    import jax
    import jax.numpy as jnp

    from molopt import batch as B
    from molopt import neighbors as N
    from molopt.potentials.registry import load

    if make is mixed_cluster:
        argon = load("noble-gases").potential
    s = structure_from_atoms(make())
    batch, pos, cells, layout = B.pack([s], argon.species_of(s.numbers), np.float64)
    nbrs = N.build(pos, cells, np.asarray(batch.pbc), layout, argon.cutoff, 1.0).to_device()
    K, A = nbrs.index.shape
    p, c = jnp.asarray(pos), jnp.asarray(cells)
    at_once = jax.jit(lambda p, c: argon.evaluate(p, c, batch, nbrs, True))(p, c)
    monkeypatch.setattr(N.jax, "default_backend", lambda: "cpu")  # groups are a CPU layout
    monkeypatch.setattr(N, "SLOT_GROUP_ABOVE_BYTES", 0)
    monkeypatch.setattr(N, "SLOT_GROUP_BYTES", rows_per_group * A * 8)
    group = N.slot_group(K, A, 8)
    assert group <= rows_per_group and K % group == 0
    grouped = jax.jit(lambda p, c: argon.evaluate(p, c, batch, nbrs, True))(p, c)
    np.testing.assert_allclose(grouped.energy, at_once.energy, rtol=1e-13)
    np.testing.assert_allclose(grouped.forces, at_once.forces, atol=1e-13)
    np.testing.assert_allclose(grouped.dE_dstrain, at_once.dE_dstrain, atol=1e-12)
    assert np.abs(np.asarray(at_once.forces)).max() > 1e-3  # a real test: forces not all zero


@pytest.mark.parametrize("make", [cluster_atoms, triclinic_small_cell])
def test_finite_difference_forces(argon, make):
    s = structure_from_atoms(make())
    assert testing.finite_difference_forces(s, argon, atoms=range(min(4, s.n_atoms))) < 1e-7


def test_finite_difference_stress(argon):
    s = structure_from_atoms(triclinic_small_cell())
    assert testing.finite_difference_stress(s, argon) < 1e-8


@pytest.mark.parametrize("make", [cluster_atoms, triclinic_small_cell])
def test_invariances(argon, make):
    deviations = testing.invariance(structure_from_atoms(make()), argon)
    assert max(deviations.values()) < 1e-11, deviations


def test_forces_sum_to_zero(argon):
    ((_, forces, _),) = evaluate_structures([structure_from_atoms(triclinic_small_cell())], argon)
    assert np.abs(forces.sum(axis=0)).max() < 1e-12


def test_dimer_minimum_at_two_to_one_sixth_sigma():
    lj = LennardJones.single(epsilon=1.0, sigma=1.0, cutoff=5.0, shift=False)
    r_min = 2 ** (1 / 6)
    ((e, f, _),) = evaluate_structures([make_structure([1, 1], [[0, 0, 0], [r_min, 0, 0]])], lj)
    assert e == pytest.approx(-1.0, abs=1e-14)
    assert np.abs(f).max() < 1e-12
    # shifted: same minimum position, energy raised by -E(rc)
    shifted = LennardJones.single(epsilon=1.0, sigma=1.0, cutoff=2.5, shift=True)
    ((e2, f2, _),) = evaluate_structures(
        [make_structure([1, 1], [[0, 0, 0], [r_min, 0, 0]])], shifted
    )
    assert e2 == pytest.approx(-1.0 - 4 * (2.5**-12 - 2.5**-6), abs=1e-14)
    assert np.abs(f2).max() < 1e-12


def test_beyond_cutoff_is_zero_and_shift_continuous(argon):
    ((e_out, f_out, _),) = evaluate_structures(
        [make_structure([18, 18], [[0, 0, 0], [8.51, 0, 0]])], argon
    )
    ((e_in, _, _),) = evaluate_structures(
        [make_structure([18, 18], [[0, 0, 0], [8.4999999, 0, 0]])], argon
    )
    assert e_out == 0.0 and np.abs(f_out).max() == 0.0
    assert abs(e_in) < 1e-9


def test_lorentz_berthelot_mixing_and_pair_override(tmp_path):
    from molopt.potentials.registry import load

    path = tmp_path / "mix.toml"
    path.write_text(
        'kind = "lennard-jones"\ncutoff = 12.0\nshift = false\n'
        "[elements.Ar]\nepsilon = 0.0104\nsigma = 3.40\n"
        "[elements.Kr]\nepsilon = 0.0140\nsigma = 3.65\n"
        "[elements.Xe]\nepsilon = 0.0190\nsigma = 4.10\n"
        '[[pairs]]\nelements = ["Ar", "Xe"]\nepsilon = 0.02\nsigma = 3.0\n'
    )
    lj = load(path).potential
    r = 4.1

    def pair(eps, sig):
        return 4 * eps * ((sig / r) ** 12 - (sig / r) ** 6)

    cases = {
        (18, 36): pair(np.sqrt(0.0104 * 0.0140), 0.5 * (3.40 + 3.65)),
        (18, 54): pair(0.02, 3.0),
        (36, 54): pair(np.sqrt(0.0140 * 0.0190), 0.5 * (3.65 + 4.10)),
        (54, 54): pair(0.0190, 4.10),
    }
    structures = [make_structure(list(zs), [[0, 0, 0], [r, 0, 0]]) for zs in cases]
    for (e, _, _), expected in zip(
        evaluate_structures(structures, lj), cases.values(), strict=True
    ):
        assert e == pytest.approx(expected, abs=1e-14)


def test_padding_atoms_get_exactly_zero_force(argon):
    import jax.numpy as jnp

    from molopt import batch as B
    from molopt import neighbors as N

    s = rattled_cluster(13)
    batch, pos, cells, layout = B.pack([s], argon.species_of(s.numbers), np.float64)
    assert layout.n_padded_atoms > s.n_atoms
    nbrs = N.build(pos, cells, np.asarray(batch.pbc), layout, argon.cutoff, 1.0).to_device()
    ev = argon.evaluate(jnp.asarray(pos), jnp.asarray(cells), batch, nbrs, True)
    assert np.all(np.asarray(ev.forces)[s.n_atoms :] == 0.0)


def test_batch_equals_single(argon):
    structures = [
        rattled_cluster(13, seed=3),
        structure_from_atoms(triclinic_small_cell()),
        structure_from_atoms(slab()),
        rattled_cluster(7, seed=5),
    ]
    assert testing.batch_versus_single(structures, argon) < 1e-12


def test_float32_close_to_float64(argon):
    s = structure_from_atoms(triclinic_small_cell())
    ((e64, f64, _),) = evaluate_structures([s], argon, precision="float64")
    ((e32, f32, _),) = evaluate_structures([s], argon, precision="float32")
    assert e32 == pytest.approx(e64, rel=1e-5)
    assert np.abs(f32 - f64).max() < 1e-5


def test_lennard_jones_is_a_pytree_without_equinox():
    """Lennard-Jones relaxes without importing Equinox (0.12 s a process); its tree keeps
    the static configuration, rebuilds without re-running the constructor's checks, and
    user potentials still subclass the Equinox ``Potential``."""
    import dataclasses
    import os
    import subprocess
    import sys
    from pathlib import Path

    import molopt

    code = """
import sys
from ase.build import bulk
import molopt
out = molopt.relax(bulk("Ar", "fcc", a=5.4, cubic=True), "argon", fmax=1e-3)
assert out.info["molopt_status"] == "converged", out.info
assert "equinox" not in sys.modules, "equinox imported"
from molopt.potentials.base import Potential
assert "equinox" in sys.modules and Potential.__name__ == "Potential"
print("ok")
"""
    root = Path(molopt.__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")

    import jax

    lj = molopt.load_potential("argon")
    placeholders = jax.tree.map(lambda leaf: None, lj)  # no constructor check on rebuild
    assert placeholders.epsilon is None and placeholders.cutoff == lj.cutoff
    doubled = jax.tree.map(lambda leaf: 2 * leaf, lj)
    assert float(doubled.epsilon[0]) == 2 * float(lj.epsilon[0])
    assert (doubled.elements, doubled.pair_cutoff, doubled.shift) == (
        lj.elements,
        lj.pair_cutoff,
        lj.shift,
    )
    assert jax.tree.structure(doubled) == jax.tree.structure(lj)
    with pytest.raises(ValueError, match="parameter tables"):
        dataclasses.replace(lj, elements=(18, 36))  # one-element tables, two elements
