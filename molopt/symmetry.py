"""Space-group symmetry kept through a relaxation, with ASE's ``FixSymmetry`` semantics.

Host side (numpy + spglib): :func:`dataset` (space group of a structure), :func:`refine`
(the structure moved onto its ideal space-group cell and positions, as ASE's
``refine_symmetry`` does when a ``FixSymmetry`` is made), :func:`operations` (the rotations and
translations in fractional coordinates and, per operation, where each atom goes) and
:func:`prepare` (refine, then the operations, on a :class:`~molopt.structure.Structure`).

Device side (pure JAX, batched): each system's operations padded to :data:`MAX_OPERATIONS`,
and the group averages ASE's ``symmetrize_rank1`` (forces, steps: in fractional coordinates,
each atom's vector rotated onto its image and averaged) and ``symmetrize_rank2`` (stress,
cell steps). Forces and stress are symmetrized where they are evaluated; atom steps in the
fractional coordinates of the reference cell (a step symmetrized in fractional coordinates is
the same whatever the cell, so a variable cell changes nothing); cell steps as ASE's
``adjust_cell`` symmetrizes the change of deformation gradient.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from molopt.errors import InputError
from molopt.linalg3 import inv3

#: ASE's FixSymmetry default precision (A).
DEFAULT_SYMPREC = 0.01
#: The largest crystallographic point group has 48 operations; more come from supercells
#: (pure translations), which the padding grows to fit.
MAX_OPERATIONS = 48


@dataclass(frozen=True)
class Symmetry:
    """Operations of one structure: ``rotations`` (n_ops, 3, 3) int and ``translations``
    (n_ops, 3) in fractional coordinates, ``image`` (n_ops, n): operation o takes atom i to
    atom ``image[o, i]``; the space group ``number`` and ``symbol`` at ``symprec`` (A)."""

    rotations: np.ndarray
    translations: np.ndarray
    image: np.ndarray
    number: int
    symbol: str
    symprec: float


def _spglib():
    import spglib

    return spglib


def _scaled(positions, cell, pbc, wrap: bool = True) -> np.ndarray:
    """Fractional coordinates as ASE computes them (wrapped into [0, 1) along periodic axes)."""
    fractional = np.linalg.solve(np.asarray(cell).T, np.asarray(positions).T).T
    if wrap:
        for axis in range(3):
            if pbc[axis]:
                fractional[:, axis] %= 1.0
                fractional[:, axis] %= 1.0  # a tiny negative number % 1 can round to 1.0
    return fractional


def _spglib_cell(structure) -> tuple:
    return (
        structure.cell,
        _scaled(structure.positions, structure.cell, structure.pbc),
        structure.numbers,
    )


def _call(function, *args, **kwargs):
    """A spglib call that raises on failure (older releases returned None)."""
    key = "SPGLIB_OLD_ERROR_HANDLING"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        value = function(*args, **kwargs)
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    if value is None:
        raise ValueError("spglib found no symmetry")
    return value


def dataset(structure, symprec: float = DEFAULT_SYMPREC):
    """spglib's symmetry dataset of ``structure`` (periodic in three directions)."""
    return _call(_spglib().get_symmetry_dataset, _spglib_cell(structure), symprec=symprec)


def space_group(structure, symprec: float = DEFAULT_SYMPREC) -> dict:
    """``{"symbol": "Fm-3m", "number": 225}`` of a periodic structure; None for a structure
    that is not periodic in three directions or where spglib finds no group."""
    if not np.all(structure.pbc):
        return None
    try:
        found = dataset(structure, symprec)
    except Exception:  # spglib's errors vary by release; no group is the answer
        return None
    return {"symbol": str(found.international), "number": int(found.number)}


def _with_cell(structure, cell):
    """``structure`` with ``cell``, atoms scaled with it (ASE's ``scale_atoms=True``)."""
    fractional = _scaled(structure.positions, structure.cell, structure.pbc, wrap=False)
    return structure.with_positions(fractional @ cell, cell)


