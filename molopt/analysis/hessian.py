"""Hessians of structures by automatic differentiation: the exact Cartesian Hessian, its
lowest modes (dense, or LOBPCG on Hessian-vector products for large structures), harmonic
frequencies, and the spectrum ``molopt hessian`` reports."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax.numpy as jnp
import numpy as np

from molopt._jax import jax
from molopt.analysis.implicit import Problem, enthalpy, enthalpy_gradient
from molopt.structure import Structure

# --- Hessians ----------------------------------------------------------------------------------
# The Hessian programs see every atom slot of the padded batch as a degree of freedom (3A, A the
# bucketed atom count): padding atoms move nothing (the potential masks them) so their rows and
# columns are exactly zero and are dropped or pushed out of the spectrum. One compilation then
# serves every structure of a bucket (`--check-hessian` on a mixed batch compiles per bucket,
# not per structure), and the matrix-free path takes its arrays as arguments instead of baking
# them into a fresh program.


@jax.jit
def _dense_hessian(dof, potential, ctx):
    return jax.hessian(enthalpy)(dof, potential, ctx, False)


def _padded(structure: Structure, potential, skin: float):
    """(problem, dof (3A,), ctx): every atom free, and every padded atom slot a degree of
    freedom too (the potential masks it, so it moves nothing)."""
    problem = Problem(structure, potential, False, 0.0, skin)
    problem.free = np.arange(structure.n_atoms)
    problem.set_base(structure.positions, structure.cell, potential)
    A = problem.layout.n_padded_atoms
    positions = np.zeros((A, 3))
    positions[: structure.n_atoms] = structure.positions
    ctx = dataclasses.replace(
        problem.ctx,
        positions=jax.device_put(positions),
        free=jax.device_put(np.arange(A, dtype=np.int32)),
    )
    return problem, jnp.asarray(positions.ravel()), ctx


def hessian(structure: Structure, potential, skin: float = 1.0) -> np.ndarray:
    """Exact Cartesian Hessian (3n, 3n) eV/A^2 of a structure, by automatic differentiation."""
    _, dof, ctx = _padded(structure, potential, skin)
    n_dof = 3 * structure.n_atoms
    return np.asarray(_dense_hessian(dof, potential, ctx))[:n_dof, :n_dof]


@partial(jax.jit, static_argnames=("k", "iterations"))
def _lowest_matrix_free(dof, potential, ctx, modes, real, x0, start, k: int, iterations: int):
    """LOBPCG for the ``k`` lowest eigenpairs of the Hessian on the real degrees of freedom
    (``real`` 1/0 per dof) orthogonal to ``modes``; everything else pushed out of reach."""
    from jax.experimental.sparse.linalg import lobpcg_standard

    def hvp(w):
        w = real * (w - modes @ (modes.T @ w))
        hw = jax.jvp(lambda d: enthalpy_gradient(d, potential, ctx, False), (dof,), (w,))[1]
        hw = real * hw
        return hw - modes @ (modes.T @ hw)

    # LOBPCG finds the largest eigenvalues: work with shift - H, the shift above H's largest
    # eigenvalue (power iteration), zero modes and padding pushed to the bottom
    def power(_, x):
        x = hvp(x)
        return x / jnp.linalg.norm(x)

    x = jax.lax.fori_loop(0, 30, power, x0)
    shift = 1.5 * jnp.abs(jnp.vdot(x, hvp(x))) + 1e-3

    def negated(block):
        hb = jax.vmap(hvp, in_axes=1, out_axes=1)(block)
        dead = modes @ (modes.T @ block) + (1.0 - real)[:, None] * block
        return shift * block - hb - 2.0 * shift * dead

    values, vectors, _ = lobpcg_standard(negated, start, m=iterations, tol=1e-10)
    return shift - values, vectors


def lowest_modes(
    structure: Structure, potential, k: int = 6, exact_max_atoms: int = 200, skin: float = 1.0
):
    """The ``k`` lowest eigenvalues (eV/A^2) and eigenvectors (3n, k) of the Cartesian
    Hessian, excluding translations/rotations. Exact (dense) up to ``exact_max_atoms``,
    else LOBPCG on Hessian-vector products (matrix-free)."""
    problem, dof, ctx = _padded(structure, potential, skin)
    modes = problem.zero_modes()  # (3n, m)
    n_dof = 3 * structure.n_atoms
    k = min(k, n_dof - modes.shape[1])
    if structure.n_atoms <= exact_max_atoms:
        h = np.asarray(_dense_hessian(dof, potential, ctx))[:n_dof, :n_dof]
        if modes.shape[1]:
            p = np.eye(n_dof) - modes @ modes.T
            h = p @ h @ p + 1e6 * (modes @ modes.T)  # push zero modes to the top
        values, vectors = np.linalg.eigh(0.5 * (h + h.T))
        return values[:k], vectors[:, :k]
    padded_modes = np.zeros((dof.shape[0], modes.shape[1]))
    padded_modes[:n_dof] = modes
    real = np.zeros(dof.shape[0])
    real[:n_dof] = 1.0
    rng = np.random.default_rng(0)
    x0 = real * rng.normal(size=dof.shape[0])
    start = real[:, None] * rng.normal(size=(dof.shape[0], k))
    values, vectors = _lowest_matrix_free(
        dof,
        potential,
        ctx,
        jnp.asarray(padded_modes),
        jnp.asarray(real),
        jnp.asarray(x0),
        jnp.asarray(start),
        k=k,
        iterations=1000,
    )
    values = np.asarray(values)
    order = np.argsort(values)
    return values[order], np.asarray(vectors)[:n_dof][:, order]


def frequencies_cm1(structure: Structure, potential, masses=None) -> np.ndarray:
    """Harmonic frequencies (cm^-1) from the mass-weighted exact Hessian (imaginary modes as
    negative numbers), like ``ase.vibrations.Vibrations``."""
    from ase import units
    from ase.data import atomic_masses

    h = hessian(structure, potential)
    m = np.asarray(masses if masses is not None else atomic_masses[structure.numbers])
    inv_sqrt = np.repeat(1.0 / np.sqrt(m), 3)
    omega2 = np.linalg.eigvalsh(inv_sqrt[:, None] * h * inv_sqrt[None, :])
    # eV/(A^2 amu) -> energy: hbar * sqrt(k/m), in cm^-1
    s = units._hbar * 1e10 / np.sqrt(units._e * units._amu)
    energies = s * np.sign(omega2) * np.sqrt(np.abs(omega2))  # eV
    return energies / units.invcm
