"""Variable-cell relaxation with the semantics of ASE's ``FrechetCellFilter``.

Degrees of freedom per system: atom positions ``z`` in the reference (starting) cell, and
the three rows of ``U = N log(F)``, F the deformation gradient (cell = cell0 @ F^T, positions
= z @ F^T), N the number of atoms (ASE's ``exp_cell_factor``). The generalized forces are
``f @ F`` on atoms and, on U, the derivative of the enthalpy through the matrix exponential
(its Frechet derivative) divided by N, as in ASE. The convergence test includes the cell
rows, so cell relaxations do not stop early. Here U itself is the state (F = expm(U/N)); a
matrix logarithm is needed only for the masks that are not blocks of axes (below).

Each system has its own options (ASE's ``FrechetCellFilter`` arguments), in the order ASE
applies them to the virial ``-(dE/dstrain - V sigma_target)``:

- a target stress ``sigma_target`` (3, 3) eV/A^3 with ASE's sign (positive = tensile, as
  ``atoms.get_stress()``): the relaxed stress equals it. A scalar pressure ``p``
  (``scalar_pressure``) is ``sigma_target = -p I``, the enthalpy E + pV. A non-hydrostatic
  target has no enthalpy whose gradient these forces are (as ASE says of its pressure, the
  forces are then not an energy's); the fixed point is still stress = target.
- ``hydrostatic`` (``hydrostatic_strain``): the virial replaced by its trace / 3 on the
  diagonal, so the cell only scales.
- ``mask`` (3, 3) 0/1 (ASE's ``mask``): virial components outside it are zero, and the cell
  is ``cell0 @ (I + (F - I) * mask)^T``, from which ASE reads U back (``logm``) before each
  step. For a mask that is a block of axes (:func:`molopt.optimizers.cell_options.is_block`:
  ``xx,yy,xy``, ``zz``, ...) U stays inside the mask and that round trip only drops the
  step's components outside it (:func:`free_rows`); for any other mask (``xy`` alone, all but
  ``xy``) :func:`read_back` does ASE's round trip (``roundtrip`` systems).
- ``constant_volume``: the trace of the cell forces removed (ASE's projection), so
  tr(U) and hence det(F), the volume, stay where they started.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from molopt.linalg3 import det3, expm3, inv3
from molopt.optimizers.cell_options import CellOptions, free_components, is_block


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CellReference:
    """Per system: ``cell`` (S, 3, 3) reference cells (A); ``factor`` (S,) exp_cell_factor
    (atoms per system); ``stress`` (S, 3, 3) target stress (eV/A^3, positive = tensile);
    ``mask`` (S, 3, 3) free strain components (1.0 free, 0.0 fixed); ``hydrostatic``,
    ``constant_volume`` and ``roundtrip`` (the mask is not a block of axes) (S,) bool."""

    cell: jax.Array
    factor: jax.Array
    stress: jax.Array
    mask: jax.Array
    hydrostatic: jax.Array
    constant_volume: jax.Array
    roundtrip: jax.Array


def make_reference(cells, n_atoms, pbc, dtype, options: Sequence[CellOptions]) -> CellReference:
    """The reference of a batch on the device. ``cells`` (S, 3, 3) A, ``n_atoms`` (S,),
    ``pbc`` (S, 3); ``options`` each system's :class:`CellOptions` (padding systems, past the
    end of the list, get the defaults). A mask keeps only components between periodic
    directions of each system (a slab relaxes its in-plane cell)."""
    n_systems = len(cells)
    options = list(options) + [CellOptions()] * (n_systems - len(options))
    masks = np.stack([free_components(o.mask, pbc[k]) for k, o in enumerate(options)])

    def put(a, kind=dtype):
        return jax.device_put(np.asarray(a, kind))

    return CellReference(
        cell=put(cells),
        factor=put(n_atoms),
        stress=put(np.stack([o.target() for o in options])),
        mask=put(masks),
        hydrostatic=put([o.hydrostatic for o in options], bool),
        constant_volume=put([o.constant_volume for o in options], bool),
        roundtrip=put([not is_block(m) for m in masks], bool),
    )


def deformation(log_deformation_rows: jax.Array, reference: CellReference) -> jax.Array:
    """F (S, 3, 3) from the cell rows of the coordinates, (3S, 3)."""
    n_systems = reference.cell.shape[0]
    u = log_deformation_rows.reshape(n_systems, 3, 3) / reference.factor[:, None, None]
    return expm3(u)


def free_rows(reference: CellReference) -> jax.Array:
    """(3S, 3) 1.0 where a cell coordinate may move: a step outside a block mask is dropped,
    as ASE drops it when it builds the masked cell (and reads U back from that cell); the
    steps of ``roundtrip`` systems all apply (:func:`read_back` follows)."""
    free = jnp.where(reference.roundtrip[:, None, None], 1.0, reference.mask)
    return free.reshape(-1, 3)


def _sqrtm(a: jax.Array, iterations: int = 10) -> jax.Array:
    """Principal square root of a (3, 3) matrix near the identity: Denman and Beavers,
    Appl. Math. Comput. 2, 63 (1976), a fixed number of iterations (quadratic convergence)."""
    eye = jnp.eye(3, dtype=a.dtype)

    def iterate(_, yz):
        y, z = yz
        return 0.5 * (y + inv3(z)), 0.5 * (z + inv3(y))

    return jax.lax.fori_loop(0, iterations, iterate, (a, eye))[0]


def _logm(a: jax.Array, roots: int = 2, terms: int = 14) -> jax.Array:
    """Principal logarithm of a (3, 3) matrix near the identity by inverse scaling and
    squaring (Kenney and Laub, SIAM J. Matrix Anal. Appl. 10, 191 (1989)): ``roots`` square
    roots, then log A = 2 atanh(Z), Z = (A - I)(A + I)^-1, as its odd series. For the
    deformations of a relaxation (|log F| < 1) it agrees with scipy.linalg.logm to ~1e-15."""
    eye = jnp.eye(3, dtype=a.dtype)
    for _ in range(roots):
        a = _sqrtm(a)
    z = (a - eye) @ inv3(a + eye)  # (functions of a commute)
    z2 = z @ z
    term, total = z, z
    for j in range(1, terms):
        term = term @ z2
        total = total + term / (2 * j + 1)
    return (2.0 ** (roots + 1)) * total


def read_back(x: jax.Array, reference: CellReference) -> jax.Array:
    """Coordinates (A + 3S, 3) with the cell rows of ``roundtrip`` systems replaced by what
    ASE reads back from the masked cell, N logm(I + (expm(U/N) - I) * mask)."""
    n_systems = reference.cell.shape[0]
    n_atoms = x.shape[0] - 3 * n_systems
    factor = reference.factor[:, None, None]
    u = x[n_atoms:].reshape(n_systems, 3, 3) / factor
    eye = jnp.eye(3, dtype=x.dtype)
    masked = eye + (expm3(u) - eye) * jnp.swapaxes(reference.mask, 1, 2)
    u = jnp.where(reference.roundtrip[:, None, None], jax.vmap(_logm)(masked), u)
    return jnp.concatenate([x[:n_atoms], (u * factor).reshape(3 * n_systems, 3)], axis=0)


def to_physical(x, system_idx, reference: CellReference):
    """Optimizer coordinates (A + 3S, 3) -> positions (A, 3), cell (S, 3, 3), F (S, 3, 3)."""
    n_systems = reference.cell.shape[0]
    n_atoms = x.shape[0] - 3 * n_systems
    F = deformation(x[n_atoms:], reference)
    system_of_atom = jnp.minimum(system_idx, n_systems - 1)
    positions = jnp.einsum("ay,axy->ax", x[:n_atoms], F[system_of_atom])
    cell = jnp.einsum("sij,skj->sik", reference.cell, F)
    return positions, cell, F


def _diagonal_trace(a: jax.Array) -> jax.Array:
    """(S, 3, 3) -> trace / 3 on the diagonal."""
    trace = jnp.trace(a, axis1=1, axis2=2)
    return (trace / 3.0)[:, None, None] * jnp.eye(3, dtype=a.dtype)


def generalized_forces(x, forces, dE_dstrain, cell, F, system_idx, reference: CellReference):
    """(A + 3S, 3): atom rows ``forces @ F`` and cell rows from the virial (ASE's
    ``get_forces_frechet`` with each system's options). ``forces`` must already have
    constraints applied."""
    n_systems = reference.cell.shape[0]
    n_atoms = forces.shape[0]
    volume = jnp.abs(det3(cell))
    virial = -(dE_dstrain - volume[:, None, None] * reference.stress)
    virial = jnp.where(reference.hydrostatic[:, None, None], _diagonal_trace(virial), virial)
    virial = virial * reference.mask
    system_of_atom = jnp.minimum(system_idx, n_systems - 1)
    atom_rows = jnp.einsum("ax,axy->ay", forces, F[system_of_atom])
    cell_gradient = jnp.einsum("sij,skj->sik", virial, inv3(F))  # virial @ inv(F^T)
    u = x[n_atoms:].reshape(n_systems, 3, 3) / reference.factor[:, None, None]

    _, pullback = jax.vjp(expm3, u)  # the Frechet derivative's adjoint, system by system
    (log_forces,) = pullback(cell_gradient)
    log_forces = jnp.where(
        reference.constant_volume[:, None, None],
        log_forces - _diagonal_trace(log_forces),
        log_forces,
    )
    cell_rows = log_forces / reference.factor[:, None, None]
    return jnp.concatenate([atom_rows, cell_rows.reshape(3 * n_systems, 3)], axis=0)
