"""Neighbour lists: exact agreement with independent pair searches, any cell, any size."""

import numpy as np
import pytest
from ase.build import bulk
from ase.neighborlist import neighbor_list
from conftest import structure_from_atoms

from molopt import batch as B
from molopt import neighbors as N
from molopt.engine import evaluate_structures
from molopt.structure import make_structure


def pairs_of(host, layout, k):
    """Set of (i, j, shift) of system k from a host list (local indices)."""
    rows = layout.atoms_of(k)
    out = set()
    for slot in range(host.capacity):
        for a in range(rows.start, rows.stop):
            if host.mask[slot, a]:
                shift = tuple(host.shift[:, slot, a]) if host.shift.shape[0] else (0, 0, 0)
                out.add((a - rows.start, int(host.index[slot, a]) - rows.start, shift))
    return out


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False), (False, True, False)])
def test_dense_list_equals_ase_neighbor_list(pbc):
    atoms = bulk("Ar", "fcc", a=5.26).repeat((2, 1, 1))  # 3.7 A triclinic cell: many images
    atoms.rattle(0.2, seed=1)
    atoms.pbc = pbc
    s = structure_from_atoms(atoms)
    _, pos, cells, layout = B.pack([s], {18: 0}, np.float64)
    host = N.build(pos, cells, np.array([s.pbc] + [[False] * 3]), layout, 8.5, 1.0)
    i, j, shifts = neighbor_list("ijS", atoms, 9.5)
    expected = {
        (int(a), int(b), tuple(int(x) for x in sh)) for a, b, sh in zip(i, j, shifts, strict=True)
    }
    assert pairs_of(host, layout, 0) == expected


def test_small_molecules_list_every_pair():
    s = make_structure([18] * 5, np.arange(15.0).reshape(5, 3) * 4.0)
    _, pos, cells, layout = B.pack([s], {18: 0}, np.float64)
    host = N.build(pos, cells, np.zeros((layout.n_systems, 3), bool), layout, 8.5, 1.0)
    assert host.complete[0]
    assert len(pairs_of(host, layout, 0)) == 5 * 4  # far pairs included: never stale


def test_capacity_headroom_only_where_lists_can_change():
    """Systems listing all their pairs never change their list: K is just rounded up. A
    batch with any other system keeps 8% headroom for rebuilds."""
    grid = np.stack(np.meshgrid(*[np.arange(4.0)] * 3), -1).reshape(-1, 3) * 3.8
    clusters = [make_structure([18] * n, grid[:n]) for n in (64, 20)]
    _, pos, cells, layout = B.pack(clusters, {18: 0}, np.float64)
    pbc = np.zeros((layout.n_systems, 3), bool)
    host = N.build(pos, cells, pbc, layout, 8.5, 1.0)
    assert host.complete[:2].all() and host.capacity == 64  # 63 partners, no headroom
    crystal = structure_from_atoms(bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2))
    _, pos, cells, layout = B.pack(clusters + [crystal], {18: 0}, np.float64)
    pbc = np.array([s.pbc for s in clusters + [crystal]] + [[False] * 3])
    host = N.build(pos, cells, pbc, layout, 8.5, 1.0)
    needed = int(host.mask.sum(axis=0).max())
    assert not host.complete[2] and host.capacity >= 1.08 * needed


def test_stale_bound_triggers_only_past_half_skin():
    import jax.numpy as jnp

    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(3)
    s = structure_from_atoms(atoms)
    batch, pos, cells, layout = B.pack([s], {18: 0}, np.float64)
    nbrs = N.build(pos, cells, np.asarray(batch.pbc), layout, 8.5, 1.0).to_device()

    def stale(displacement):
        moved = pos.copy()
        moved[0, 0] += displacement
        return bool(
            N.stale_systems(
                jnp.asarray(moved),
                jnp.asarray(cells),
                batch.system_idx,
                batch.system_mask,
                nbrs,
                False,
            )[0]
        )

    assert not stale(0.49)
    assert stale(0.51)


def energy_per_atom(repeats):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(repeats)
    ((energy, forces, _),) = evaluate_structures([structure_from_atoms(atoms)], _argon())
    return energy / len(atoms), np.abs(forces).max()


def _argon():
    from molopt.potentials.registry import load

    return load("argon").potential


