"""Steepest descent: x += F / alpha, scaled so that no row moves more than maxstep
(the first step of ASE's L-BFGS, repeated). Robust and simple; slow."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from molopt.optimizers.rows import Rows


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GdState:
    ROW_FIELDS = ()

    n_steps: jax.Array


@dataclass(frozen=True)
class GradientDescent:
    maxstep: float = 0.2
    alpha: float = 70.0

    name = "gd"

    def init(self, n_rows: int, n_systems: int, dtype) -> GdState:
        return GdState(n_steps=jnp.zeros((n_systems,), jnp.int32))

    def step(self, state: GdState, x, forces, active, rows: Rows):
        dr = forces / self.alpha
        longest = rows.max_norm(dr)
        scale = jnp.where(
            longest >= self.maxstep, self.maxstep / jnp.where(longest > 0, longest, 1.0), 1.0
        )
        dr = dr * rows.expand(scale)
        state = GdState(jnp.where(active, state.n_steps + 1, state.n_steps))
        return state, jnp.where(rows.expand(active), dr, 0.0), jnp.ones_like(active)
