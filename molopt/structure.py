"""One atomic structure on the host, validated, in ASE's conventions.

Units: positions and cell in Angstrom; the cell holds lattice vectors as rows (ASE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from molopt.errors import InputError

#: Two atoms closer than this (Angstrom) are "on top of each other": no physical bond is
#: this short (H2 is 0.74 A), and a pair potential would give near-infinite forces.
MIN_SEPARATION = 0.3


@dataclass(frozen=True)
class Structure:
    """A single system: ``numbers`` (n,), ``positions`` (n, 3) A, ``cell`` (3, 3) A rows,
    ``pbc`` (3,) bool, ``fixed`` (n,) bool (ASE FixAtoms), and where it came from.

    ``constraints``: every ASE constraint in ASE's order, as :mod:`molopt.constraints`
    describes them (FixAtoms included; empty when ``fixed`` says all there is).
    ``symmetry``: the space-group operations kept during the relaxation
    (:class:`molopt.symmetry.Symmetry`), or None."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    fixed: np.ndarray
    source: str = "<memory>"
    index: int | None = None
    info: dict = field(default_factory=dict)
    #: the input's other per-atom arrays (tags, masses, charges, magnetic moments, ...), kept
    #: as they are and written back into the outputs
    arrays: dict = field(default_factory=dict)
    constraints: tuple = ()
    symmetry: Any = None
    #: this structure's own cell options with a variable cell
    #: (:class:`molopt.optimizers.cell_options.CellOptions`), or None for the run's
    cell_options: Any = None

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.cell)))

    def with_positions(self, positions: np.ndarray, cell: np.ndarray | None = None) -> Structure:
        return Structure(
            numbers=self.numbers,
            positions=np.asarray(positions, dtype=np.float64),
            cell=self.cell if cell is None else np.asarray(cell, dtype=np.float64),
            pbc=self.pbc,
            fixed=self.fixed,
            source=self.source,
            index=self.index,
            info=self.info,
            arrays=self.arrays,
            constraints=self.constraints,
            symmetry=self.symmetry,
            cell_options=self.cell_options,
        )


def make_structure(
    numbers,
    positions,
    cell=None,
    pbc=False,
    fixed=None,
    source: str = "<memory>",
    index: int | None = None,
    info: dict | None = None,
    arrays: dict | None = None,
) -> Structure:
    """Build and validate a :class:`Structure` (raises :class:`InputError` naming ``source``)."""
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    n = numbers.shape[0]
    try:
        positions = np.asarray(positions, dtype=np.float64).reshape(n, 3)
    except ValueError as exc:
        raise InputError(source, f"positions do not have shape ({n}, 3)", index) from exc
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    fixed = np.zeros(n, bool) if fixed is None else np.asarray(fixed, dtype=bool).reshape(n)
    extra = {}
    for name, values in (arrays or {}).items():
        values = np.asarray(values)
        if values.shape[:1] != (n,):
            raise InputError(
                source, f"per-atom array {name!r} has {len(values)} rows, not {n}", index
            )
        extra[name] = values
    structure = Structure(
        numbers, positions, cell, pbc, fixed, source, index, dict(info or {}), extra
    )
    validate(structure)
    return structure


def validate(structure: Structure) -> None:
    """Reject structures that cannot be relaxed, with the reason; cheap and O(n)."""
    src, idx = structure.source, structure.index
    if structure.n_atoms == 0:
        raise InputError(src, "contains no atoms", idx)
    if np.any(structure.numbers <= 0) or np.any(structure.numbers > 118):
        bad = sorted(set(int(z) for z in structure.numbers if z <= 0 or z > 118))
        raise InputError(src, f"invalid atomic numbers {bad}", idx)
    if not np.all(np.isfinite(structure.positions)):
        rows = np.where(~np.all(np.isfinite(structure.positions), axis=1))[0]
        raise InputError(src, f"non-finite (NaN/inf) coordinates on atom(s) {_few(rows)}", idx)
    if not np.all(np.isfinite(structure.cell)):
        raise InputError(src, "non-finite (NaN/inf) cell", idx)
    if structure.pbc.any():
        periodic_vectors = structure.cell[structure.pbc]
        lengths = np.linalg.norm(periodic_vectors, axis=1)
        if np.any(lengths < 1e-6):
            raise InputError(src, "periodic along an axis whose cell vector is zero", idx)
        if structure.pbc.all() and structure.volume < 1e-6:
            raise InputError(src, "periodic cell has zero volume", idx)
    _check_separation(structure)


def _few(indices, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in list(indices)[:limit])
    return shown + (", ..." if len(indices) > limit else "")


def _check_separation(structure: Structure) -> None:
    """Fail on atoms closer than MIN_SEPARATION (periodic images included)."""
    n = structure.n_atoms
    if n < 2 and not structure.pbc.any():
        return
    if not structure.pbc.any() and n <= 512:
        diff = structure.positions[:, None, :] - structure.positions[None, :, :]
        d2 = np.einsum("ijk,ijk->ij", diff, diff)
        d2[np.diag_indices(n)] = np.inf
        k = int(np.argmin(d2))
        i, j, d = k // n, k % n, float(np.sqrt(d2.flat[k]))
    else:
        from ._vesin import neighbor_list

        box = structure.cell if structure.pbc.any() else np.zeros((3, 3))
        # a cell-list search at a tiny cutoff makes a huge grid of cells: search at 3 A and
        # keep the closest pair
        ii, jj, dd = neighbor_list(cutoff=3.0, full_list=False).compute(
            structure.positions, box, structure.pbc, "ijd"
        )
        if not len(ii):
            return
        k = int(np.argmin(dd))
        i, j, d = int(ii[k]), int(jj[k]), float(dd[k])
    if d < MIN_SEPARATION:
        raise InputError(
            structure.source,
            f"atoms {min(i, j)} and {max(i, j)} are on top of each other "
            f"({d:.3f} A apart; minimum {MIN_SEPARATION} A)",
            structure.index,
        )
