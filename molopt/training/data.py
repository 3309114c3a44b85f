"""Labelled configurations (energy, forces, optional stress) and fixed-shape padded batches.

Neighbour pairs of every configuration are found once (vesin) and stored per structure; a
batch only concatenates them, so shuffling every epoch costs milliseconds. Every batch has the
same padded atoms and systems; its neighbour capacity (slots per atom) is the smallest rung of
a short ladder (multiples of 8) that holds its members, and a batch only takes structures from
one rung. On small molecules most atoms have far fewer neighbours than the most crowded one,
so one capacity for all would pay for 2x the slots (and the time); the price is one
compilation per rung.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molopt._jax import jax
from molopt.errors import InputError
from molopt.structure import Structure


@dataclass
class Labelled:
    structure: Structure
    energy: float  # eV
    forces: np.ndarray  # (n, 3) eV/A
    stress: np.ndarray | None = None  # (3, 3) eV/A^3, ASE sign convention
    source: str = ""


def read_labelled(paths, index: str = ":") -> list[Labelled]:
    """Every frame of ``paths`` (any ASE format with a calculator's energy and forces: extxyz,
    VASP OUTCAR, ASE traj/db, ...). Raises :class:`InputError` naming the file and reason."""
    from molopt.io.read import ase_read, from_atoms

    out = []
    for path in paths:
        path = Path(path)
        try:
            images = ase_read(path, index)
        except Exception as exc:
            raise InputError(str(path), f"cannot be read ({type(exc).__name__}: {exc})") from exc
        if not isinstance(images, list):
            images = [images]
        for k, atoms in enumerate(images):
            try:
                energy = atoms.get_potential_energy()
                forces = atoms.get_forces()
            except Exception as exc:
                raise InputError(
                    str(path), "frame has no energy and forces to learn from", k
                ) from exc
            stress = None
            try:
                if atoms.pbc.all():
                    stress = atoms.get_stress(voigt=False)
            except Exception:
                stress = None
            atoms.set_constraint()
            structure = from_atoms(atoms, str(path), k)
            out.append(
                Labelled(structure, float(energy), np.asarray(forces, float), stress, f"{path}:{k}")
            )
    if not out:
        raise InputError(", ".join(str(p) for p in paths), "no labelled configurations")
    return out


def split(data: list[Labelled], valid_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    n_valid = max(1, int(round(valid_fraction * len(data)))) if len(data) > 1 else 0
    valid = [data[k] for k in order[:n_valid]]
    train = [data[k] for k in order[n_valid:]]
    return train, valid


@jax.tree_util.register_dataclass
@dataclass
class LabelledBatch:
    """One padded batch of labelled structures: the packed ``batch``, ``positions`` (A, 3),
    ``cells`` (S, 3, 3), ``nbrs`` (device Neighbors), targets ``energy`` (S,), ``forces``
    (A, 3), ``stress`` (S, 3, 3), ``has_stress`` (S,), ``n_atoms`` (S,)."""

    batch: object
    positions: object
    cells: object
    nbrs: object
    energy: object
    forces: object
    stress: object
    has_stress: object
    n_atoms: object


def prefetched(plan, make, depth: int = 2):
    """``make(members)`` for each batch of ``plan``, in order, built up to ``depth`` batches
    ahead in a worker thread: while the accelerator runs one training step the host packs
    (and transfers) the next, instead of the device waiting for it. Exceptions raised by
    ``make`` reach the consumer at the batch that raised them."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, not {depth}")
    plan = iter(plan)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="molopt-batches") as pool:
        pending = deque(pool.submit(make, m) for _, m in zip(range(depth), plan, strict=False))
        try:
            while pending:
                batch = pending.popleft().result()
                following = next(plan, None)
                if following is not None:
                    pending.append(pool.submit(make, following))
                yield batch
        finally:  # closed early (an error, an interrupt): build nothing more
            for future in pending:
                future.cancel()


