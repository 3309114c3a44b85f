"""What each field of a batched state is indexed by, declared once with the field.

A batch holds many systems in flat arrays. When the engine moves a running system from one
batch into another (a refill or a compaction), every field of its state must be cut out and
put back by the right index: per optimizer row, per atom, per system, or not at all. Each
field says which with :func:`scoped`; :func:`batched_state` makes the class a frozen
dataclass registered as a pytree and refuses, when the class is created, any field that does
not say. The transplant (:mod:`molopt.engine.transplant`) and the optimizers' per-field
selections read the declarations instead of naming conventions.

Scopes:

* ``ROW``: one entry per optimizer row: the atoms, then, with a variable cell, three rows
  per system for its cell degrees of freedom;
* ``ATOM``: one entry per padded atom;
* ``SYSTEM``: one entry per system;
* ``GLOBAL``: one value for the whole batch (never carried into another batch);
* ``NESTED``: another batched state (an optimizer's), moved field by field.

``axis`` says which axis the index runs along (an L-BFGS history is (memory, rows, 3)).
"""

from __future__ import annotations

import dataclasses

import jax

ROW, ATOM, SYSTEM, GLOBAL, NESTED = "row", "atom", "system", "global", "nested"
SCOPES = (ROW, ATOM, SYSTEM, GLOBAL, NESTED)


def scoped(scope: str, axis: int = 0):
    """A dataclass field declaring its scope (and the axis its index runs along)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
    return dataclasses.field(metadata={"scope": scope, "axis": axis})


def batched_state(cls):
    """Class decorator: a frozen dataclass, a pytree, every field's scope checked."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    undeclared = [f.name for f in dataclasses.fields(cls) if "scope" not in f.metadata]
    if undeclared:
        raise TypeError(f"{cls.__name__}: fields without a scope: {', '.join(undeclared)}")
    return jax.tree_util.register_dataclass(cls)


def scope_of(state_type, name: str) -> tuple[str, int]:
    """(scope, axis) of field ``name`` of a :func:`batched_state` class (or instance)."""
    if not isinstance(state_type, type):
        state_type = type(state_type)
    for f in dataclasses.fields(state_type):
        if f.name == name:
            return f.metadata["scope"], f.metadata["axis"]
    raise KeyError(f"{state_type.__name__} has no field {name!r}")
