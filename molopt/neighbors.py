"""Neighbour lists: built on the host (linear-scaling cell lists from vesin), used in jit.

Layout: a dense list of fixed capacity K per atom, stored neighbour-slot-major: ``index``
(K, A) into the flat batch and ``shift`` (3, K, A) integer periodic images, so the pair vector
is ``positions[index] - positions[i] + shift . cell`` with each Cartesian component a (K, A)
array (vectorizes along atoms on CPU, faster than (A, K, 3)). It is a *full*
list (each pair appears from both ends): forces then need only a reduction over K, no
scatter-add.

Beside it, the same list through *ghost atoms* (as LAMMPS builds them): every periodic image
(j, S) that some atom lists becomes a ghost, an extra row of an extended position array
rebuilt each step from its source atom (:func:`extended_positions`), and ``ext_index`` (K, A)
indexes that array directly (an empty slot keeps the plain list's entry: the atom itself,
masked out like there). A pair
term then gathers from one array with no image arithmetic and streams no image shifts, which
halves the Lennard-Jones force call of large crystals (measurements: bench/RESULTS.md). The
mask is still ANDed into the cutoff test, which XLA:CPU compiles to a faster loop. The
plain fields stay the interface for every other potential.

Third, the *row form*, for potentials whose per-pair work is large (message passing, where
each pair costs a radial network): each atom's listed pairs packed into rows of W slots
(``row_index``/``row_shift``/``row_mask`` (W, R), ``row_atom`` (R,) the atom each row
belongs to, rows of one atom consecutive). The dense list pads every atom to the most
crowded atom's count; a batch of mixed crystals lists 2-3x more slots than pairs. Rows pad
each atom only to a multiple of W: a per-pair term is evaluated on (W, R) arrays, summed
over W, and the rows' sums added into their atoms (:func:`sum_rows`).

The list is built with ``cutoff + skin`` and stays valid until some pair could have crossed
the cutoff; :func:`stale_systems` is the jittable test (Verlet 1967), exact for any cell
deformation. Small non-periodic systems get every pair (``complete``) and never go stale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from molopt._jax import jax
from molopt.batch import Layout, system_max
from molopt.linalg3 import inv3

#: Non-periodic systems up to this many atoms list all pairs (no rebuilds, ever).
ALL_PAIRS_MAX_ATOMS = 96


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Neighbors:
    """``index`` (K, A) int32; ``shift`` (3, K, A) integer images (int8/int32; shape (0, K, A)
    when no system is periodic); ``mask`` (K, A) bool; ``ref_positions`` (A, 3) and
    ``ref_cell`` (S, 3, 3) at build time (A); ``complete`` (S,) bool (all pairs listed, never
    stale); ``cutoff``/``skin`` scalars (A). The ghost form of the same list (module
    docstring; None when not built): ``ext_index`` (K, A) int32 into
    :func:`extended_positions`, ``ghost_source`` (G,) int32 and ``ghost_shift`` (3, G)
    integer images of the ghosts (G a capacity: unused ghosts copy atom 0)."""

    index: jax.Array
    shift: jax.Array
    mask: jax.Array
    ref_positions: jax.Array
    ref_cell: jax.Array
    complete: jax.Array
    cutoff: jax.Array
    skin: jax.Array
    ext_index: jax.Array | None = None
    ghost_source: jax.Array | None = None
    ghost_shift: jax.Array | None = None
    row_atom: jax.Array | None = None
    row_index: jax.Array | None = None
    row_shift: jax.Array | None = None
    row_mask: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return int(self.index.shape[0])


def row_vectors(positions: jax.Array, cell: jax.Array, system_idx: jax.Array, nbrs: Neighbors):
    """Components (dx, dy, dz), each (W, R), of r_j - r_i (+ image shift) for the row form:
    i the row's atom, j its listed neighbours. Differentiable in ``positions`` and ``cell``."""
    return _vectors(positions, cell, system_idx, nbrs.row_atom, nbrs.row_index, nbrs.row_shift)


#: Rows a block of :func:`sum_row_blocks` takes at most: 64 rows of 8 slots keep a message-
#: passing block's temporaries at ~20 MB (float64) however large the batch, and were as fast
#: as larger blocks or groups of slots on a batch of small crystals.
ROW_BLOCK = 64