class Batcher:
    """Packs labelled configurations into fixed-shape batches of at most ``batch_atoms`` atoms
    and ``batch_structures`` structures."""

    def __init__(
        self,
        data: list[Labelled],
        elements,
        cutoff: float,
        batch_atoms: int,
        batch_structures: int,
        dtype=np.float32,
    ):
        from .._vesin import neighbor_list

        self.data = data
        self.species = {int(z): k for k, z in enumerate(elements)}
        self.cutoff = cutoff
        self.dtype = dtype
        largest = max(d.structure.n_atoms for d in data)
        self.batch_atoms = max(batch_atoms, largest)
        self.batch_structures = batch_structures
        self.pairs = []
        self.need = []  # per structure: the capacity rung its most crowded atom needs
        for d in data:
            s = d.structure
            missing = set(int(z) for z in s.numbers) - set(self.species)
            if missing:
                from molopt import elements as el

                raise InputError(
                    d.source,
                    "element(s) "
                    + ", ".join(el.symbol(z) for z in sorted(missing))
                    + " not among the potential's elements",
                )
            box = s.cell if s.pbc.any() else np.zeros((3, 3))
            i, j, shifts = neighbor_list(cutoff=cutoff, full_list=True).compute(
                s.positions, box, s.pbc, "ijS"
            )
            order = np.argsort(i, kind="stable")
            i, j, shifts = i[order], j[order], shifts[order]
            counts = np.bincount(i, minlength=s.n_atoms)
            self.need.append(_rung(int(counts.max()) if len(counts) else 1))
            self.pairs.append(
                (i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int8), counts)
            )
        self.capacity = max(self.need)  # the top rung (batches take their own: see make)
        self.periodic = any(d.structure.pbc.any() for d in data)

    def plan(self, rng: np.random.Generator | None) -> list[list[int]]:
        """Batches (lists of structure indices) for one pass: structures in ``rng``'s order
        packed per capacity rung, then the batches of all rungs shuffled together."""
        order = np.arange(len(self.data)) if rng is None else rng.permutation(len(self.data))
        batches = []
        for rung in sorted(set(self.need)):
            current, atoms = [], 0
            for k in order:
                if self.need[k] != rung:
                    continue
                n = self.data[k].structure.n_atoms
                full = atoms + n > self.batch_atoms or len(current) >= self.batch_structures
                if current and full:
                    batches.append(current)
                    current, atoms = [], 0
                current.append(int(k))
                atoms += n
            if current:
                batches.append(current)
        if rng is not None:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def make(self, members: list[int]) -> LabelledBatch:
        """The batch of ``members`` in the fixed shape (``batch_atoms``, ``batch_structures``),
        packed as every batch is (:func:`molopt.batch.pack`), with the labels and the
        neighbour slots from the pair lists computed once (training structures never move)."""
        from molopt.batch import Layout, pack
        from molopt.neighbors import Neighbors

        A, S = self.batch_atoms, self.batch_structures
        K = max(self.need[k] for k in members)
        dtype = self.dtype
        structures = [self.data[k].structure for k in members]
        sizes = [s.n_atoms for s in structures]
        layout = Layout(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), A, S)
        batch, positions, cells, _ = pack(structures, self.species, dtype, layout)
        energy = np.zeros(S, dtype)
        forces = np.zeros((A, 3), dtype)
        stress = np.zeros((S, 3, 3), dtype)
        has_stress = np.zeros(S, bool)
        index = np.repeat(np.arange(A, dtype=np.int32)[None, :], K, axis=0)
        mask = np.zeros((K, A), bool)
        shift = np.zeros((3 if self.periodic else 0, K, A), np.int8)
        for slot, k in enumerate(members):
            d = self.data[k]
            rows = layout.atoms_of(slot)
            start = rows.start
            energy[slot] = d.energy
            forces[rows] = d.forces
            if d.stress is not None:
                stress[slot] = d.stress
                has_stress[slot] = True
            i, j, shifts, counts = self.pairs[k]
            if len(i):
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
                position = np.arange(len(i)) - starts[i]
                index[position, i + start] = j + start
                mask[position, i + start] = True
                if self.periodic:
                    shift[:, position, i + start] = shifts.T
        nbrs = Neighbors(
            index=jax.device_put(index),
            shift=jax.device_put(shift),
            mask=jax.device_put(mask),
            ref_positions=jax.device_put(positions),
            ref_cell=jax.device_put(cells),
            complete=jax.device_put(np.ones(S, bool)),
            cutoff=jax.device_put(np.asarray(self.cutoff, dtype)),
            skin=jax.device_put(np.asarray(0.0, dtype)),
        )
        return LabelledBatch(
            batch,
            jax.device_put(positions),
            jax.device_put(cells),
            nbrs,
            jax.device_put(energy),
            jax.device_put(forces),
            jax.device_put(stress),
            jax.device_put(has_stress),
            batch.n_atoms,
        )


def _rung(count: int) -> int:
    """Neighbour capacity for a structure whose most crowded atom has ``count`` pairs."""
    return max(8, -(-count // 8) * 8)
