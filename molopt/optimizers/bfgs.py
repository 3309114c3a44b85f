"""BFGS with a dense Hessian (Broyden, Fletcher, Goldfarb, Shanno, 1970) and ASE's exact
rules (``ase.optimize.BFGS``): the initial Hessian alpha I with alpha = 70 eV/A^2, the
update H += y y^T / (s.y) - (H s)(H s)^T / (s.H s) skipped only when no coordinate moved
by 1e-7 A or more since the last step (no curvature test), the step -V (V^T g / |w|) from
the eigendecomposition H = V diag(w) V^T with the absolute eigenvalues, and the whole step
scaled so that no row moves more than maxstep.

Batched: each system has its own (3n, 3n) Hessian, n its rows (atoms, then its three cell
rows with a variable cell). The Hessians are blocks (S, 3D, 3D) padded to D rows, where D
covers the largest system of the batch (:meth:`BFGS.for_batch`); row ``r`` of system ``s``
is slot ``k`` of its block, ``k`` its rank among the rows of ``s``, so atom rows come first
and cell rows after them in every batch. Padding slots keep alpha on the diagonal and no
coupling: they have no force and never move, so the update leaves them as they are.

Cost: memory 8 (3D)^2 bytes per system in float64 and an O((3D)^3) eigendecomposition per
system and step. Past :data:`LARGE_SYSTEM_ATOMS` atoms that dominates a step; L-BFGS
(``lbfgs``) then costs O(memory x n) per step instead.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from molopt.batch import system_max
from molopt.optimizers.rows import Rows, select_state
from molopt.scopes import ROW, SYSTEM, batched_state, scoped

#: a system with more rows than this (atoms, plus 3 with a variable cell) gets a warning:
#: its dense Hessian and the eigendecomposition every step dominate the cost (see the
#: module docstring)
LARGE_SYSTEM_ATOMS = 1000

#: ASE skips the update when no coordinate moved by this much (A): the same configuration
SAME_CONFIGURATION = 1e-7


@batched_state
class BfgsState:
    """``hessian`` (S, 3D, 3D) eV/A^2 per system; previous coordinates ``x0`` and forces
    ``f0`` (R, 3); ``iteration`` (S,) steps taken (0: no previous point yet)."""

    hessian: jax.Array = scoped(SYSTEM)
    x0: jax.Array = scoped(ROW)
    f0: jax.Array = scoped(ROW)
    iteration: jax.Array = scoped(SYSTEM)


def _slots(rows: Rows) -> jax.Array:
    """(R,) each row's rank among the rows of its system (its slot in the system's block)."""
    idx = rows.system_idx
    n_rows = idx.shape[0]
    order = jnp.argsort(idx, stable=True)
    position = jnp.zeros_like(idx).at[order].set(jnp.arange(n_rows, dtype=idx.dtype))
    counts = jnp.zeros((rows.n_systems + 1,), idx.dtype).at[idx].add(1)
    first = jnp.cumsum(counts) - counts
    return position - first[idx]


def block_rows(n: int) -> int:
    """Rows of a Hessian block for systems of up to ``n`` rows: at least 16, then rungs
    2^k (1 + j/8). Padding costs the eigendecomposition its cube (at most 1.42 times
    here; the batch ladder's 50% would cost 3.4 times), while a new rung only compiles."""
    if n <= 16:
        return 16
    rung = 2 ** (int(n).bit_length() - 1) // 8
    return -(-n // rung) * rung


@dataclass(frozen=True)
class BFGS:
    maxstep: float = 0.2
    alpha: float = 70.0
    #: rows per system the Hessian blocks hold; set per batch by the engine
    #: (:meth:`for_batch`), not a user option. 0: as many as the batch has rows.
    system_rows: int = dataclasses.field(default=0, metadata={"option": False})

    name = "bfgs"

    def for_batch(self, largest_rows: int) -> BFGS:
        """This optimizer sized for a batch whose largest system has ``largest_rows`` rows
        (atoms, plus 3 with a variable cell), rounded up by :func:`block_rows`."""
        if largest_rows > LARGE_SYSTEM_ATOMS:
            warnings.warn(
                f"bfgs keeps a dense Hessian per structure: {largest_rows} rows need "
                f"{8 * (3 * largest_rows) ** 2 / 1e6:.0f} MB each in float64 and an "
                "eigendecomposition of that size every step; lbfgs (--optimizer lbfgs) "
                "scales linearly",
                stacklevel=2,
            )
        return dataclasses.replace(self, system_rows=block_rows(largest_rows))

    def state_bytes(self, rows: list[int], itemsize: int) -> int:
        """Bytes a batch of systems with ``rows`` rows each needs for their dense Hessians
        (blocks sized to the largest), with the eigendecomposition's temporaries (x3): the
        engine's memory estimate adds it, so that a system too large for the memory fails
        alone with the reason instead of exhausting it."""
        if not rows:
            return 0
        dim = 3 * block_rows(max(rows))
        return 3 * len(rows) * dim * dim * itemsize

    def init(self, n_rows: int, n_systems: int, dtype) -> BfgsState:
        dim = 3 * (self.system_rows or n_rows)
        return BfgsState(
            hessian=jnp.broadcast_to(self.alpha * jnp.eye(dim, dtype=dtype), (n_systems, dim, dim)),
            x0=jnp.zeros((n_rows, 3), dtype),
            f0=jnp.zeros((n_rows, 3), dtype),
            iteration=jnp.zeros((n_systems,), jnp.int32),
        )

    @staticmethod
    def canonical(fields: dict) -> dict:
        """One system's host-side state cut to its own rows (its block's leading corner),
        so that it fits the block of any batch it moves into."""
        atom_part, cell_part = fields["x0"]
        n = len(atom_part) + (0 if cell_part is None else len(cell_part))
        out = dict(fields)
        out["hessian"] = np.asarray(fields["hessian"])[: 3 * n, : 3 * n]
        return out

    def step(self, state: BfgsState, x, forces, active, rows: Rows):
        n_systems = rows.n_systems
        hessian = state.hessian
        dim = hessian.shape[-1]
        slot = _slots(rows)
        system = rows.system_idx

        def blocks(a):
            """(R, 3) rows -> (S, 3D) per-system vectors (padding rows dropped)."""
            out = jnp.zeros((n_systems, dim // 3, 3), a.dtype)
            return out.at[system, slot].set(a, mode="drop").reshape(n_systems, dim)

        def unblock(v):
            """(S, 3D) -> (R, 3) (padding rows get zeros)."""
            v = v.reshape(n_systems, dim // 3, 3)
            got = v[jnp.minimum(system, n_systems - 1), jnp.minimum(slot, dim // 3 - 1)]
            return jnp.where((system < n_systems)[:, None], got, 0.0)

        dx = x - state.x0
        moved = system_max(jnp.max(jnp.abs(dx), axis=1), system, n_systems) >= SAME_CONFIGURATION
        update = active & (state.iteration > 0) & moved
        s = blocks(dx)
        y = blocks(state.f0 - forces)  # gradient difference, gradient = -forces
        hs = jnp.einsum("sij,sj->si", hessian, s)
        sy = jnp.sum(s * y, axis=1)
        shs = jnp.sum(s * hs, axis=1)
        safe_sy = jnp.where(update, sy, 1.0)[:, None, None]
        safe_shs = jnp.where(update, shs, 1.0)[:, None, None]
        updated = (
            hessian
            + y[:, :, None] * y[:, None, :] / safe_sy
            - hs[:, :, None] * hs[:, None, :] / safe_shs
        )
        hessian = jnp.where(update[:, None, None], updated, hessian)

        omega, vectors = jnp.linalg.eigh(hessian)
        f = blocks(forces)
        along = jnp.einsum("sij,si->sj", vectors, f) / jnp.abs(omega)
        dr = unblock(jnp.einsum("sij,sj->si", vectors, along))
        longest = rows.max_norm(dr)
        scale = jnp.where(
            longest >= self.maxstep, self.maxstep / jnp.where(longest > 0, longest, 1.0), 1.0
        )
        dr = dr * rows.expand(scale)
        new = BfgsState(hessian, x, forces, state.iteration + 1)
        # the Hessian was updated only where active
        new = select_state(active, new, state, rows, masked=("hessian",))
        return new, jnp.where(rows.expand(active), dr, 0.0), jnp.ones_like(active)