def skips_empty_blocks() -> bool:
    """Whether :func:`sum_row_blocks` leaves out the blocks with no listed slot: on a CPU,
    where a conditional costs nothing. XLA:GPU reads a conditional's predicate back on the
    host, a wait per block, and that has not been measured: a GPU evaluates every block."""
    return jax.default_backend() == "cpu"


def sum_row_blocks(fn, parts, nbrs: Neighbors, n_atoms: int, block: int = ROW_BLOCK):
    """Per-atom sums (a pytree of (A, ...) arrays) of ``fn(*block_parts)``, which returns
    per-row sums (b, ...) for the b rows of the (W, b, ...) blocks of ``parts`` ((W, R, ...)
    arrays) it is given, added into the rows' atoms. Blocks of the largest divisor of R up
    to ``block`` rows, in a ``lax.scan`` that adds each block into the per-atom sums in
    place; its body is ``jax.checkpoint``ed (temporaries rebuilt in the backward pass).
    Neither the temporaries nor per-row sums ever exist for all rows at once.

    A block none of whose slots is listed (``row_mask``) is not evaluated at all, forwards
    or backwards, where :func:`skips_empty_blocks`: ``fn`` must give zero sums for empty
    slots. Padding rows, and the rows of systems a relaxation has finished with
    (:func:`only_systems`), then cost nothing."""
    W, R = parts[0].shape[:2]
    b = max(d for d in range(1, min(block, R) + 1) if R % d == 0)
    if b >= R:
        return sum_rows(fn(*parts), nbrs, n_atoms)
    blocks = tuple(
        jnp.moveaxis(a.reshape((a.shape[0], R // b, b) + a.shape[2:]), 1, 0) for a in parts
    )
    live = jnp.any(nbrs.row_mask.reshape(W, R // b, b), axis=(0, 2))
    step = jax.checkpoint(fn)
    shapes = jax.eval_shape(fn, *(a[0] for a in blocks))
    skip = skips_empty_blocks()

    def empty(*_):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

    def body(total, chunk):
        atoms, listed, block_parts = chunk
        out = jax.lax.cond(listed, step, empty, *block_parts) if skip else step(*block_parts)
        return jax.tree.map(lambda t, o: t.at[atoms].add(o), total, out), None

    zeros = jax.tree.map(lambda x: jnp.zeros((n_atoms,) + x.shape[1:], x.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (nbrs.row_atom.reshape(R // b, b), live, blocks))
    return total


def only_systems(nbrs: Neighbors, keep: jax.Array, system_idx: jax.Array) -> Neighbors:
    """The row-form lists with the rows of systems outside ``keep`` ((S,) bool) unlisted:
    a potential that sums rows in blocks (:func:`sum_row_blocks`) skips them, and gives
    those systems' atoms no neighbours. The kept systems' results are unchanged (lists never
    cross systems). Dense lists are returned as they are."""
    if nbrs.row_mask is None:
        return nbrs
    atom_kept = keep[jnp.minimum(system_idx, keep.shape[0] - 1)]
    return replace(nbrs, row_mask=nbrs.row_mask & atom_kept[nbrs.row_atom][None, :])


def sum_rows(values, nbrs: Neighbors, n_atoms: int):
    """Per-row sums (a pytree of (R, ...) arrays) added into their atoms: (A, ...). Rows of
    one atom are consecutive and padding rows belong to the last atom (and sum to zero)."""
    return jax.tree.map(
        lambda v: jax.ops.segment_sum(v, nbrs.row_atom, n_atoms, indices_are_sorted=True), values
    )


def extended_positions(positions, cell, system_idx, nbrs: Neighbors) -> jax.Array:
    """(A + G, 3): the atoms, then the ghosts (source position + image shift . cell of the
    source's system). Differentiable in ``positions`` and ``cell``.
    Materialized (an optimization barrier): fused into the per-pair gathers, XLA:CPU would
    evaluate the concatenation once per pair."""
    source = nbrs.ghost_source
    images = nbrs.ghost_shift.astype(positions.dtype)  # (3, G)
    # multiply-adds, not a matrix product: a GPU may run float32 products in TF32
    if cell.shape[0] == 1:
        rows = [cell[0, k][None, :] for k in range(3)]
    else:
        cell_of = cell[jnp.minimum(system_idx[source], cell.shape[0] - 1)]  # (G, 3, 3)
        rows = [cell_of[:, k, :] for k in range(3)]
    offsets = images[0][:, None] * rows[0] + images[1][:, None] * rows[1]
    offsets = offsets + images[2][:, None] * rows[2]
    extended = jnp.concatenate([positions, positions[source] + offsets], axis=0)
    return jax.lax.optimization_barrier(extended)


def pair_vectors(positions: jax.Array, cell: jax.Array, system_idx: jax.Array, nbrs: Neighbors):
    """Components (dx, dy, dz), each (K, A), of r_j - r_i (+ image shift) to each listed
    neighbour j of atom i, Angstrom. Differentiable in ``positions`` and ``cell``."""
    return _vectors(positions, cell, system_idx, None, nbrs.index, nbrs.shift)


def _vectors(positions, cell, system_idx, center, index, shift):
    """(dx, dy, dz) from the atoms ``center`` (N,) (None: every atom in order) to
    ``index`` (K, N) plus the integer images ``shift`` (3, K, N) (or (0, K, N)) of each
    center's system cell."""
    components = []
    periodic = shift.shape[0] == 3
    if periodic:
        shifts = [shift[k].astype(positions.dtype) for k in range(3)]
        if cell.shape[0] == 1:
            cell_rows = [[cell[0, k, c] for k in range(3)] for c in range(3)]
        else:
            systems = system_idx if center is None else system_idx[center]
            cell_of = cell[jnp.minimum(systems, cell.shape[0] - 1)]  # (N, 3, 3)
            cell_rows = [[cell_of[None, :, k, c] for k in range(3)] for c in range(3)]
    for c in range(3):
        column = positions[:, c]
        origin = column if center is None else column[center]
        d = column[index] - origin[None, :]
        if periodic:
            rows = cell_rows[c]
            d = d + shifts[0] * rows[0] + shifts[1] * rows[1] + shifts[2] * rows[2]
        components.append(d)
    return tuple(components)


def l2_cache_bytes(
    default: int = 1 << 20, base: Path = Path("/sys/devices/system/cpu/cpu0/cache")
) -> int:
    """Per-core L2 cache size of this machine (Linux sysfs), or ``default``."""
    try:
        for entry in sorted(base.glob("index*")):
            if (entry / "level").read_text().strip() != "2":
                continue
            if (entry / "type").read_text().strip() not in ("Unified", "Data"):
                continue
            text = (entry / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return default


#: On CPU, pair terms over more than this many bytes per (K, A) array are summed over groups of
#: neighbour slots in a loop (:func:`sum_over_slots`) instead of all at once. XLA:CPU gives
#: each intermediate (K, A) array its own buffer (and hoists the periodic-image products out of
#: the relaxation loop as nine more), so memory traffic grows with K x A x ~20 x 8 bytes; in
#: groups it grows with g x A and stays in cache (`python bench/slot_groups.py` measures the
#: group sizes on a machine).
SLOT_GROUP_ABOVE_BYTES = 4 << 20
#: ... and each group's (g, A) arrays are kept under this size: half the L2 cache.
SLOT_GROUP_BYTES = max(128 << 10, min(l2_cache_bytes() // 2, 2 << 20))
#: ... but pair sums take at least this many slots a group: past 65,536 atoms the budget
#: would give one, and a scan step per slot costs more than the cache it saves.
SLOT_GROUP_MIN = 2


def slot_group(capacity: int, n_atoms: int, itemsize: int, minimum: int = 1) -> int:
    """Neighbour slots per group for :func:`sum_over_slots`; ``capacity`` (all at once) off
    CPU or when the (K, A) arrays are small. A divisor of ``capacity``, at least ``minimum``
    when ``minimum`` divides it (capacities are multiples of 8). Static (shapes only). For
    per-slot arrays wider than one number per atom pass ``n_atoms`` x width."""
    row = max(1, n_atoms * itemsize)
    if jax.default_backend() != "cpu" or capacity * row <= SLOT_GROUP_ABOVE_BYTES:
        return capacity
    target = max(minimum, SLOT_GROUP_BYTES // row)
    return max(d for d in range(1, min(target, capacity) + 1) if capacity % d == 0)


def sum_over_groups(fn, parts, group: int, recompute: bool = False):
    """``fn(*chunk)`` summed over chunks of ``group`` rows along the leading axis K of every
    array in ``parts`` (``group`` a divisor of K); ``fn`` returns a pytree of sums over the rows
    it is given. One call when ``group >= K``, else a ``lax.scan`` from zeros shaped like
    ``fn``'s output (one copy of ``fn`` in the compiled program). ``recompute``: the body is
    ``jax.checkpoint``ed, so its temporaries are rebuilt in the backward pass instead of K of
    them being stored."""
    K = parts[0].shape[0]
    if group >= K:
        return fn(*parts)
    chunks = tuple(a.reshape((K // group, group) + a.shape[1:]) for a in parts)
    step = jax.checkpoint(fn) if recompute else fn

    def body(total, chunk):
        return jax.tree.map(jnp.add, total, step(*chunk)), None

    shapes = jax.eval_shape(fn, *(a[0] for a in chunks))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, chunks)
    return total


def sum_over_slots(fn, nbrs: Neighbors, dtype):
    """``fn(part)`` summed over groups ``part`` of the neighbour slots of ``nbrs`` (each a
    :class:`Neighbors` with the same fields and g <= K slots); ``fn`` returns a pytree of
    per-atom sums over the slots it is given. One call when the list is small or off CPU, a
    ``lax.scan`` over groups otherwise, so the (g, A) temporaries stay in cache."""
    K, A = nbrs.index.shape
    g = slot_group(K, A, np.dtype(dtype).itemsize, minimum=SLOT_GROUP_MIN)
    if g == K:
        return fn(nbrs)

    def part(index, shift, mask):  # shift arrives slot-major: (g, 3, A)
        return fn(replace(nbrs, index=index, shift=jnp.moveaxis(shift, 0, 1), mask=mask))

    return sum_over_groups(part, (nbrs.index, jnp.moveaxis(nbrs.shift, 1, 0), nbrs.mask), g)


def stale_systems(
    positions: jax.Array,
    cell: jax.Array,
    system_idx: jax.Array,
    system_mask: jax.Array,
    nbrs: Neighbors,
    variable_cell: bool,
) -> jax.Array:
    """(S,) bool: systems whose list may miss a pair now inside the cutoff.

    With a deformation D (cell = ref_cell @ D) a listed pair moves by at most
    2 max|delta_i| + (cutoff + skin) ||D - 1||, delta_i the non-affine displacement.
    """
    n_systems = cell.shape[0]
    ref = nbrs.ref_positions
    if variable_cell:
        deformation = inv3(nbrs.ref_cell) @ cell  # (S, 3, 3)
        d_atom = deformation[jnp.minimum(system_idx, n_systems - 1)]
        delta = positions - jnp.einsum("ax,axy->ay", ref, d_atom)
        eye = jnp.eye(3, dtype=cell.dtype)
        strain = jnp.sqrt(jnp.sum((deformation - eye) ** 2, axis=(1, 2)))
    else:
        delta = positions - ref
        strain = jnp.zeros(n_systems, positions.dtype)
    moved = system_max(jnp.sqrt(jnp.sum(delta**2, axis=1)), system_idx, n_systems)
    bound = 2.0 * moved + (nbrs.cutoff + nbrs.skin) * strain
    # a NaN bound (an exploded system) is not "stale": that system fails on its own
    return (bound > nbrs.skin) & ~nbrs.complete & system_mask


# --- host side ------------------------------------------------------------------------------


@dataclass
class HostNeighbors:
    """numpy mirror of :class:`Neighbors`, kept on the host for partial rebuilds."""

    index: np.ndarray
    shift: np.ndarray
    mask: np.ndarray
    ref_positions: np.ndarray
    ref_cell: np.ndarray
    complete: np.ndarray
    cutoff: float
    skin: float
    ext_index: np.ndarray | None = None
    ghost_source: np.ndarray | None = None
    ghost_shift: np.ndarray | None = None
    row_atom: np.ndarray | None = None
    row_index: np.ndarray | None = None
    row_shift: np.ndarray | None = None
    row_mask: np.ndarray | None = None

    @property
    def capacity(self) -> int:
        return int(self.index.shape[0])

    @property
    def shapes(self) -> tuple[int, int, int]:
        """What a new compiled program depends on: slot, ghost and row capacities. With the
        row form the dense slots stay on the host (:meth:`to_device`): their capacity is 0
        here, so batches that differ only in it share a program."""
        ghosts = 0 if self.ghost_source is None else int(self.ghost_source.shape[0])
        rows = 0 if self.row_atom is None else int(self.row_atom.shape[0])
        return (0 if rows else self.capacity), ghosts, rows

    def with_rows(self, capacity: int) -> HostNeighbors:
        """These lists with their row form padded to ``capacity`` rows (at least its own):
        what :func:`build` with ``row_capacity=capacity`` gives, without listing the pairs
        again. Padding rows belong to the last atom and hold no pair."""
        have = int(self.row_atom.shape[0])
        if capacity <= have:
            return self
        extra = capacity - have
        filler = max(self.index.shape[1] - 1, 0)
        width = self.row_index.shape[0]
        return replace(
            self,
            row_atom=np.concatenate([self.row_atom, np.full(extra, filler, np.int32)]),
            row_index=np.concatenate(
                [self.row_index, np.full((width, extra), filler, np.int32)], axis=1
            ),
            row_mask=np.concatenate([self.row_mask, np.zeros((width, extra), bool)], axis=1),
            row_shift=np.concatenate(
                [
                    self.row_shift,
                    np.zeros(self.row_shift.shape[:2] + (extra,), self.row_shift.dtype),
                ],
                axis=2,
            ),
        )

    def to_device(self) -> Neighbors:
        dtype = self.ref_positions.dtype
        ghosts = {}
        if self.ext_index is not None:
            ghosts = dict(
                ext_index=jax.device_put(self.ext_index),
                ghost_source=jax.device_put(self.ghost_source),
                ghost_shift=jax.device_put(self.ghost_shift),
            )
        index, shift, mask = self.index, self.shift, self.mask
        if self.row_atom is not None:
            ghosts.update(
                row_atom=jax.device_put(self.row_atom),
                row_index=jax.device_put(self.row_index),
                row_shift=jax.device_put(self.row_shift),
                row_mask=jax.device_put(self.row_mask),
            )
            # a potential given rows reads only them: the dense slots stay on the host (their
            # capacity would otherwise make a new program of batches with the same rows)
            index, shift, mask = index[:0], shift[:, :0], mask[:0]
        return Neighbors(
            index=jax.device_put(index),
            shift=jax.device_put(shift),
            mask=jax.device_put(mask),
            ref_positions=jax.device_put(self.ref_positions),
            ref_cell=jax.device_put(self.ref_cell),
            complete=jax.device_put(self.complete),
            cutoff=jax.device_put(np.asarray(self.cutoff, dtype)),
            skin=jax.device_put(np.asarray(self.skin, dtype)),
            **ghosts,
        )


def _ghost_capacity(count: int, previous: int = 0) -> int:
    """Ghost capacity for ``count`` ghosts: the previous one while it suffices (no new
    program), else 10% headroom rounded up to a multiple of 256."""
    if count <= previous:
        return previous
    return -(-int(np.ceil(count * 1.1)) // 256) * 256 if count else 0


#: Above this many (atom, image) cells the ghosts are numbered by sorting instead of a table.
_GHOST_TABLE_MAX = 1 << 26


def ghost_tables(index, shift, mask, previous_capacity: int = 0):
    """The ghost form (:class:`Neighbors`) of a host list: ``index``/``mask`` (K, A),
    ``shift`` (3, K, A) (or (0, K, A)). Returns ``ext_index`` (K, A) int32, ``ghost_source``
    (G,) int32, ``ghost_shift`` (3, G) with G = :func:`_ghost_capacity`; ghosts are numbered
    in (atom, image) order; every other slot keeps its ``index``."""
    K, A = index.shape
    if shift.shape[0]:
        imaged = mask & np.any(shift != 0, axis=0)
        images = shift[:, imaged].astype(np.int64)  # (3, P)
    else:  # no periodic system
        imaged, images = np.zeros_like(mask), np.zeros((3, 0), np.int64)
    j = index[imaged].astype(np.int64)
    reach = int(np.abs(images).max()) if images.size else 0
    width = 2 * reach + 1
    codes = width**3
    key = j * codes + ((images[0] + reach) * width + images[1] + reach) * width + images[2] + reach
    if A * codes <= _GHOST_TABLE_MAX:  # a table over (atom, image): no sort
        used = np.zeros(A * codes, bool)
        used[key] = True
        keys = np.flatnonzero(used)
        number = np.cumsum(used, dtype=np.int32) - 1
        ghost_of_pair = number[key]
    else:
        keys, ghost_of_pair = np.unique(key, return_inverse=True)
    count = len(keys)
    # a periodic batch gets room for ghosts from the start: a box with vacuum that lists no
    # image at first would otherwise need a new program at its first image
    capacity = _ghost_capacity(count, previous_capacity)
    if shift.shape[0]:
        capacity = max(capacity, 256)
    source = np.zeros(capacity, np.int32)
    source[:count] = keys // codes
    image_code = keys % codes
    ghost_shift = np.zeros((3, capacity), shift.dtype if shift.shape[0] else np.int8)
    ghost_shift[0, :count] = image_code // (width * width) - reach
    ghost_shift[1, :count] = (image_code // width) % width - reach
    ghost_shift[2, :count] = image_code % width - reach
    ext_index = index.astype(np.int32)  # (a copy)
    ext_index[imaged] = A + ghost_of_pair.reshape(-1).astype(np.int32)
    return ext_index, source, ghost_shift


def row_capacity_for(count: int, previous: int = 0) -> int:
    """Row capacity for ``count`` rows: the previous one while it suffices (no new program),
    else, with 10% headroom, a multiple of 16 up to one block of :data:`ROW_BLOCK` rows,
    then the first rung of a ladder, 64 x 2^(k/4) rounded up to a multiple of 64 (whole
    blocks). Batches whose rows differ a little share a rung, so a program compiled for
    one runs the others (a compilation is ~10 s for SevenNet; a padding row costs little,
    nothing where empty blocks are skipped)."""
    if count <= previous:
        return previous
    need = int(np.ceil(count * 1.1))
    if need <= ROW_BLOCK:  # one block: multiples of 16
        return max(16, -(-need // 16) * 16)
    k = 0
    while (rung := ROW_BLOCK * math.ceil(2 ** (k / 4) - 1e-9)) < need:
        k += 1
    return rung


def row_tables(index, shift, mask, width: int, previous_capacity: int = 0):
    """The row form (:class:`Neighbors`) of a host list whose atoms hold their pairs in their
    first slots: ``index``/``mask`` (K, A), ``shift`` (3, K, A) (or (0, K, A)). Returns
    ``row_atom`` (R,) int32, ``row_index`` (W, R) int32, ``row_shift`` (3, W, R) (or
    (0, W, R)) and ``row_mask`` (W, R), W = ``width``, R = :func:`row_capacity_for`; atom a's
    slot s goes to column s mod W of its (s div W)-th row; empty slots list the row's atom."""
    K, A = index.shape
    counts = mask.sum(axis=0)
    n_rows = -(-counts // width)
    total = int(n_rows.sum())
    capacity = row_capacity_for(total, previous_capacity)
    row_atom = np.full(capacity, max(A - 1, 0), np.int32)
    row_atom[:total] = np.repeat(np.arange(A, dtype=np.int32), n_rows)
    first_row = np.cumsum(n_rows) - n_rows
    slot, atom = np.nonzero(mask)
    rank = (np.cumsum(mask, axis=0) - 1)[slot, atom]  # the pair's place among its atom's
    row = first_row[atom] + rank // width
    column = rank % width
    row_index = np.broadcast_to(row_atom, (width, capacity)).copy()
    row_index[column, row] = index[slot, atom]
    row_mask = np.zeros((width, capacity), bool)
    row_mask[column, row] = True
    periodic = shift.shape[0] == 3
    row_shift = np.zeros((3 if periodic else 0, width, capacity), shift.dtype)
    if periodic:
        for c in range(3):
            row_shift[c, column, row] = shift[c, slot, atom]
    return row_atom, row_index, row_mask, row_shift


def _system_pairs(positions, cell, pbc, cutoff):
    """Full pair list (i, j, S) of one system, local indices; and whether it is complete."""
    from ._vesin import neighbor_list

    n = positions.shape[0]
    if not pbc.any() and n <= ALL_PAIRS_MAX_ATOMS:
        i, j = np.nonzero(~np.eye(n, dtype=bool))
        return i.astype(np.int32), j.astype(np.int32), np.zeros((len(i), 3), np.int8), True
    box = cell if pbc.any() else np.zeros((3, 3))
    calculator = neighbor_list(cutoff=float(cutoff), full_list=True)
    i, j, shifts = calculator.compute(
        np.asarray(positions, np.float64), np.asarray(box, np.float64), pbc, "ijS", copy=False
    )
    # copy=False: views of vesin's buffers, freed with ``calculator``: every array is copied
    # (image shifts straight to 8 bits when they fit: one pass over them instead of two)
    small = len(shifts) == 0 or (int(shifts.min()) > -127 and int(shifts.max()) < 127)
    shifts = np.array(shifts, np.int8 if small else np.int32, copy=True)
    return i.astype(np.int32), j.astype(np.int32), shifts, False


def _capacity_for(count: int, headroom: bool = True) -> int:
    """Capacity K for ``count`` neighbours: 8% headroom (lists rebuilt during a relaxation
    rarely need a new shape), rounded up to a multiple of 8 (then of 32 above 256). Without
    ``headroom`` (every system lists all its pairs: its list never changes) just rounded
    (clusters of up to 64 atoms get 64 slots instead of 72)."""
    wanted = int(np.ceil(count * 1.08)) + 1 if headroom else count
    step = 8 if wanted <= 256 else 32
    return max(8, -(-wanted // step) * step)


def build(
    positions: np.ndarray,
    cells: np.ndarray,
    pbc: np.ndarray,
    layout: Layout,
    cutoff: float,
    skin: float,
    previous: HostNeighbors | None = None,
    systems: np.ndarray | None = None,
    ghosts: bool = True,
    row_width: int = 0,
    row_capacity: int = 0,
) -> HostNeighbors:
    """Build (or, given ``previous`` and ``systems``, partially rebuild) the dense lists;
    with ``ghosts`` their ghost form too (:func:`ghost_tables`; potentials that do not use it
    are spared its host work and a program shape), and with ``row_width`` W > 0 their row
    form in rows of W slots (:func:`row_tables`), at least ``row_capacity`` rows (a shape a
    program was compiled for).

    ``positions`` (A, 3), ``cells`` (S, 3, 3), ``pbc`` (S, 3) numpy; ``cutoff`` is the
    potential's cutoff (A) and the list is built at ``cutoff + skin``. Capacity grows (a new
    shape) only when a row would overflow it.
    """
    A = layout.n_padded_atoms
    S = layout.n_systems
    periodic = bool(np.asarray(pbc)[: layout.n_real].any())  # else no image shifts at all
    todo = range(layout.n_real) if systems is None else [int(k) for k in systems]
    pieces = []
    complete = np.zeros(S, bool) if previous is None else previous.complete.copy()
    for k in todo:
        rows = layout.atoms_of(k)
        i, j, shifts, full = _system_pairs(positions[rows], cells[k], pbc[k], cutoff + skin)
        pieces.append((i + rows.start, j + rows.start, shifts))
        complete[k] = full
    if pieces:
        if len(pieces) == 1:  # one system, as a large crystal is: its arrays, no copy
            i, j, shifts = pieces[0]
        else:
            i, j, shifts = (np.concatenate(arrays) for arrays in zip(*pieces, strict=True))
        shifts = shifts if periodic else None
    else:
        i = j = np.zeros(0, np.int32)
        shifts = np.zeros((0, 3), np.int8) if periodic else None
    # each system's image shifts come in 8 bits when they fit (:func:`_system_pairs`): the
    # batch's are 8 bits unless one system's are not
    shift_dtype = shifts.dtype if periodic else np.int8
    # pairs grouped by i, in vesin's order within each group; vesin lists them grouped
    # already for large cells, and then no permutation is made (a third of this function's
    # time on a 32,000-atom crystal)
    counts = np.bincount(i, minlength=A)
    if len(i) > 1 and not bool(np.all(i[1:] >= i[:-1])):
        order = np.argsort(i, kind="stable")
        j = j[order]
        shifts = shifts[order] if periodic else None
    needed = int(counts.max()) if len(counts) else 0

    if previous is not None and systems is not None and needed <= previous.capacity:
        # work in (A, K) and (3, A, K) here; stored as (K, A) and (3, K, A)
        index = previous.index.T.copy()
        mask = previous.mask.T.copy()
        dtype = np.promote_types(previous.shift.dtype, shift_dtype)
        if not periodic:
            shift = None  # molecules only: no image shifts
        elif previous.shift.shape[0] == 0:
            shift = np.zeros((3,) + index.shape, dtype)
        else:
            shift = np.transpose(previous.shift, (0, 2, 1)).astype(dtype)
        ref_positions = previous.ref_positions.copy()
        ref_cell = previous.ref_cell.copy()
        for k in todo:
            rows = layout.atoms_of(k)
            index[rows] = np.arange(rows.start, rows.stop)[:, None]
            mask[rows] = False
            if shift is not None:
                shift[:, rows] = 0
    else:
        if previous is not None and systems is not None:
            # overflow in a partial rebuild: rebuild everything at a larger capacity (never
            # fewer rows than before: a smaller program would compile too)
            rows = max(row_capacity, previous.shapes[2])
            return build(
                positions,
                cells,
                pbc,
                layout,
                cutoff,
                skin,
                ghosts=ghosts,
                row_width=row_width,
                row_capacity=rows,
            )
        capacity = _capacity_for(needed, headroom=not complete[: layout.n_real].all())
        index = np.repeat(np.arange(A, dtype=np.int32)[:, None], capacity, axis=1)
        mask = np.zeros((A, capacity), bool)
        shift = np.zeros((3, A, capacity), shift_dtype) if periodic else None
        ref_positions = np.zeros_like(positions)
        ref_cell = np.zeros_like(cells)
    if len(j):
        # row a holds its counts[a] pairs in its first slots: a boolean mask in row-major
        # order takes the grouped pairs as they come (no per-pair slot numbers to scatter to;
        # one image component at a time)
        filled = np.arange(index.shape[1])[None, :] < counts[:, None]
        index[filled] = j
        mask |= filled
        if shift is not None:
            for c in range(3):
                shift[c][filled] = shifts[:, c]
    for k in todo:
        rows = layout.atoms_of(k)
        ref_positions[rows] = positions[rows]
        ref_cell[k] = cells[k]
    if periodic:
        shift = np.ascontiguousarray(np.transpose(shift, (0, 2, 1)))
    else:  # no periodic system: no offsets
        shift = np.zeros((0,) + index.shape[::-1], np.int8)
    index, mask = np.ascontiguousarray(index.T), np.ascontiguousarray(mask.T)
    ext_index = ghost_source = ghost_shift = None
    if ghosts:
        partial = previous is not None and systems is not None
        previous_ghosts = previous.shapes[1] if partial else 0
        ext_index, ghost_source, ghost_shift = ghost_tables(index, shift, mask, previous_ghosts)
    row_atom = row_index = row_mask = row_shift = None
    if row_width:
        partial = previous is not None and systems is not None
        previous_rows = max(previous.shapes[2] if partial else 0, row_capacity)
        row_atom, row_index, row_mask, row_shift = row_tables(
            index, shift, mask, row_width, previous_rows
        )
    return HostNeighbors(
        index,
        shift,
        mask,
        ref_positions,
        ref_cell,
        complete,
        cutoff,
        skin,
        ext_index,
        ghost_source,
        ghost_shift,
        row_atom,
        row_index,
        row_shift,
        row_mask,
    )
