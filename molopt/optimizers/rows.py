"""Per-system reductions over rows, shared by the optimizers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from molopt.batch import system_max, system_sum


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


def select_state(active, new, old, rows: Rows):
    """Per-field ``where(active, new, old)``: fields named in ``ROW_FIELDS`` are row-indexed
    (leading axis R), every other field is system-indexed (leading axis S)."""
    row_fields = type(new).ROW_FIELDS
    values = {}
    for f in dataclasses.fields(new):
        n, o = getattr(new, f.name), getattr(old, f.name)
        if f.name in row_fields:
            mask = jnp.minimum(rows.system_idx, rows.n_systems - 1)
            mask = active[mask].reshape((-1,) + (1,) * (n.ndim - 1))
        else:
            mask = active.reshape((-1,) + (1,) * (n.ndim - 1))
        values[f.name] = jnp.where(mask, n, o)
    return type(new)(**values)
