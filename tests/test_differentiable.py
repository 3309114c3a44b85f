"""Implicit differentiation of relaxations, fitting, Hessian checks and frequencies."""

import json

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.cluster import Icosahedron
from conftest import structure_from_atoms
from typer.testing import CliRunner

from molopt.analysis.hessian import frequencies_cm1, lowest_modes
from molopt.analysis.implicit import relax_implicit
from molopt.cli import app
from molopt.potentials.lennard_jones import LennardJones
from molopt.structure import make_structure

runner = CliRunner()


def argon(epsilon=0.0104, sigma=3.40):
    return LennardJones.single(epsilon=epsilon, sigma=sigma, cutoff=8.5, shift=True)


def central_difference(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


def test_dimer_bond_length_derivatives_are_exact():
    lj = LennardJones.single(epsilon=1.0, sigma=1.0, cutoff=8.0, shift=False)
    dimer = make_structure([18, 18], [[0, 0, 0], [1.2, 0.1, 0]])

    def bond(pot):
        (r,) = relax_implicit(pot, [dimer])
        return jnp.linalg.norm(r.positions[1] - r.positions[0])

    grad = jax.grad(bond)(lj)
    assert float(grad.sigma[0]) == pytest.approx(2 ** (1 / 6), abs=1e-7)
    assert abs(float(grad.epsilon[0])) < 1e-8


def cluster13():
    atoms = Icosahedron("Ar", 2, latticeconstant=5.26)
    atoms.rattle(0.05, seed=2)
    return structure_from_atoms(atoms)


def mean_distance(positions):
    d = positions[:, None, :] - positions[None, :, :]
    r = jnp.sqrt(jnp.sum(d * d, axis=-1) + jnp.eye(positions.shape[0]))
    return jnp.sum(jnp.where(jnp.eye(positions.shape[0]) > 0, 0.0, r)) / (
        positions.shape[0] * (positions.shape[0] - 1)
    )


def test_cluster_gradients_match_finite_differences_of_relaxations():
    s = cluster13()

    def observable(pot):
        (r,) = relax_implicit(pot, [s])
        return mean_distance(r.positions) + 10.0 * r.energy

    grad = jax.grad(observable)(argon())
    fd_sigma = central_difference(lambda x: float(observable(argon(sigma=x))), 3.40, 1e-4)
    fd_eps = central_difference(lambda x: float(observable(argon(epsilon=x))), 0.0104, 1e-6)
    assert float(grad.sigma[0]) == pytest.approx(fd_sigma, rel=1e-5)
    assert float(grad.epsilon[0]) == pytest.approx(fd_eps, rel=1e-5)


def test_variable_cell_lattice_constant_and_energy_gradients():
    crystal = structure_from_atoms(bulk("Ar", "fcc", a=5.3, cubic=True))

    def lattice(pot):
        (r,) = relax_implicit(pot, [crystal], relax_cell=True)
        return jnp.mean(jnp.linalg.norm(r.cell, axis=1)), r.energy

    (a, energy), pullback = jax.vjp(lattice, argon())
    (da,) = pullback((1.0, 0.0))
    (de,) = pullback((0.0, 1.0))
    fd_a = central_difference(lambda x: float(lattice(argon(sigma=x))[0]), 3.40, 1e-4)
    fd_e = central_difference(lambda x: float(lattice(argon(epsilon=x))[1]), 0.0104, 1e-6)
    assert float(da.sigma[0]) == pytest.approx(fd_a, rel=1e-5)
    assert float(de.epsilon[0]) == pytest.approx(fd_e, rel=1e-5)


def test_fixed_atoms_and_batches():
    slab = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
    slab.pbc = [True, True, False]
    slab.center(vacuum=5.0, axis=2)
    slab.rattle(0.05, seed=3)
    fixed = slab.positions[:, 2] < slab.positions[:, 2].min() + 1.0
    from ase.constraints import FixAtoms

    slab.set_constraint(FixAtoms(mask=fixed))
    s_slab, s_cluster = structure_from_atoms(slab), cluster13()

    top = int(np.argmax(slab.positions[:, 2]))

    def height(pot, structures):
        # a rotation-invariant observable for the free cluster (its orientation at the
        # minimum is arbitrary), the height of a top-layer atom for the clamped slab
        out = relax_implicit(pot, structures, fmax=1e-9)
        return sum(
            r.positions[top, 2] if r.positions.shape[0] == 32 else mean_distance(r.positions)
            for r in out
        )

    together = jax.grad(lambda p: height(p, [s_slab, s_cluster]))(argon())
    alone = [jax.grad(lambda p, x=x: height(p, [x]))(argon()) for x in (s_slab, s_cluster)]
    assert float(together.sigma[0]) == pytest.approx(
        float(alone[0].sigma[0] + alone[1].sigma[0]), rel=1e-6
    )
    fd = central_difference(lambda x: float(height(argon(sigma=x), [s_slab])), 3.40, 1e-4)
    assert float(alone[0].sigma[0]) == pytest.approx(fd, rel=1e-5)


def test_gradient_with_respect_to_network_weights():
    from molopt.potentials.neural.painn import PaiNN

    model = PaiNN(
        [29],
        cutoff=4.5,
        n_features=8,
        n_radial=6,
        n_layers=1,
        key=jax.random.PRNGKey(0),
        reference=[0.0],
        scale=0.3,
    )
    # a repulsive + attractive dimer: add LJ so the minimum exists whatever the weights
    trimer = make_structure([29, 29, 29], [[0, 0, 0], [2.5, 0.2, 0], [1.2, 2.1, 0.1]])

    lj = LennardJones.single(epsilon=0.3, sigma=2.3, cutoff=4.5, shift=True)

    from molopt.potentials.base import Potential

    class Both(Potential):
        lj: LennardJones
        nn: PaiNN

        def energy(self, positions, cell, batch, nbrs):
            return self.lj.energy(positions, cell, batch, nbrs) + self.nn.energy(
                positions, cell, batch, nbrs
            )

    both = Both(elements=(29,), cutoff=4.5, lj=lj, nn=model)

    def bond(pot):
        (r,) = relax_implicit(pot, [trimer], fmax=1e-8)
        return jnp.linalg.norm(r.positions[1] - r.positions[0])

    grad = jax.grad(bond)(both)
    g = float(grad.nn.readout_out.weight[0, 0])

    def with_weight(value):
        new = jax.tree_util.tree_map(lambda x: x, both)
        weight = both.nn.readout_out.weight.at[0, 0].set(value)
        import equinox as eqx

        return eqx.tree_at(lambda b: b.nn.readout_out.weight, new, weight)

    w0 = float(both.nn.readout_out.weight[0, 0])
    fd = central_difference(lambda x: float(bond(with_weight(x))), w0, 1e-4)
    assert g == pytest.approx(fd, rel=1e-4, abs=1e-9)


@pytest.mark.slow  # CI time (30 s); the other molopt fit tests run by default
def test_fit_recovers_known_parameters(tmp_path):

    truth = argon(epsilon=0.0120, sigma=3.30)
    crystal = structure_from_atoms(bulk("Ar", "fcc", a=5.2, cubic=True))
    (r,) = relax_implicit(truth, [crystal], relax_cell=True)
    a_true = float(jnp.mean(jnp.linalg.norm(r.cell, axis=1)))
    e_true = float(r.energy) / 4
    config = tmp_path / "fit.toml"
    config.write_text(
        'potential = "argon"\nsteps = 120\nlearning_rate = 0.02\n'
        f'[[targets]]\nkind = "lattice_constant"\nstructure = "fcc"\nelement = "Ar"\n'
        f"value = {a_true!r}\n"
        f'[[targets]]\nkind = "cohesive_energy"\nstructure = "fcc"\nelement = "Ar"\n'
        f"guess = {a_true!r}\nvalue = {e_true!r}\n"
    )
    result = runner.invoke(app, ["fit", str(config), "-o", str(tmp_path / "fitted.toml"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parameters"]["epsilon"][0] == pytest.approx(0.0120, rel=2e-3)
    assert report["parameters"]["sigma"][0] == pytest.approx(3.30, rel=2e-3)
    from molopt.potentials.registry import load

    fitted = load(tmp_path / "fitted.toml").potential
    assert float(fitted.sigma[0]) == pytest.approx(3.30, rel=2e-3)


def ase_argon(epsilon=0.0104, sigma=3.40):
    """ASE's own Lennard-Jones with potentials/argon.toml's settings (each pair's energy
    shifted to zero at the 8.5 A cutoff, forces unshifted): the independent reference."""
    from ase.calculators.lj import LennardJones as AseLennardJones

    return AseLennardJones(epsilon=epsilon, sigma=sigma, rc=8.5, smooth=False)


def ase_relaxed(atoms, calc):
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = calc
    BFGS(atoms, logfile=None).run(fmax=1e-7, steps=2000)
    return atoms


def fit_toml(path, targets: str, potential="argon", parameters=("epsilon", "sigma"), steps=150):
    path.write_text(
        f'potential = "{potential}"\nparameters = {list(parameters)!r}\nsteps = {steps}\n' + targets
    )
    return path


def fitted(config):
    """``molopt fit --json`` of ``config``: the report (parameters, before/after rows)."""
    result = runner.invoke(
        app, ["fit", str(config), "-o", str(config.with_suffix(".fitted.toml")), "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def predicted(config) -> list[float]:
    """Each target's value at the potential's own parameters (molopt.analysis.fitting.Fit)."""
    from molopt.analysis.fitting import Fit, FitConfig

    fit = Fit(FitConfig.from_toml(config))
    return [row["predicted"] for row in fit.report(fit.log_params)]


def test_fit_bond_length_and_angle_of_relaxed_structures(tmp_path):
    """bond_length and angle are measured on the relaxed structure, between the atoms named,
    in A and degrees: equal to ASE's distance and angle of the same cluster relaxed by ASE's
    BFGS with ASE's Lennard-Jones (an icosahedral Ar13, whose distances and angles differ with
    the atoms and the vertex). Fitting sigma to a dimer's bond length L gives L / 2^(1/6)."""
    atoms = Icosahedron("Ar", 2, latticeconstant=5.26)  # atom 0 at the centre
    atoms.rattle(0.05, seed=7)
    ase.io.write(tmp_path / "ar13.xyz", atoms)
    reference = ase_relaxed(atoms, ase_argon())
    bonds, angles = [(3, 7), (0, 5)], [(1, 0, 2), (2, 1, 0), (4, 6, 9)]
    targets = "".join(
        f'[[targets]]\nkind = "bond_length"\nfile = "ar13.xyz"\natoms = {list(b)}\nvalue = 4.0\n'
        for b in bonds
    ) + "".join(
        f'[[targets]]\nkind = "angle"\nfile = "ar13.xyz"\natoms = {list(a)}\nvalue = 60.0\n'
        for a in angles
    )
    got = predicted(fit_toml(tmp_path / "measure.toml", targets))
    expected = [reference.get_distance(*b) for b in bonds]
    expected += [reference.get_angle(*a) for a in angles]
    assert len(set(np.round(expected, 3))) == len(expected)  # all distinct: indices matter
    np.testing.assert_allclose(got[:2], expected[:2], atol=1e-5)  # A
    np.testing.assert_allclose(got[2:], expected[2:], atol=1e-3)  # degrees
    # the fit: sigma such that the relaxed dimer's bond is 4 A (epsilon plays no part)
    ase.io.write(tmp_path / "ar2.xyz", Atoms("Ar2", positions=[[0, 0, 0], [3.6, 0.2, 0]]))
    config = fit_toml(
        tmp_path / "bond.toml",
        '[[targets]]\nkind = "bond_length"\nfile = "ar2.xyz"\natoms = [0, 1]\nvalue = 4.0\n',
        parameters=("sigma",),
    )
    report = fitted(config)
    assert report["before"][0]["predicted"] == pytest.approx(2 ** (1 / 6) * 3.40, abs=1e-6)
    assert report["parameters"]["sigma"][0] == pytest.approx(4.0 / 2 ** (1 / 6), rel=1e-4)
    assert report["after"][0]["predicted"] == pytest.approx(4.0, abs=5e-4)


def test_fit_angle_of_a_two_element_trimer(tmp_path):
    """An Ar-Xe-Ar trimer (noble-gases, Lorentz-Berthelot) relaxes with every pair at its own
    minimum 2^(1/6) sigma_ij, so the angle at Xe is 2 asin(sigma_Ar / (sigma_Ar + sigma_Xe))
    (53.96 degrees). Fitting sigma to an angle of 56 degrees ends on parameters whose angle,
    by that formula, is 56 degrees; the pure-Ar and pure-Xe sigmas move apart as needed."""
    ase.io.write(
        tmp_path / "arxear.xyz",
        Atoms("ArXeAr", positions=[[0, 0, 0], [2.2, 3.6, 0.1], [4.0, 0.2, -0.1]]),
    )

    def angle(sigma_ar, sigma_xe):
        return np.degrees(2 * np.arcsin(sigma_ar / (sigma_ar + sigma_xe)))

    target = '[[targets]]\nkind = "angle"\nfile = "arxear.xyz"\natoms = [0, 1, 2]\nvalue = 56.0\n'
    config = fit_toml(tmp_path / "angle.toml", target, "noble-gases", ("sigma",))
    report = fitted(config)
    assert report["before"][0]["predicted"] == pytest.approx(angle(3.405, 4.10), abs=1e-4)
    sigma = dict(zip(("Ne", "Ar", "Kr", "Xe"), report["parameters"]["sigma"], strict=True))
    assert angle(sigma["Ar"], sigma["Xe"]) == pytest.approx(56.0, abs=1e-3)
    assert report["after"][0]["predicted"] == pytest.approx(56.0, abs=1e-3)
    assert sigma["Ar"] / sigma["Xe"] > 3.405 / 4.10
    assert (sigma["Ne"], sigma["Kr"]) == pytest.approx((2.749, 3.60), rel=1e-12)  # not in it


@pytest.mark.slow  # 17 s; the other `molopt fit` tests run the same code by default
def test_fit_relative_energy_of_relaxed_structures(tmp_path):
    """relative_energy = E(relaxed a) - E(relaxed b): for an Ar triangle and an Ar dimer,
    ASE's Lennard-Jones energies of both relaxed by ASE, = 2 (-epsilon - V(cutoff)). That is
    proportional to epsilon, so fitting epsilon alone to 1.5 times it gives 1.5 epsilon."""
    triangle = Atoms("Ar3", positions=[[0, 0, 0], [3.7, 0.1, 0], [1.9, 3.3, 0.2]])
    dimer = Atoms("Ar2", positions=[[0, 0, 0], [3.6, 0.2, 0]])
    ase.io.write(tmp_path / "ar3.xyz", triangle)
    ase.io.write(tmp_path / "ar2.xyz", dimer)
    expected = float(
        ase_relaxed(triangle, ase_argon()).get_potential_energy()
        - ase_relaxed(dimer, ase_argon()).get_potential_energy()
    )
    cut = 4 * 0.0104 * ((3.40 / 8.5) ** 12 - (3.40 / 8.5) ** 6)
    assert expected == pytest.approx(2 * (-0.0104 - cut), rel=1e-9)
    value = 1.5 * expected
    target = (
        f'[[targets]]\nkind = "relative_energy"\nfiles = ["ar3.xyz", "ar2.xyz"]\n'
        f"value = {value!r}\n"
    )
    config = fit_toml(tmp_path / "rel.toml", target, parameters=("epsilon",))
    assert predicted(config) == pytest.approx([expected], rel=1e-9)
    report = fitted(config)
    assert report["parameters"]["epsilon"][0] == pytest.approx(1.5 * 0.0104, rel=1e-4)
    assert report["after"][0]["predicted"] == pytest.approx(value, rel=1e-4)


def test_fit_to_labelled_data(tmp_path):
    """data: the mean over configurations of ((E - E_ref) / n_atoms)^2 + mean((F - F_ref)^2)
    (eV, eV/A), equal to that computed from ASE's Lennard-Jones; fitting epsilon and sigma to
    data labelled by ASE with other parameters (0.0120 eV, 3.30 A) recovers them."""
    from ase.calculators.singlepoint import SinglePointCalculator

    truth, start = ase_argon(epsilon=0.0120, sigma=3.30), ase_argon()
    images = []
    for seed in range(2):
        atoms = Icosahedron("Ar", 2, latticeconstant=5.1)[: 7 + seed]
        atoms.rattle(0.15, seed=seed)
        atoms.calc = truth
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        images.append(atoms)
    ase.io.write(tmp_path / "labelled.extxyz", images)
    loss = 0.0
    for atoms in ase.io.read(tmp_path / "labelled.extxyz", ":"):  # as stored (8 decimals)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = start
        loss += ((atoms.get_potential_energy() - energy) / len(atoms)) ** 2
        loss += np.mean((atoms.get_forces() - forces) ** 2)
    config = fit_toml(
        tmp_path / "data.toml", '[[targets]]\nkind = "data"\nfiles = ["labelled.extxyz"]\n'
    )
    assert predicted(config) == pytest.approx([loss / 2], rel=1e-9)
    report = fitted(config)
    assert report["parameters"]["epsilon"][0] == pytest.approx(0.0120, rel=1e-3)
    assert report["parameters"]["sigma"][0] == pytest.approx(3.30, rel=1e-3)
    assert report["after"][0]["predicted"] < 1e-4 * report["before"][0]["predicted"]


def linear_trimer(tmp_path):
    r = 2 ** (1 / 6) * 3.4
    path = tmp_path / "trimer.xyz"
    ase.io.write(path, Atoms("Ar3", positions=[[0, 0, 0], [r, 0, 0], [2 * r, 0, 0]]))
    return path


def test_check_hessian_leaves_a_saddle_point(tmp_path):
    path = linear_trimer(tmp_path)
    plain = runner.invoke(
        app,
        ["relax", str(path), "-p", "argon", "--fmax", "1e-4", "-o", str(tmp_path / "a"), "--json"],
    )
    rec = json.loads(plain.stdout.splitlines()[0])
    checked = runner.invoke(
        app,
        [
            "relax",
            str(path),
            "-p",
            "argon",
            "--fmax",
            "1e-4",
            "-o",
            str(tmp_path / "b"),
            "--json",
            "--check-hessian",
        ],
    )
    rec2 = json.loads(checked.stdout.splitlines()[0])
    assert rec["status"] == rec2["status"] == "converged"
    assert rec2["energy"] < rec["energy"] - 0.005  # the triangle, not the line
    assert rec2["lowest_eigenvalue"] > 0
    relaxed = ase.io.read(tmp_path / "b" / "trimer.extxyz")
    d = relaxed.get_all_distances()[np.triu_indices(3, 1)]
    assert d.max() - d.min() < 0.01  # equilateral


def test_lowest_modes_matrix_free_equals_exact():
    s = cluster13()
    from molopt.potentials.registry import load

    lj = load("argon").potential
    exact, _ = lowest_modes(s, lj, k=3)
    lanczos, _ = lowest_modes(s, lj, k=3, exact_max_atoms=0)
    np.testing.assert_allclose(lanczos, exact, rtol=1e-5, atol=1e-7)


def test_frequencies_agree_with_ase_vibrations(tmp_path):
    from ase.optimize import BFGS
    from ase.vibrations import Vibrations

    from molopt.ase import MoloptCalculator
    from molopt.potentials.registry import load

    atoms = Atoms("Ar4", positions=[[0, 0, 0], [3.8, 0, 0], [1.9, 3.3, 0], [1.9, 1.1, 3.1]])
    atoms.calc = MoloptCalculator("argon")
    BFGS(atoms, logfile=None).run(fmax=1e-6)
    vib = Vibrations(atoms, name=str(tmp_path / "vib"), delta=0.005, nfree=4)
    vib.run()
    reference = np.real(vib.get_frequencies())[-6:]  # the six vibrations
    ours = frequencies_cm1(structure_from_atoms(atoms), load("argon").potential)[-6:]
    np.testing.assert_allclose(ours, reference, rtol=2e-3, atol=0.3)
    ase.io.write(tmp_path / "ar4.xyz", atoms)
    result = runner.invoke(app, ["hessian", str(tmp_path / "ar4.xyz"), "-p", "argon", "--json"])
    data = json.loads(result.stdout)
    assert data["n_imaginary"] == 0
    np.testing.assert_allclose(data["frequencies_cm1"][-6:], ours, rtol=1e-6)  # text file


def _projected_spectrum(h, positions):
    """Eigenvalues of h with translations and rotations pushed far up (test's own)."""
    n = len(positions)
    centred = positions - positions.mean(axis=0)
    vectors = []
    for c in range(3):
        t = np.zeros((n, 3))
        t[:, c] = 1.0
        vectors.append(t.ravel())
        axis = np.eye(3)[c]
        vectors.append(np.cross(axis, centred).ravel())
    q, _ = np.linalg.qr(np.array(vectors).T)
    p = np.eye(3 * n) - q @ q.T
    return np.linalg.eigvalsh(p @ h @ p + 1e3 * q @ q.T)


@pytest.mark.parametrize("exact_max_atoms", [200, 0])
def test_hessian_compiled_once_per_bucket_not_per_structure(exact_max_atoms, monkeypatch):
    """`--check-hessian` on a mixed batch: three clusters of 13 and 14 atoms share the
    16-atom bucket (and neighbour capacity), so the (dense or matrix-free) Hessian program is
    compiled once for all three; the Hessian still equals central differences of the forces
    and each structure's lowest modes are its own (padding excluded)."""
    from molopt.analysis import hessian as differentiable
    from molopt.engine import evaluate_structures
    from molopt.potentials.registry import load

    lj = load("argon").potential
    # count the traces of the (dense or matrix-free) program: a trace runs the function it
    # differentiates, a call of the compiled program does not. Caches start empty, so the
    # first structure traces once and the others reuse it.
    name = "enthalpy" if exact_max_atoms else "enthalpy_gradient"
    traced = []
    original = getattr(differentiable, name)

    def counting(*args, **kwargs):
        traced.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(differentiable, name, counting)
    jax.clear_caches()
    sizes = []
    for k, n in enumerate((13, 14, 13)):
        atoms = Icosahedron("Ar", 3, latticeconstant=5.26)[:n]
        atoms.rattle(0.02, seed=k)
        s = structure_from_atoms(atoms)
        values, vectors = lowest_modes(s, lj, k=2, exact_max_atoms=exact_max_atoms)
        sizes.append(len(traced))
        assert vectors.shape == (3 * n, 2)
        h = differentiable.hessian(s, lj)
        assert h.shape == (3 * n, 3 * n)
        if k == 0:  # the Hessian itself against finite differences of the forces
            step = 1e-4
            displaced = []
            for k in range(3 * n):
                for sign in (1.0, -1.0):
                    x = s.positions.copy().ravel()
                    x[k] += sign * step
                    displaced.append(s.with_positions(x.reshape(n, 3)))
            forces = np.array(
                [f.ravel() for _, f, _ in evaluate_structures(displaced, lj, stress=False)]
            )
            fd = -(forces[0::2] - forces[1::2]) / (2 * step)
            np.testing.assert_allclose(h, fd, atol=1e-7 + 1e-6 * np.abs(h).max())
        exact = _projected_spectrum(h, s.positions)
        np.testing.assert_allclose(values, exact[:2], rtol=1e-6, atol=1e-9)
    assert sizes[0] >= 1 and sizes[-1] == sizes[0]