def test_large_crystal_matches_unit_cell():
    """32,000 atoms (cell lists) give exactly the per-atom energy of the 4-atom cell (many
    images), and zero forces by symmetry."""
    small, _ = energy_per_atom((1, 1, 1))
    large, fmax = energy_per_atom((20, 20, 20))
    assert large == pytest.approx(small, rel=1e-12)
    assert fmax < 1e-11


@pytest.mark.slow
def test_hundred_thousand_atom_crystal_matches_unit_cell():
    small, _ = energy_per_atom((1, 1, 1))
    large, fmax = energy_per_atom((30, 30, 28))
    assert large == pytest.approx(small, rel=1e-12)
    assert fmax < 1e-11


def test_slot_groups_sized_from_the_l2_cache(tmp_path):
    """The group size for summing neighbour slots comes from the per-core L2 size (sysfs)."""
    for index, (level, kind, size) in enumerate(
        [("1", "Data", "32K"), ("1", "Instruction", "32K"), ("2", "Unified", "1024K")]
    ):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        (entry / "level").write_text(level + "\n")
        (entry / "type").write_text(kind + "\n")
        (entry / "size").write_text(size + "\n")
    assert N.l2_cache_bytes(base=tmp_path) == 1 << 20
    assert N.l2_cache_bytes(default=123, base=tmp_path / "missing") == 123
    assert 128 << 10 <= N.SLOT_GROUP_BYTES <= 2 << 20
    # W3-like table (K = 72, A = 12,288, float64): on CPU, groups of whole divisors of K
    # within budget; elsewhere all slots at once
    from molopt._jax import jax

    g = N.slot_group(72, 12288, 8)
    if jax.default_backend() == "cpu":
        assert 72 % g == 0 and g * 12288 * 8 <= max(N.SLOT_GROUP_BYTES, 12288 * 8)
    else:
        assert g == 72


