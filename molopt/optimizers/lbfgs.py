"""Limited-memory BFGS (Nocedal, Math. Comp. 35, 773 (1980)) with ASE's exact rules
(``ase.optimize.LBFGS``): memory 100, initial inverse Hessian 1/alpha with alpha = 70
eV/A^2, damping 1, no line search, and a step scaled so that no row moves more than maxstep.

Batched: each system keeps its own circular history and iteration count, so a system that
joins a running batch starts from an empty history.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from molopt.optimizers.rows import Rows, select_state


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LbfgsState:
    """History ``s``/``y`` (R, m, 3) and ``rho`` (S, m); ``iteration`` (S,); the previous
    coordinates ``x0`` and forces ``f0`` (R, 3)."""

    ROW_FIELDS = ("s", "y", "x0", "f0")

    s: jax.Array
    y: jax.Array
    rho: jax.Array
    iteration: jax.Array
    x0: jax.Array
    f0: jax.Array


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
            s=jnp.zeros((n_rows, m, 3), dtype),
            y=jnp.zeros((n_rows, m, 3), dtype),
            rho=jnp.zeros((n_systems, m), dtype),
            iteration=jnp.zeros((n_systems,), jnp.int32),
            x0=jnp.zeros((n_rows, 3), dtype),
            f0=jnp.zeros((n_rows, 3), dtype),
        )

    def step(self, state: LbfgsState, x, forces, active, rows: Rows):
        m = self.memory
        k = state.iteration
        n_rows = x.shape[0]
        row_index = jnp.arange(n_rows)
        expand = rows.expand

        # store the newest (s, y) pair in slot (k - 1) mod m
        has_previous = k > 0
        s_new = x - state.x0
        y_new = state.f0 - forces  # gradient difference, gradient = -forces
        ys = rows.dot(y_new, s_new)
        rho_new = 1.0 / jnp.where(ys != 0, ys, 1.0)
        rho_new = jnp.where(ys != 0, rho_new, 0.0)
        slot = jnp.mod(k - 1, m)
        write = has_previous & active
        row_slot = expand(slot)[:, 0]
        row_write = expand(write)
        s_hist = state.s.at[row_index, row_slot].set(
            jnp.where(row_write, s_new, state.s[row_index, row_slot])
        )
        y_hist = state.y.at[row_index, row_slot].set(
            jnp.where(row_write, y_new, state.y[row_index, row_slot])
        )
        rho_hist = state.rho.at[jnp.arange(rows.n_systems), slot].set(
            jnp.where(write, rho_new, state.rho[jnp.arange(rows.n_systems), slot])
        )
        n_pairs = jnp.minimum(m, k)

        def newest_first(t, carry):
            q, coefficients = carry
            slot_t = jnp.mod(k - 1 - t, m)  # (S,)
            valid = t < n_pairs
            row_t = expand(slot_t)[:, 0]
            s_t = s_hist[row_index, row_t]
            y_t = y_hist[row_index, row_t]
            rho_t = rho_hist[jnp.arange(rows.n_systems), slot_t]
            a_t = jnp.where(valid, rho_t * rows.dot(s_t, q), 0.0)
            q = q - expand(a_t) * y_t
            return q, coefficients.at[t].set(a_t)

        q0 = -forces
        coefficients = jnp.zeros((m, rows.n_systems), x.dtype)
        q, coefficients = jax.lax.fori_loop(0, m, newest_first, (q0, coefficients))
        z = q / self.alpha

        def oldest_first(i, z):
            t = m - 1 - i
            slot_t = jnp.mod(k - 1 - t, m)
            valid = t < n_pairs
            row_t = expand(slot_t)[:, 0]
            s_t = s_hist[row_index, row_t]
            y_t = y_hist[row_index, row_t]
            rho_t = rho_hist[jnp.arange(rows.n_systems), slot_t]
            b = rho_t * rows.dot(y_t, z)
            return z + jnp.where(expand(valid), s_t * expand(coefficients[t] - b), 0.0)

        z = jax.lax.fori_loop(0, m, oldest_first, z)
        direction = -z
        longest = rows.max_norm(direction)
        scale = jnp.where(
            longest >= self.maxstep, self.maxstep / jnp.where(longest > 0, longest, 1.0), 1.0
        )
        dr = direction * expand(scale) * self.damping
        new = LbfgsState(s_hist, y_hist, rho_hist, k + 1, x, forces)
        new = select_state(active, new, state, rows)
        return new, jnp.where(expand(active), dr, 0.0), jnp.ones_like(active)