def _ideal_cell(structure, symprec: float):
    """The structure on spglib's idealized standard cell, rotated back into the input's
    orientation and expressed in the input's (possibly non-standard) cell vectors."""
    found = dataset(structure, symprec)
    cell_rows = found.transformation_matrix.T @ found.std_lattice
    return _with_cell(structure, cell_rows @ found.std_rotation_matrix)


def _ideal_positions(structure, symprec: float):
    """Each atom moved onto the position of its standard-cell representative, shifted by the
    whole primitive-cell vectors that bring it nearest where it was."""
    found = dataset(structure, symprec)
    primitive_cell = _call(_spglib().find_primitive, _spglib_cell(structure), symprec=symprec)[0]
    rotation = found.std_rotation_matrix
    std_cartesian = found.std_positions @ (found.std_lattice @ rotation)
    to_primitive = list(found.mapping_to_primitive)
    std_to_primitive = list(found.std_mapping_to_primitive)
    positions = structure.positions.copy()
    origin_shift = positions[to_primitive.index(0)] - std_cartesian[std_to_primitive.index(0)]
    aligned = std_cartesian + origin_shift
    primitive = primitive_cell @ rotation
    inverse = np.linalg.inv(primitive)
    for i in range(structure.n_atoms):
        representative = aligned[std_to_primitive.index(to_primitive[i])]
        whole = np.round((representative - positions[i]) @ inverse)
        positions[i] = representative - whole @ primitive
    return structure.with_positions(positions)


def refine(structure, symprec: float = DEFAULT_SYMPREC):
    """``structure`` moved onto its ideal space-group geometry at ``symprec`` (cell first,
    then positions), as ``FixSymmetry`` does to the atoms it is made for."""
    return _ideal_positions(_ideal_cell(structure, symprec), symprec)


def operations(structure, symprec: float = DEFAULT_SYMPREC) -> Symmetry:
    """The space-group operations of ``structure`` and where each takes each atom (its
    nearest periodic image in fractional coordinates)."""
    found = dataset(structure, symprec)
    rotations = np.asarray(found.rotations, np.int64)
    translations = np.asarray(found.translations, np.float64)
    fractional = _scaled(structure.positions, structure.cell, structure.pbc)
    image = np.empty((len(rotations), structure.n_atoms), np.int64)
    for o, (rotation, translation) in enumerate(zip(rotations, translations, strict=True)):
        moved = fractional @ rotation.T + translation
        for i in range(structure.n_atoms):
            offset = fractional - moved[i]
            offset -= np.round(offset)
            image[o, i] = np.argmin(np.linalg.norm(offset, axis=1))
    return Symmetry(
        rotations, translations, image, int(found.number), str(found.international), symprec
    )


def prepare(structure, symprec: float = DEFAULT_SYMPREC, refine_first: bool = True):
    """``structure`` refined to its space group and carrying its operations (``symmetry``);
    :class:`InputError` naming it when it is not periodic or spglib finds no group."""
    if not np.all(structure.pbc):
        raise InputError(
            structure.source,
            "--fix-symmetry needs a structure periodic in all three directions",
            structure.index,
        )
    try:
        refined = refine(structure, symprec) if refine_first else structure
        symmetry = operations(refined, symprec)
    except Exception as exc:  # spglib failures come as several exception types
        raise InputError(
            structure.source,
            f"no space group found at symprec {symprec} ({type(exc).__name__}: {exc})",
            structure.index,
        ) from exc
    return replace(refined, symmetry=symmetry)


def symmetrized(structure, symprec: float = DEFAULT_SYMPREC):
    """``--symmetrize``: the structure refined to its space group (its other fields kept);
    ``structure`` itself where no group is found."""
    if not np.all(structure.pbc):
        return structure
    try:
        return refine(structure, symprec)
    except Exception:  # no group: nothing to refine to
        return structure


