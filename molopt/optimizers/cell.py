"""Variable-cell relaxation with the semantics of ASE's ``FrechetCellFilter``.

Degrees of freedom per system: atom positions ``z`` in the reference (starting) cell, and
the three rows of ``U = N log(F)``, F the deformation gradient (cell = cell0 @ F^T, positions
= z @ F^T), N the number of atoms (ASE's ``exp_cell_factor``). The generalized forces are
``f @ F`` on atoms and, on U, the derivative of the enthalpy through the matrix exponential
(its Frechet derivative) divided by N, as in ASE. The convergence test includes the cell
rows, so cell relaxations do not stop early. ``pressure`` (eV/A^3) adds the pV term.
Here U itself is the state (F = expm(U/N)), so no matrix logarithm is ever needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.scipy.linalg import expm


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CellReference:
    """``cell`` (S, 3, 3) reference cells; ``factor`` (S,) exp_cell_factor (atoms per
    system); ``pressure`` scalar eV/A^3."""

    cell: jax.Array
    factor: jax.Array
    pressure: jax.Array


def deformation(log_deformation_rows: jax.Array, reference: CellReference) -> jax.Array:
    """F (S, 3, 3) from the cell rows of the coordinates, (3S, 3)."""
    n_systems = reference.cell.shape[0]
    u = log_deformation_rows.reshape(n_systems, 3, 3) / reference.factor[:, None, None]
    return jax.vmap(expm)(u)


def to_physical(x, system_idx, reference: CellReference):
    """Optimizer coordinates (A + 3S, 3) -> positions (A, 3), cell (S, 3, 3), F (S, 3, 3)."""
    n_systems = reference.cell.shape[0]
    n_atoms = x.shape[0] - 3 * n_systems
    F = deformation(x[n_atoms:], reference)
    system_of_atom = jnp.minimum(system_idx, n_systems - 1)
    positions = jnp.einsum("ay,axy->ax", x[:n_atoms], F[system_of_atom])
    cell = jnp.einsum("sij,skj->sik", reference.cell, F)
    return positions, cell, F


def generalized_forces(x, forces, dE_dstrain, cell, F, system_idx, reference: CellReference):
    """(A + 3S, 3): atom rows ``forces @ F`` and cell rows from the virial (ASE's
    ``get_forces_frechet``). ``forces`` must already have constraints applied."""
    n_systems = reference.cell.shape[0]
    n_atoms = forces.shape[0]
    volume = jnp.abs(jnp.linalg.det(cell))
    eye = jnp.eye(3, dtype=forces.dtype)
    virial = -(dE_dstrain + (reference.pressure * volume)[:, None, None] * eye)
    system_of_atom = jnp.minimum(system_idx, n_systems - 1)
    atom_rows = jnp.einsum("ax,axy->ay", forces, F[system_of_atom])
    cell_gradient = jnp.einsum("sij,skj->sik", virial, jnp.linalg.inv(F))  # virial @ inv(F^T)
    u = x[n_atoms:].reshape(n_systems, 3, 3) / reference.factor[:, None, None]

    def log_force(u_s, g_s):
        _, pullback = jax.vjp(expm, u_s)
        return pullback(g_s)[0]

    cell_rows = jax.vmap(log_force)(u, cell_gradient) / reference.factor[:, None, None]
    return jnp.concatenate([atom_rows, cell_rows.reshape(3 * n_systems, 3)], axis=0)