def test_pair_sums_take_at_least_two_slots_a_group(monkeypatch):
    """A table too wide for the cache budget gets one slot a group by the budget alone;
    the pair sums ask for (and use) two."""
    from molopt._jax import jax

    if jax.default_backend() != "cpu":
        pytest.skip("slot groups are a CPU layout")
    monkeypatch.setattr(N, "SLOT_GROUP_BYTES", 512 << 10)
    assert N.slot_group(104, 106_496, 8) == 1
    assert N.slot_group(104, 106_496, 8, minimum=2) == 2
    used = []
    monkeypatch.setattr(
        N, "sum_over_groups", lambda fn, parts, group, **kw: used.append(group) or fn(*parts)
    )
    n = 8192
    nbrs = N.Neighbors(
        index=np.zeros((104, n), np.int32),
        shift=np.zeros((0, 104, n), np.int8),
        mask=np.zeros((104, n), bool),
        ref_positions=np.zeros((n, 3)),
        ref_cell=np.zeros((1, 3, 3)),
        complete=np.ones(1, bool),
        cutoff=8.5,
        skin=1.0,
    )
    monkeypatch.setattr(N, "SLOT_GROUP_BYTES", n * 8 // 2)  # the budget alone: one slot
    N.sum_over_slots(lambda part: part.index.shape[0], nbrs, np.float64)
    assert used == [2]


def test_partial_rebuild_equals_full_build():
    """Rebuilding some systems of a batch (the others' rows kept) gives the arrays a full
    build gives, slot for slot: periodic and molecular systems mixed, 8-bit image shifts
    promoted to 32 bits when a rebuilt system needs them; a batch without periodic systems
    carries no shift array."""
    crystal = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
    slab = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 1))
    slab.pbc = [True, True, False]
    molecule = make_structure([18] * 6, np.arange(18.0).reshape(6, 3) * 1.3)
    structures = [structure_from_atoms(crystal), structure_from_atoms(slab), molecule]
    batch, pos, cells, layout = B.pack(structures, {18: 0}, np.float64)
    pbc = np.asarray(batch.pbc)
    before = N.build(pos, cells, pbc, layout, 8.5, 1.0)
    assert before.shift.dtype == np.int8 and before.shift.shape == (3,) + before.index.shape
    rng = np.random.default_rng(0)
    moved = pos + rng.uniform(-0.3, 0.3, pos.shape)
    # the slab's and molecule's rows come from a rebuild of systems 1 and 2 after they moved;
    # the crystal's are kept: the same as a full build of that geometry
    partial = N.build(moved, cells, pbc, layout, 8.5, 1.0, previous=before, systems=[1, 2])
    hybrid = pos.copy()
    start = layout.offsets[1]
    hybrid[start:] = moved[start:]
    full = N.build(hybrid, cells, pbc, layout, 8.5, 1.0)
    assert partial.capacity == full.capacity
    for name in ("index", "mask", "shift", "complete"):
        got, want = getattr(partial, name), getattr(full, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert not np.array_equal(partial.index, before.index)  # the rebuild changed something
    # a badly reduced cell (its shortest lattice vector is a2 - 100 a1) lists images more
    # than 127 cells away: 32-bit shifts, for the rebuilt system and the kept ones alike
    from ase import Atoms

    skewed = Atoms("Ar", cell=[[10.0, 0, 0], [1000.3, 0.5, 0], [0, 0, 10.0]], pbc=True)
    structures = [structure_from_atoms(crystal), structure_from_atoms(skewed)]
    batch, pos, cells, layout = B.pack(structures, {18: 0}, np.float64)
    pbc = np.asarray(batch.pbc)
    crystal_only = N.build(pos, cells, pbc, layout, 8.5, 1.0, systems=[0])
    assert crystal_only.shift.dtype == np.int8
    promoted = N.build(pos, cells, pbc, layout, 8.5, 1.0, previous=crystal_only, systems=[1])
    full = N.build(pos, cells, pbc, layout, 8.5, 1.0)
    assert full.shift.dtype == promoted.shift.dtype == np.int32
    assert np.abs(full.shift).max() > 127
    for name in ("index", "mask", "shift"):
        assert np.array_equal(getattr(promoted, name), getattr(full, name)), name
    # molecules only: no image shifts at all
    batch, pos, cells, layout = B.pack([molecule, molecule], {18: 0}, np.float64)
    host = N.build(pos, cells, np.asarray(batch.pbc), layout, 8.5, 1.0)
    assert host.shift.shape == (0,) + host.index.shape


def _ghost_vectors(host, pos, cells, batch):
    """Pair vectors through the ghost form, and through the plain one, of a host list."""
    import jax.numpy as jnp

    nbrs = host.to_device()
    p, c = jnp.asarray(pos), jnp.asarray(cells)
    extended = np.asarray(N.extended_positions(p, c, batch.system_idx, nbrs))
    ghost = extended[host.ext_index] - pos[None, :, :]  # (K, A, 3)
    plain = np.stack(N.pair_vectors(p, c, batch.system_idx, nbrs), axis=-1)
    return extended, ghost, plain


def test_ghost_form_lists_the_same_pairs(monkeypatch):
    """Through ghost atoms every listed pair has the vector the plain list gives (periodic
    crystal, slab, molecule and a small triclinic cell seen through many images, in one
    batch); empty slots keep the plain list's entry; numbering by sorting equals the table;
    a partial rebuild keeps the ghost capacity and stays right."""
    from ase import Atoms

    crystal = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
    slab = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 1))
    slab.pbc = [True, True, False]
    small = Atoms("Ar2", positions=[[0, 0, 0], [1.9, 1.8, 0.3]], pbc=True)
    small.cell = [[3.7, 0, 0], [1.2, 3.6, 0], [0.4, 0.9, 3.5]]
    molecule = make_structure([18] * 6, np.arange(18.0).reshape(6, 3) * 1.3)
    structures = [structure_from_atoms(a) for a in (crystal, slab, small)] + [molecule]
    batch, pos, cells, layout = B.pack(structures, {18: 0}, np.float64)
    pbc = np.asarray(batch.pbc)
    host = N.build(pos, cells, pbc, layout, 8.5, 1.0)
    K, A = host.index.shape
    G = host.ghost_source.shape[0]
    assert G % 256 == 0 and np.abs(host.ghost_shift).max() >= 2  # the small cell: far images
    extended, ghost, plain = _ghost_vectors(host, pos, cells, batch)
    np.testing.assert_allclose(ghost[host.mask], plain[host.mask], atol=1e-12)
    assert np.array_equal(host.ext_index[~host.mask], host.index[~host.mask])
    assert extended.shape[0] == A + G and np.all(host.ext_index < A + G)
    # numbering by sorting (huge image ranges) gives the same tables
    monkeypatch.setattr(N, "_GHOST_TABLE_MAX", 0)
    sorted_form = N.ghost_tables(host.index, host.shift, host.mask)
    expected = (host.ext_index, host.ghost_source, host.ghost_shift)
    for got, want in zip(sorted_form, expected, strict=True):
        assert np.array_equal(got, want)
    monkeypatch.undo()
    # a partial rebuild: same ghost capacity (no new program), the pairs still right
    moved = pos + np.random.default_rng(1).uniform(-0.3, 0.3, pos.shape)
    partial = N.build(moved, cells, pbc, layout, 8.5, 1.0, previous=host, systems=[0, 2])
    assert partial.shapes == host.shapes
    hybrid = pos.copy()
    for k in (0, 2):
        rows = layout.atoms_of(k)
        hybrid[rows] = moved[rows]
    _, ghost, plain = _ghost_vectors(partial, hybrid, cells, batch)
    np.testing.assert_allclose(ghost[partial.mask], plain[partial.mask], atol=1e-12)
    # potentials that do not read the ghost form do not get it (no host work, no shape)
    plain = N.build(pos, cells, pbc, layout, 8.5, 1.0, ghosts=False)
    assert plain.ext_index is None and plain.shapes == (host.capacity, 0, 0)
    assert plain.to_device().ext_index is None
    # a periodic batch starts with ghost room even when it lists no image yet (vacuum)
    boxed = Atoms("Ar2", positions=[[10, 10, 10], [13.5, 10, 10]], cell=[30] * 3, pbc=True)
    b2, p2, c2, l2 = B.pack([structure_from_atoms(boxed)], {18: 0}, np.float64)
    lonely = N.build(p2, c2, np.asarray(b2.pbc), l2, 8.5, 1.0)
    assert lonely.ghost_source.shape == (256,)
    assert np.array_equal(lonely.ext_index, lonely.index)  # no slot on a ghost: no image yet
    # molecules only: no ghosts, every listed pair direct
    batch, pos, cells, layout = B.pack([molecule, molecule], {18: 0}, np.float64)
    host = N.build(pos, cells, np.asarray(batch.pbc), layout, 8.5, 1.0)
    assert host.ghost_source.shape == (0,)
    assert np.array_equal(host.ext_index[host.mask], host.index[host.mask])


