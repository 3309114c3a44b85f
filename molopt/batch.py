"""The flat padded batch: many structures as one static-shape pytree.

All atoms of all systems are concatenated into ``A`` rows (padded to a bucket size), with a
per-atom ``system_idx``; per-system arrays have ``S`` rows (padded too). Padding atoms carry
``system_idx == S`` so every segment reduction drops them, and ``atom_mask == False``.
Sizes are rounded up a small geometric ladder so that a new mix of sizes reuses a compiled
computation instead of tracing a new one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from molopt._jax import jax
from molopt.structure import Structure

#: Above this many atoms the ladder has eight rungs per octave instead of two.
FINE_LADDER_ATOMS = 4096


def bucket(n: int, minimum: int = 8, fine: bool = False) -> int:
    """Round ``n`` up the ladder minimum, ..., 2^k, 1.5*2^k, 2^(k+1), ... (padding <= 50%).

    With ``fine``, past ``FINE_LADDER_ATOMS`` the rungs are 2^k (1 + j/8) (padding <= 12.5%):
    the padded atoms cost time every step, and one more compilation is cheap beside it
    (100,920 atoms pad to 106,496 instead of 131,072). Batches use it too
    (:func:`plan_layout`): a batch keeps its shape until the engine repacks it, and it
    repacks only when that pays for a new start (:func:`molopt.engine.policy.should_repack`),
    so the finer ladder adds no compilations there."""
    n = max(int(n), 1)
    if n <= minimum:
        return minimum
    power = 2 ** math.floor(math.log2(n))
    if fine and n > FINE_LADDER_ATOMS:
        return power + -(-(n - power) // (power // 8)) * (power // 8)
    for candidate in (power, 3 * power // 2, 2 * power):
        if candidate >= n:
            return candidate
    return 2 * power  # pragma: no cover


def bucket_systems(n: int) -> int:
    """Number-of-systems ladder: powers of two (per-system arrays are cheap)."""
    return 1 if n <= 1 else 2 ** math.ceil(math.log2(n))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    """Static description of a padded batch (everything but the moving coordinates).

    Arrays: ``species`` (A,) int32 index into the potential's element table; ``numbers``
    (A,) atomic numbers (0 for padding); ``system_idx`` (A,) int32 in [0, S] (S = padding);
    ``atom_mask`` (A,) bool; ``fixed`` (A,) bool (ASE FixAtoms); ``pbc`` (S, 3) bool;
    ``system_mask`` (S,) bool; ``n_atoms`` (S,) int32. ``constraints``: the constraints
    beyond FixAtoms (:class:`molopt.constraints.Constraints`), ``symmetry``: the space-group
    operations kept (:class:`molopt.symmetry.BatchSymmetry`); None where no system has any
    (:func:`molopt.engine.packing.pack_structures` fills them).
    """

    species: jax.Array
    numbers: jax.Array
    system_idx: jax.Array
    atom_mask: jax.Array
    fixed: jax.Array
    pbc: jax.Array
    system_mask: jax.Array
    n_atoms: jax.Array
    n_systems: int = dataclasses.field(metadata=dict(static=True), default=1)
    constraints: Any = None
    symmetry: Any = None

    @property
    def n_padded_atoms(self) -> int:
        return int(self.species.shape[0])


# --- segment reductions over systems (static number of systems) -------------------------


#: On an accelerator, per-system sums and maxima over batches of up to this many (systems x
#: rows) are masked reductions over a (systems, rows) membership mask instead of segment
#: reductions: XLA:GPU lowers those to scatters with atomic updates, and with one system every
#: row updates the same element (`python bench/reductions_ab.py` compares the two forms on a
#: GPU). Larger batches keep the segment form (the one-hot mask grows as S x R).
DENSE_REDUCTION_MAX = 1 << 24


def _dense_reductions(n_rows: int, n_systems: int) -> bool:
    """Whether per-system reductions are one-hot contractions (static: shapes and backend)."""
    return jax.default_backend() != "cpu" and n_rows * n_systems <= DENSE_REDUCTION_MAX


def _membership(system_idx: jax.Array, n_systems: int, ndim: int = 1) -> jax.Array:
    """(S, R, 1, ...) bool (``ndim`` - 1 trailing ones, to broadcast against per-row values
    of ``ndim`` dimensions): row r belongs to system s (rows with index S belong to none)."""
    member = system_idx[None, :] == jnp.arange(n_systems, dtype=system_idx.dtype)[:, None]
    return member.reshape(member.shape + (1,) * (ndim - 1))


def system_sum(values: jax.Array, system_idx: jax.Array, n_systems: int) -> jax.Array:
    """Sum per-row values (R, ...) into (S, ...); rows with index S are dropped.

    On CPU always a segment sum (never a tree reduction, even for one system): each system's
    sum then has the same rounding whatever else is in the batch, so a structure relaxed in a
    batch follows bit for bit the path it follows alone. On an accelerator (see
    :data:`DENSE_REDUCTION_MAX`) a masked reduction: the same sums to rounding (the order of
    a GPU's atomic additions was not fixed either)."""
    if _dense_reductions(values.shape[0], n_systems):
        # a select, not a product with 0/1: 0 * NaN would spread one system's NaN to all
        # (and a dot could run in TF32 on a GPU)
        member = _membership(system_idx, n_systems, values.ndim)
        return jnp.sum(jnp.where(member, values[None], jnp.zeros((), values.dtype)), axis=1)
    return jax.ops.segment_sum(values, system_idx, num_segments=n_systems, indices_are_sorted=False)


def system_max(values: jax.Array, system_idx: jax.Array, n_systems: int, empty=0.0) -> jax.Array:
    """Max of per-row values (R, ...) per system; ``empty`` where a system has no rows."""
    if _dense_reductions(values.shape[0], n_systems):
        if jnp.issubdtype(values.dtype, jnp.floating):
            lowest = jnp.array(-jnp.inf, values.dtype)
        else:
            lowest = jnp.array(jnp.iinfo(values.dtype).min, values.dtype)
        member = _membership(system_idx, n_systems, values.ndim)
        out = jnp.max(jnp.where(member, values[None], lowest), axis=1)
    else:
        out = jax.ops.segment_max(values, system_idx, num_segments=n_systems)
    return jnp.maximum(out, empty)


# --- host-side packing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each structure of a batch lives: atom offsets, padded sizes (host-only)."""

    offsets: np.ndarray  # (n_real + 1,) atom offsets
    n_padded_atoms: int
    n_systems: int  # padded S

    @property
    def n_real(self) -> int:
        return len(self.offsets) - 1

    def atoms_of(self, k: int) -> slice:
        return slice(int(self.offsets[k]), int(self.offsets[k + 1]))


def plan_layout(sizes: Sequence[int], min_atoms: int = 8) -> Layout:
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
    n_atoms = int(offsets[-1])
    return Layout(offsets, bucket(n_atoms, min_atoms, fine=True), bucket_systems(len(sizes)))


def pack(
    structures: Sequence[Structure],
    species_of: dict[int, int],
    dtype,
    layout: Layout | None = None,
) -> tuple[Batch, np.ndarray, np.ndarray, Layout]:
    """Pack structures into a :class:`Batch` plus padded ``positions`` (A, 3) and ``cells``
    (S, 3, 3) as numpy arrays of ``dtype``. ``species_of`` maps atomic number -> index."""
    layout = layout or plan_layout([s.n_atoms for s in structures])
    A, S = layout.n_padded_atoms, layout.n_systems
    positions = np.zeros((A, 3), dtype)
    cells = np.zeros((S, 3, 3), dtype)
    species = np.zeros(A, np.int32)
    numbers = np.zeros(A, np.int32)
    system_idx = np.full(A, S, np.int32)
    atom_mask = np.zeros(A, bool)
    fixed = np.zeros(A, bool)
    pbc = np.zeros((S, 3), bool)
    system_mask = np.zeros(S, bool)
    n_atoms = np.zeros(S, np.int32)
    for k, s in enumerate(structures):
        rows = layout.atoms_of(k)
        positions[rows] = s.positions
        species[rows] = [species_of[int(z)] for z in s.numbers]
        numbers[rows] = s.numbers
        system_idx[rows] = k
        atom_mask[rows] = True
        fixed[rows] = s.fixed
        cells[k] = s.cell
        pbc[k] = s.pbc
        system_mask[k] = True
        n_atoms[k] = s.n_atoms
    batch = Batch(
        species=jax.device_put(species),
        numbers=jax.device_put(numbers),
        system_idx=jax.device_put(system_idx),
        atom_mask=jax.device_put(atom_mask),
        fixed=jax.device_put(fixed),
        pbc=jax.device_put(pbc),
        system_mask=jax.device_put(system_mask),
        n_atoms=jax.device_put(n_atoms),
        n_systems=S,
    )
    return batch, positions, cells, layout