# --- device side ----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class BatchSymmetry:
    """A batch's operations, padded to O per system: ``rotations`` (S, O, 3, 3) fractional,
    ``valid`` (S, O) bool, ``n_operations`` (S,) (0 where a system keeps no symmetry),
    ``source`` (O, A) rows: operation o brings atom ``source[o, j]`` onto atom j (j itself for
    padding)."""

    rotations: jax.Array
    valid: jax.Array
    n_operations: jax.Array
    source: jax.Array


def pack(symmetries: Sequence[Symmetry | None], layout, dtype) -> BatchSymmetry | None:
    """The batch's padded operations; None when no structure keeps its symmetry."""
    if all(s is None for s in symmetries):
        return None
    A, S = layout.n_padded_atoms, layout.n_systems
    most = max(len(s.rotations) for s in symmetries if s is not None)
    slots = MAX_OPERATIONS if most <= MAX_OPERATIONS else 2 ** int(np.ceil(np.log2(most)))
    rotations = np.broadcast_to(np.eye(3, dtype=dtype), (S, slots, 3, 3)).copy()
    valid = np.zeros((S, slots), bool)
    n_operations = np.zeros(S, np.int32)
    source = np.broadcast_to(np.arange(A, dtype=np.int32), (slots, A)).copy()
    for k, s in enumerate(symmetries):
        if s is None:
            continue
        start = int(layout.offsets[k])
        n_ops = len(s.rotations)
        rotations[k, :n_ops] = s.rotations
        valid[k, :n_ops] = True
        n_operations[k] = n_ops
        for o in range(n_ops):
            source[o, start + s.image[o]] = start + np.arange(len(s.image[o]))
    put = jax.device_put
    return BatchSymmetry(put(rotations), put(valid), put(n_operations), put(source))


def symmetrize_vectors(bs: BatchSymmetry, vectors, cells, system_idx, n_systems: int):
    """Per-atom vectors (A, 3) (forces, steps; Cartesian, cells (S, 3, 3) rows) averaged over
    each system's operations (ASE's ``symmetrize_rank1``); unchanged in systems without."""
    system = jnp.minimum(system_idx, n_systems - 1)
    n_ops = bs.n_operations[system]
    keep = (n_ops > 0) & (system_idx < n_systems)
    cell = jnp.where(keep[:, None, None], cells[system], jnp.eye(3, dtype=vectors.dtype))
    fractional = jnp.einsum("ai,aij->aj", vectors, inv3(cell))
    gathered = fractional[bs.source]  # (O, A, 3): the vector of the atom each op brings here
    rotations = jnp.swapaxes(bs.rotations[system], 0, 1)  # (O, A, 3, 3)
    weight = jnp.swapaxes(bs.valid[system], 0, 1)[..., None]
    rotated = jnp.where(weight, jnp.einsum("oaij,oaj->oai", rotations, gathered), 0.0)
    average = jnp.sum(rotated, axis=0) / jnp.maximum(n_ops, 1)[:, None]
    out = jnp.einsum("ai,aij->aj", average, cell)
    return jnp.where(keep[:, None], out, vectors)


def symmetrize_tensors(bs: BatchSymmetry, tensors, cells):
    """Per-system rank-2 tensors (S, 3, 3) averaged over the operations (ASE's
    ``symmetrize_rank2``); unchanged in systems without."""
    keep = (bs.n_operations > 0)[:, None, None]
    cells = jnp.where(keep, cells, jnp.eye(3, dtype=tensors.dtype))
    scaled = cells @ tensors @ jnp.swapaxes(cells, 1, 2)
    scaled = jnp.broadcast_to(scaled[:, None], bs.rotations.shape)
    rotated = jnp.einsum("soji,sojk,sokl->soil", bs.rotations, scaled, bs.rotations)
    rotated = jnp.where(bs.valid[:, :, None, None], rotated, 0.0)
    average = jnp.sum(rotated, axis=1) / jnp.maximum(bs.n_operations, 1)[:, None, None]
    inverse = inv3(cells)
    out = inverse @ average @ jnp.swapaxes(inverse, 1, 2)
    return jnp.where(keep, out, tensors)
