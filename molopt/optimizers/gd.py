"""Steepest descent with Barzilai-Borwein step lengths (Barzilai & Borwein, IMA J. Numer.
Anal. 8, 141 (1988)): x += eta F with eta = s.s / s.y from the last step, the first step
eta = 1/alpha, and no row moving more than maxstep. A fixed step diverges wherever the
curvature exceeds 2/eta; the BB step adapts to it per system."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from molopt.optimizers.rows import Rows, select_state
from molopt.scopes import ROW, SYSTEM, batched_state, scoped


@batched_state
class GdState:
    """Previous coordinates ``x0`` and forces ``f0`` (R, 3); ``started`` (S,)."""

    x0: jax.Array = scoped(ROW)
    f0: jax.Array = scoped(ROW)
    started: jax.Array = scoped(SYSTEM)


@dataclass(frozen=True)
class GradientDescent:
    maxstep: float = 0.2
    alpha: float = 70.0

    name = "gd"

    def init(self, n_rows: int, n_systems: int, dtype) -> GdState:
        return GdState(
            x0=jnp.zeros((n_rows, 3), dtype),
            f0=jnp.zeros((n_rows, 3), dtype),
            started=jnp.zeros((n_systems,), bool),
        )

    def step(self, state: GdState, x, forces, active, rows: Rows):
        s = x - state.x0
        y = state.f0 - forces
        ss = rows.dot(s, s)
        sy = rows.dot(s, y)
        usable = state.started & (sy > 0)
        eta = jnp.where(usable, ss / jnp.where(sy > 0, sy, 1.0), 1.0 / self.alpha)
        dr = forces * rows.expand(eta)
        longest = rows.max_norm(dr)
        scale = jnp.where(
            longest >= self.maxstep, self.maxstep / jnp.where(longest > 0, longest, 1.0), 1.0
        )
        dr = dr * rows.expand(scale)
        new = GdState(x0=x, f0=forces, started=jnp.ones_like(state.started))
        new = select_state(active, new, state, rows)
        return new, jnp.where(rows.expand(active), dr, 0.0), jnp.ones_like(active)
