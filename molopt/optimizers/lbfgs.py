"""Limited-memory BFGS (Nocedal, Math. Comp. 35, 773 (1980)) with ASE's exact rules
(``ase.optimize.LBFGS``): memory 100, initial inverse Hessian 1/alpha with alpha = 70
eV/A^2, damping 1, no line search, and a step scaled so that no row moves more than maxstep.

Batched: each system has its own history length, curvature pairs and iteration count, so a
system that joins a running batch starts from an empty history. The histories share one
ring buffer position (every running system adds a pair on every call), so each two-loop
iteration reads one contiguous (R, 3) slice instead of gathering per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from molopt.optimizers.rows import Rows, select_state
from molopt.scopes import ROW, SYSTEM, batched_state, scoped


@batched_state
class LbfgsState:
    """History ``s``/``y`` (m, R, 3) and ``rho`` (m, S) in a ring whose next slot is
    ``pointer`` (S,) (equal for all systems of a batch); ``iteration`` (S,); previous
    coordinates ``x0`` and forces ``f0`` (R, 3)."""

    s: jax.Array = scoped(ROW, axis=1)
    y: jax.Array = scoped(ROW, axis=1)
    rho: jax.Array = scoped(SYSTEM, axis=1)
    pointer: jax.Array = scoped(SYSTEM)
    iteration: jax.Array = scoped(SYSTEM)
    x0: jax.Array = scoped(ROW)
    f0: jax.Array = scoped(ROW)


@dataclass(frozen=True)
class LBFGS:
    maxstep: float = 0.2
    memory: int = 100
    damping: float = 1.0
    alpha: float = 70.0

    name = "lbfgs"

    def init(self, n_rows: int, n_systems: int, dtype) -> LbfgsState:
        m = self.memory
        return LbfgsState(
            s=jnp.zeros((m, n_rows, 3), dtype),
            y=jnp.zeros((m, n_rows, 3), dtype),
            rho=jnp.zeros((m, n_systems), dtype),
            pointer=jnp.zeros((n_systems,), jnp.int32),
            iteration=jnp.zeros((n_systems,), jnp.int32),
            x0=jnp.zeros((n_rows, 3), dtype),
            f0=jnp.zeros((n_rows, 3), dtype),
        )

    @staticmethod
    def canonical(fields: dict) -> dict:
        """One system's host-side state (row fields as (atom rows, cell rows) pairs) with its
        ring rotated to position 0, for moving it into another batch whose ring starts at 0."""
        shift = int(fields["pointer"])

        def roll(a):
            return None if a is None else np.roll(a, -shift, axis=0)

        out = dict(fields)
        out["s"] = tuple(roll(a) for a in fields["s"])
        out["y"] = tuple(roll(a) for a in fields["y"])
        out["rho"] = roll(fields["rho"])
        out["pointer"] = np.zeros_like(fields["pointer"])
        return out

    def step(self, state: LbfgsState, x, forces, active, rows: Rows):
        m = self.memory
        k = state.iteration
        expand = rows.expand
        slot = jnp.mod(jnp.max(state.pointer), m)

        # the newest (s, y) pair goes into the shared ring slot
        has_previous = (k > 0) & active
        s_new = x - state.x0
        y_new = state.f0 - forces  # gradient difference, gradient = -forces
        ys = rows.dot(y_new, s_new)
        rho_new = jnp.where(ys != 0, 1.0 / jnp.where(ys != 0, ys, 1.0), 0.0)
        row_write = expand(has_previous)
        s_hist = state.s.at[slot].set(jnp.where(row_write, s_new, state.s[slot]))
        y_hist = state.y.at[slot].set(jnp.where(row_write, y_new, state.y[slot]))
        rho_hist = state.rho.at[slot].set(jnp.where(has_previous, rho_new, state.rho[slot]))
        n_pairs = jnp.minimum(m, k)  # this system's pairs: the newest n_pairs slots
        newest = slot

        def newest_first(t, carry):
            q, coefficients = carry
            slot_t = jnp.mod(newest - t, m)
            valid = t < n_pairs
            a_t = jnp.where(valid, rho_hist[slot_t] * rows.dot(s_hist[slot_t], q), 0.0)
            q = q - expand(a_t) * y_hist[slot_t]
            return q, coefficients.at[t].set(a_t)

        q0 = -forces
        coefficients = jnp.zeros((m, rows.n_systems), x.dtype)
        # only as many pairs as the longest history in the batch
        depth = jnp.max(jnp.where(active, n_pairs, 0))
        q, coefficients = jax.lax.fori_loop(0, depth, newest_first, (q0, coefficients))
        z = q / self.alpha

        def oldest_first(i, z):
            t = depth - 1 - i
            slot_t = jnp.mod(newest - t, m)
            valid = t < n_pairs
            b = rho_hist[slot_t] * rows.dot(y_hist[slot_t], z)
            return z + jnp.where(expand(valid), s_hist[slot_t] * expand(coefficients[t] - b), 0.0)

        z = jax.lax.fori_loop(0, depth, oldest_first, z)
        direction = -z
        longest = rows.max_norm(direction)
        scale = jnp.where(
            longest >= self.maxstep, self.maxstep / jnp.where(longest > 0, longest, 1.0), 1.0
        )
        dr = direction * expand(scale) * self.damping
        pointer = jnp.where(jnp.any(has_previous), state.pointer + 1, state.pointer)
        new = LbfgsState(s_hist, y_hist, rho_hist, pointer, k + 1, x, forces)
        # the history was written only where has_previous (active systems): selecting it
        # again would read and write the whole (m, R, 3) ring every step
        new = select_state(active, new, state, rows, masked=("s", "y", "rho"))
        # the ring position is shared by the whole batch
        new = LbfgsState(new.s, new.y, new.rho, pointer, new.iteration, new.x0, new.f0)
        return new, jnp.where(expand(active), dr, 0.0), jnp.ones_like(active)