def test_pairs_in_any_order_give_the_same_lists(monkeypatch):
    """Pairs grouped by atom (as vesin gives them for large cells) skip the build's sort;
    pairs in any other order are sorted. Both give the lists of vesin's own order, pair for
    pair, with the same capacity and ghost shapes."""
    atoms = bulk("Ar", "fcc", a=5.26).repeat((2, 2, 2))
    atoms.rattle(0.2, seed=4)
    s = structure_from_atoms(atoms)
    _, pos, cells, layout = B.pack([s], {18: 0}, np.float64)
    pbc = np.array([s.pbc] + [[False] * 3])
    reference = N.build(pos, cells, pbc, layout, 8.5, 1.0)
    original = N._system_pairs

    def reordered(how):
        def pairs(positions, cell, pbc, cutoff):
            i, j, shifts, full = original(positions, cell, pbc, cutoff)
            if how == "grouped":
                order = np.argsort(i, kind="stable")
            else:
                order = np.random.default_rng(0).permutation(len(i))
            assert (np.all(np.diff(i[order]) >= 0)) == (how == "grouped")
            return i[order], j[order], shifts[order], full

        return pairs

    for how in ("grouped", "shuffled"):
        monkeypatch.setattr(N, "_system_pairs", reordered(how))
        other = N.build(pos, cells, pbc, layout, 8.5, 1.0)
        assert pairs_of(other, layout, 0) == pairs_of(reference, layout, 0), how
        assert other.capacity == reference.capacity and other.shapes == reference.shapes


def row_pairs_of(host, layout, k):
    """Set of (i, j, shift) of system k from the row form of a host list (local indices)."""
    rows = layout.atoms_of(k)
    out = set()
    width, n_rows = host.row_index.shape
    for r in range(n_rows):
        a = int(host.row_atom[r])
        for c in range(width):
            if host.row_mask[c, r] and rows.start <= a < rows.stop:
                periodic = host.row_shift.shape[0]
                shift = tuple(host.row_shift[:, c, r]) if periodic else (0, 0, 0)
                out.add((a - rows.start, int(host.row_index[c, r]) - rows.start, shift))
    return out


