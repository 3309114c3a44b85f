"""The one packer: structures -> a padded :class:`~molopt.batch.Batch` with host coordinates,
and the neighbour lists a potential needs for it. Relaxation, single-point evaluation and
implicit differentiation all pack through here; training packs its batches with the same
:func:`molopt.batch.pack` and fills their neighbour slots from pair lists it computes once
(its structures never move)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from molopt import constraints as cons
from molopt import neighbors as nl
from molopt import symmetry as sym
from molopt.batch import Batch, Layout, pack
from molopt.structure import Structure


def pack_structures(
    structures: Sequence[Structure], potential, dtype, layout: Layout | None = None
) -> tuple[Batch, np.ndarray, np.ndarray, Layout]:
    """(batch, positions (A, 3), cells (S, 3, 3), layout) with the species numbered as the
    potential numbers them; ``layout`` as :func:`molopt.batch.plan_layout` plans it unless
    given; the structures' constraints and kept symmetries go into the batch."""
    species: dict[int, int] = {}
    for st in structures:
        species.update(potential.species_of(st.numbers))
    batch, positions, cells, layout = pack(list(structures), species, dtype, layout)
    batch = dataclasses.replace(
        batch,
        constraints=_constraints(structures, layout, dtype),
        symmetry=sym.pack([s.symmetry for s in structures], layout, dtype),
    )
    return batch, positions, cells, layout


def _constraints(structures: Sequence[Structure], layout: Layout, dtype):
    """The batch's constraints beyond FixAtoms, or None when no structure has any (each
    structure's were checked when it was made)."""
    if not any(cons.needs_arrays(s.constraints) for s in structures):
        return None
    arrays = [cons.host_arrays(s.constraints, s.n_atoms, s.cell) for s in structures]
    return cons.pack(arrays, layout.offsets, layout.n_padded_atoms, layout.n_systems, dtype)


def neighbor_lists(
    positions,
    cells,
    pbc,
    layout: Layout,
    potential,
    skin: float,
    dtype,
    previous: nl.HostNeighbors | None = None,
    systems: np.ndarray | None = None,
    row_capacity: int = 0,
) -> nl.HostNeighbors:
    """Host neighbour lists for a packed batch at the potential's cutoff + ``skin`` (built in
    float64, reference geometry kept in ``dtype``); their ghost and row forms only for a
    potential that uses them. ``previous``/``systems``: rebuild only those systems' lists;
    ``row_capacity``: the least row capacity (:func:`molopt.neighbors.build`)."""
    host = nl.build(
        np.asarray(positions, np.float64),
        np.asarray(cells, np.float64),
        np.asarray(pbc),
        layout,
        potential.cutoff,
        skin,
        previous=previous,
        systems=systems,
        ghosts=getattr(potential, "uses_ghosts", False),
        row_width=getattr(potential, "row_width", 0),
        row_capacity=row_capacity,
    )
    host.ref_positions = host.ref_positions.astype(dtype)
    host.ref_cell = host.ref_cell.astype(dtype)
    return host
