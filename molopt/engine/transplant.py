"""Moving running systems between batches, driven by the scopes every state field declares
(:mod:`molopt.scopes`): :func:`extract` cuts one system's entries out of a batch's state on
the host, :func:`restore` writes saved systems into the state of a new batch."""

from __future__ import annotations

import dataclasses

import numpy as np

from molopt._jax import jax
from molopt.batch import Layout
from molopt.scopes import ATOM, GLOBAL, NESTED, ROW, scope_of


def _places(layout: Layout, k: int, variable_cell: bool):
    """System ``k``'s atom rows (a slice) and cell rows (indices, or None)."""
    atoms = layout.atoms_of(k)
    A = layout.n_padded_atoms
    cells = np.arange(A + 3 * k, A + 3 * k + 3) if variable_cell else None
    return atoms, cells


def extract(state, k: int, layout: Layout, variable_cell: bool) -> dict:
    """System ``k`` of a host copy of a batched state, field by field: per-row fields as
    (atom rows, cell rows or None), per-atom fields as its atoms' rows, per-system fields as
    its entry; nested states likewise; batch-wide fields are not carried."""
    atoms, cells = _places(layout, k, variable_cell)
    atom_index = np.arange(atoms.start, atoms.stop)

    def cut(value):
        out = {}
        for f in dataclasses.fields(value):
            scope, axis = scope_of(type(value), f.name)
            a = getattr(value, f.name)
            if scope == GLOBAL:
                continue
            if scope == NESTED:
                out[f.name] = cut(a)
            elif scope == ROW:
                cell_part = None if cells is None else np.take(a, cells, axis=axis)
                out[f.name] = (np.take(a, atom_index, axis=axis), cell_part)
            elif scope == ATOM:
                out[f.name] = np.take(a, atom_index, axis=axis)
            else:
                out[f.name] = np.take(a, k, axis=axis)
        return out

    return cut(state)


def restore(state, saved: dict, layout: Layout, variable_cell: bool):
    """``state`` (a batch's state) with the systems in ``saved`` ({k: :func:`extract`'s
    dict}) written in at their places ``k``; batch-wide fields keep the new batch's values."""

    def write(value, parts: list):
        arrays = {}
        for f in dataclasses.fields(value):
            scope, axis = scope_of(type(value), f.name)
            a = getattr(value, f.name)
            if scope == NESTED:
                arrays[f.name] = write(a, [(k, entry[f.name]) for k, entry in parts])
                continue
            if scope == GLOBAL:
                arrays[f.name] = jax.device_put(np.asarray(a))
                continue
            host = np.array(a)
            target = np.moveaxis(host, axis, 0)  # a view: writes go through to ``host``
            for k, entry in parts:
                atoms, cells = _places(layout, k, variable_cell)
                data = entry[f.name]
                if scope == ROW:
                    target[atoms] = np.moveaxis(data[0], axis, 0)
                    if data[1] is not None:
                        target[cells] = np.moveaxis(data[1], axis, 0)
                elif scope == ATOM:
                    target[atoms] = np.moveaxis(data, axis, 0)
                elif np.shape(data) == target[k].shape:
                    target[k] = data
                else:  # a per-system block cut to its system's size: the leading corner
                    target[k][tuple(slice(0, n) for n in np.shape(data))] = data
            arrays[f.name] = jax.device_put(host)
        return type(value)(**arrays)

    return write(jax.device_get(state), sorted(saved.items()))