def test_row_form_lists_the_dense_pairs_and_sums_them_the_same():
    """The row form (rows of W slots, each one atom's) lists exactly the dense list's pairs,
    each once, rows of an atom consecutive; its pair vectors are the dense ones and the rows'
    sums added into atoms (``sum_rows``) equal the dense sums. A partial rebuild keeps the row
    capacity (no new program); crowded and sparse atoms share a batch without padding
    the sparse ones to the crowded count."""
    import jax
    import jax.numpy as jnp

    dense_crystal = bulk("Cu", "fcc", a=3.6)  # one atom, ~40 neighbours within 6 A
    loose = bulk("Na", "bcc", a=4.2).repeat((2, 1, 1))
    loose.rattle(0.1, seed=3)
    molecule = make_structure([18, 18, 18], [[0, 0, 0], [3.7, 0, 0], [0, 3.6, 0.2]])
    structures = [structure_from_atoms(dense_crystal), structure_from_atoms(loose), molecule]
    batch, pos, cells, layout = B.pack(structures, {29: 0, 11: 1, 18: 2}, np.float64)
    pbc = np.asarray(batch.pbc)
    host = N.build(pos, cells, pbc, layout, 5.0, 1.0, ghosts=False, row_width=8)
    assert host.shapes == (0, 0, host.row_atom.shape[0])  # dense slots stay on the host
    assert np.all(np.diff(host.row_atom) >= 0)
    for k in range(3):
        assert row_pairs_of(host, layout, k) == pairs_of(host, layout, k)
    listed = int(host.mask.sum())
    assert int(host.row_mask.sum()) == listed
    used_rows = int(np.sum(-(-host.mask.sum(axis=0) // 8)))
    assert used_rows * 8 < host.capacity * int(layout.offsets[-1])  # the dense list pads more
    assert not host.row_mask[:, used_rows:].any()
    device = host.to_device()
    assert device.index.shape == (0, pos.shape[0])  # the dense slots stay on the host
    # padded to a program's bigger row capacity: the lists built for that capacity
    bigger = host.shapes[2] + 37
    padded = host.with_rows(bigger)
    built = N.build(
        pos, cells, pbc, layout, 5.0, 1.0, ghosts=False, row_width=8, row_capacity=bigger
    )
    assert padded.shapes == built.shapes == (0, 0, bigger)
    for name in ("row_atom", "row_index", "row_mask", "row_shift"):
        np.testing.assert_array_equal(getattr(padded, name), getattr(built, name), name)
    assert host.with_rows(host.shapes[2]) is host
    dense_only = N.build(pos, cells, pbc, layout, 5.0, 1.0, ghosts=False).to_device()
    np.testing.assert_array_equal(dense_only.index, host.index)
    dense = N.pair_vectors(jnp.asarray(pos), jnp.asarray(cells), batch.system_idx, dense_only)
    rows = N.row_vectors(jnp.asarray(pos), jnp.asarray(cells), batch.system_idx, device)
    r_dense = np.sqrt(sum(np.asarray(d) ** 2 for d in dense))
    r_rows = np.sqrt(sum(np.asarray(d) ** 2 for d in rows))
    assert sorted(r_rows[host.row_mask]) == pytest.approx(sorted(r_dense[host.mask]), abs=1e-12)
    per_atom_dense = np.where(host.mask, np.exp(-r_dense), 0.0).sum(axis=0)
    row_sums = jnp.asarray(np.where(host.row_mask, np.exp(-r_rows), 0.0).sum(axis=0))
    per_atom_rows = N.sum_rows(row_sums, device, pos.shape[0])
    np.testing.assert_allclose(per_atom_rows, per_atom_dense, rtol=1e-13, atol=1e-14)
    # the same, a few rows at a time (blocks added into atoms in place), and differentiable
    weights = jnp.asarray(np.exp(-r_rows))

    def per_row(mask, w):
        return {"s": jnp.sum(jnp.where(mask, w, 0.0), axis=0)}

    n_atoms = pos.shape[0]
    parts = (jnp.asarray(host.row_mask), weights)
    for block in (4, 16, 10_000):
        blocked = N.sum_row_blocks(per_row, parts, device, n_atoms, block=block)["s"]
        np.testing.assert_allclose(blocked, per_atom_dense, rtol=1e-13, atol=1e-14)
        grad = jax.grad(
            lambda w, b=block: jnp.sum(
                N.sum_row_blocks(per_row, (parts[0], w), device, n_atoms, b)["s"] ** 2
            )
        )(weights)
        expected = 2 * per_atom_dense[host.row_atom][None, :] * host.row_mask
        np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-14)
    # a partial rebuild keeps the row capacity and lists the moved system's pairs
    moved = pos.copy()
    part = layout.atoms_of(1)
    moved[part] += np.random.default_rng(2).uniform(-0.2, 0.2, (part.stop - part.start, 3))
    partial = N.build(
        moved, cells, pbc, layout, 5.0, 1.0, previous=host, systems=[1], ghosts=False, row_width=8
    )
    assert partial.shapes == host.shapes
    assert row_pairs_of(partial, layout, 1) == pairs_of(partial, layout, 1)
    assert row_pairs_of(partial, layout, 0) == pairs_of(host, layout, 0)
    # a partial rebuild that overflows the dense slots rebuilds everything, never with
    # fewer rows than the program it runs in
    squeezed, small = pos.copy(), cells.copy()
    part = layout.atoms_of(1)
    squeezed[part] *= 0.6  # the Na crystal compressed
    small[1] *= 0.6
    padded = host.with_rows(host.shapes[2] + 64)
    grown = N.build(squeezed, small, pbc, layout, 5.0, 1.0, previous=host, systems=[1], row_width=8)
    assert grown.capacity > host.capacity  # it did overflow
    regrown = N.build(
        squeezed, small, pbc, layout, 5.0, 1.0, previous=padded, systems=[1], row_width=8
    )
    assert regrown.shapes[2] == max(padded.shapes[2], grown.shapes[2])
    # potentials that do not read rows do not get them
    assert N.build(pos, cells, pbc, layout, 5.0, 1.0).row_atom is None


def test_unlisted_row_blocks_are_never_evaluated():
    """``sum_row_blocks`` evaluates a block of rows only where one of its slots is listed;
    ``only_systems`` unlists the rows of the systems a relaxation has finished with, so their
    blocks (and the padding rows) cost nothing, while the kept systems' sums, and their
    gradients, are those of the whole list."""
    import jax
    import jax.numpy as jnp

    crystals = [bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1)), bulk("Na", "bcc", a=4.2)]
    crystals.append(bulk("Al", "fcc", a=4.05).repeat((2, 1, 1)))
    structures = [structure_from_atoms(a) for a in crystals]
    batch, pos, cells, layout = B.pack(structures, {29: 0, 11: 1, 13: 2}, np.float64)
    pbc = np.asarray(batch.pbc)
    host = N.build(pos, cells, pbc, layout, 5.0, 1.0, ghosts=False, row_width=8)
    host = host.with_rows(host.shapes[2] + 24)  # padding rows, as a reused program has
    device = host.to_device()
    n_atoms, block = pos.shape[0], 4
    keep = jnp.asarray([True, False, True])
    kept = N.only_systems(device, keep, batch.system_idx)
    of_row = np.asarray(batch.system_idx)[host.row_atom]
    np.testing.assert_array_equal(np.asarray(kept.row_mask), host.row_mask & (of_row != 1))

    # a block function that is *not* zero on unlisted slots shows which blocks ran
    def ones(mask):
        return {"n": jnp.ones(mask.shape[1], jnp.float64)}

    ran = np.asarray(N.sum_row_blocks(ones, (kept.row_mask,), kept, n_atoms, block)["n"])
    R = host.shapes[2]
    listed_block = np.asarray(kept.row_mask).reshape(8, R // block, block).any(axis=(0, 2))
    expected = np.zeros(n_atoms)
    np.add.at(expected, host.row_atom, np.repeat(listed_block, block).astype(float))
    np.testing.assert_array_equal(ran, expected)
    assert not ran[layout.atoms_of(1)].any()  # the finished system's rows never ran
    assert listed_block.sum() < R // block  # nor did the padding's

    r = jnp.asarray(np.linspace(1.0, 2.0, 8 * R).reshape(8, R))

    def weighted(mask, w):
        return {"s": jnp.sum(jnp.where(mask, jnp.exp(-w), 0.0), axis=0)}

    def total(nbrs, w):
        return jnp.sum(N.sum_row_blocks(weighted, (nbrs.row_mask, w), nbrs, n_atoms, block)["s"])

    whole = N.sum_row_blocks(weighted, (device.row_mask, r), device, n_atoms, block)["s"]
    part = N.sum_row_blocks(weighted, (kept.row_mask, r), kept, n_atoms, block)["s"]
    for k in (0, 2):
        atoms = layout.atoms_of(k)
        np.testing.assert_allclose(part[atoms], whole[atoms], rtol=1e-14)
    grad_whole, grad_part = jax.grad(total, 1)(device, r), jax.grad(total, 1)(kept, r)
    np.testing.assert_allclose(grad_part, np.where(of_row[None, :] != 1, grad_whole, 0.0))
