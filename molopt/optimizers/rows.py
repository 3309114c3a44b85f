"""Per-system reductions over rows, shared by the optimizers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from molopt.batch import system_max, system_sum
from molopt.scopes import ROW, scope_of


@dataclass(frozen=True)
class Rows:
    """``system_idx`` (R,) int32 row -> system (S for padding); ``n_systems`` static S."""

    system_idx: jnp.ndarray
    n_systems: int

    def dot(self, a, b):
        """Per-system dot product of (R, 3) arrays, (S,)."""
        return system_sum(jnp.sum(a * b, axis=1), self.system_idx, self.n_systems)

    def max_norm(self, a):
        """Per-system largest row norm (ASE's fmax definition), (S,)."""
        return system_max(jnp.sqrt(jnp.sum(a * a, axis=1)), self.system_idx, self.n_systems)

    def expand(self, per_system):
        """(S,) -> (R, 1) values for each row (padding rows get system S-1's, masked later)."""
        index = jnp.minimum(self.system_idx, self.n_systems - 1)
        return per_system[index][:, None]


def select_state(active, new, old, rows: Rows, masked: tuple[str, ...] = ()):
    """Per-field ``where(active, new, old)`` for an optimizer state (per row or per system,
    as each field's scope declares: :mod:`molopt.scopes`).

    Fields named in ``masked`` are taken from ``new`` as they are: the step already left
    inactive systems' entries untouched there (large histories are not read and written
    again whole)."""
    values = {}
    for f in dataclasses.fields(new):
        n, o = getattr(new, f.name), getattr(old, f.name)
        if f.name in masked:
            values[f.name] = n
            continue
        scope, axis = scope_of(type(new), f.name)
        mask = active
        if scope == ROW:
            mask = active[jnp.minimum(rows.system_idx, rows.n_systems - 1)]
        shape = [1] * n.ndim
        shape[axis] = mask.shape[0]
        values[f.name] = jnp.where(mask.reshape(shape), n, o)
    return type(new)(**values)
