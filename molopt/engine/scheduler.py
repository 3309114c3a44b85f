"""The host loop: take structures from a queue into padded batches, advance each batch in
compiled chunks, retire what finished (reporting it), and repack running systems into a new
batch when the batching policy says so. Batching decisions live in :mod:`~molopt.engine.policy`,
moving systems in :mod:`~molopt.engine.transplant`, frames and results in
:mod:`~molopt.engine.reporting`; the compiled programs in :mod:`~molopt.engine.kernel`."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from molopt import interrupt
from molopt import neighbors as nl
from molopt._jax import jax, relieve_mapping_pressure
from molopt.batch import Batch, Layout, bucket_systems
from molopt.engine import memory, policy, transplant
from molopt.engine.kernel import advance, cast_potential, evaluate_once, initial_state
from molopt.engine.packing import neighbor_lists, pack_structures
from molopt.engine.reporting import Item, NullSink, RelaxResult, Reporter, Sink, snapshot
from molopt.engine.settings import EngineSettings, chunk_for
from molopt.engine.state import Program, RelaxState, Status, Targets
from molopt.optimizers import cell as cellfilter
from molopt.optimizers import cell_options
from molopt.optimizers.cell_options import CellOptions
from molopt.potentials.base import PotentialMethods as Potential
from molopt.potentials.base import batch_atoms
from molopt.structure import Structure

#: Called with each converged result, the number of restarts so far and the engine's
#: potential; returns a structure to relax again in its place (the result is then not
#: reported), or None to accept it. It may add entries to ``result.extra``.
AfterConverged = Callable[[RelaxResult, int, Any], "Structure | None"]

#: A new batch runs in a program compiled before (:meth:`Engine._seen_shape`) when that
#: program's row capacity is at most this many times what the batch needs: where empty
#: blocks of rows are skipped (``neighbors.skips_empty_blocks``, a CPU) padding rows cost
#: next to nothing; elsewhere (``ROW_REUSE_EVALUATED``) their share of the messages.
ROW_REUSE = 2.0
ROW_REUSE_EVALUATED = 1.25

#: The share of a step's device time that an idle system's atoms still cost where its rows
#: are skipped (node-wise layers, geometry, padding): measured 0.17 for SevenNet float32 on
#: a batch of 16 crystals (44 of 266 ms with every system's rows left out). Elsewhere 1.
IDLE_ROW_COST = 0.2


@dataclass
class LiveBatch:
    """One batch on the device, and what the policy tracks about it."""

    items: list
    layout: Layout
    batch: Batch
    nbrs_host: nl.HostNeighbors
    nbrs: nl.Neighbors
    reference: Any
    state: RelaxState
    program: Program
    cells0: np.ndarray
    pbc: np.ndarray = field(default=None)
    # what starting this batch cost (packing, neighbours, tracing and compiling or loading its
    # programs, and the first regular ``advance`` call's dispatch) and whether its shape was
    # new; its idle account for the compaction decision (:func:`policy.should_repack`)
    setup_s: float = 0.0
    new_shape: bool = True
    idle: policy.Idle = field(default_factory=policy.Idle)
    advanced: bool = False
    # whether it may be compacted (not when a compaction just landed it in the program it left)
    compactable: bool = True
    # seconds the host waited inside ``_advance`` for chunks since the last status read (it
    # reads their frame count, which waits for the device): device time the policy counts
    waited_s: float = 0.0


class Engine:
    """Host loop. ``run(items)`` with ``items`` a sequence of (key, Structure)."""

    def __init__(
        self,
        potential: Potential,
        settings: EngineSettings,
        sink: Sink | None = None,
        progress: Callable[[int, int], None] | None = None,
        after_converged: AfterConverged | None = None,
        claim: Callable[[Any], bool] | None = None,
    ):
        self.settings = settings
        self.dtype = settings.dtype
        self.potential = cast_potential(potential, self.dtype)
        #: neighbour-list skin (A): the settings', else the potential's default
        self.skin = (
            settings.skin if settings.skin is not None else getattr(potential, "default_skin", 1.0)
        )
        #: atoms per batch: the settings', else the potential's on this device
        self.max_batch_atoms = settings.max_batch_atoms or batch_atoms(potential)
        self.sink = sink or NullSink()
        self.progress = progress
        self.after_converged = after_converged
        #: bytes a batch may need (None: set by :meth:`relax`); estimated neighbours per atom
        self.memory_limit: int | None = settings.max_memory
        self.neighbours: dict = {}
        #: asked for each structure just before it first enters a batch; one it refuses (another
        #: process relaxes it) is passed over and listed in ``passed_over``
        self.claim = claim
        self.passed_over: list = []
        self.program = Program(
            optimizer=settings.make_optimizer(),
            variable_cell=settings.relax_cell,
            stress=settings.relax_cell,
            chunk=settings.chunk,
        )
        self.reporter = Reporter(self.sink, settings.trajectory_interval, settings.relax_cell)
        self.targets = Targets(
            fmax=jax.device_put(np.asarray(settings.fmax, self.dtype)),
            max_steps=jax.device_put(np.asarray(settings.steps, np.int32)),
            energy_floor=jax.device_put(np.asarray(-settings.explode_energy, self.dtype)),
        )
        self.compiles = 0
        self.starts = 0  # batches launched
        self.repacks = 0  # of which carried running systems on (refills and compactions)
        self.shapes_seen: set = set()
        #: seconds a refill or compaction is taken to cost; None: measured
        #: (``policy.compaction_cost``)
        self.compaction_cost: float | None = None
        #: the most starting a batch has cost, by whether its shape was new to this engine (a
        #: new shape traces and compiles, or loads, its programs; a known one only packs)
        self.start_cost: dict = {}
        self.clock = time.perf_counter  # for the compaction policy's timings
        # a potential reading row-form lists skips idle systems' rows and padding rows
        # (``neighbors.only_systems``, ``sum_row_blocks``) where the device allows
        skipping = getattr(potential, "row_width", 0) > 0 and nl.skips_empty_blocks()
        self.row_reuse = ROW_REUSE if skipping else ROW_REUSE_EVALUATED
        self.idle_cost = IDLE_ROW_COST if skipping else 1.0
        # a new program for row-form lists, while structures wait, has room for a quarter as
        # many systems as atoms, at most 128 (a later batch of smaller crystals runs in it:
        # idle systems cost next to nothing, a compilation ~10 s)
        self.system_floor = min(self.max_batch_atoms // 4, 128) if skipping else 0

    # -- packing ------------------------------------------------------------------------------
    def _pack(self, items: list, layout: Layout | None = None) -> tuple:
        structures = [it.structure for it in items]
        batch, positions, cells, layout = pack_structures(
            structures, self.potential, self.dtype, layout
        )
        if self.program.variable_cell:
            for k in range(layout.n_real, layout.n_systems):
                cells[k] = np.eye(3)
        return batch, positions, cells, layout

    def _neighbors(
        self, positions, cells, pbc, layout, previous=None, systems=None, row_capacity=0
    ):
        host = self._host_lists(positions, cells, pbc, layout, previous, systems, row_capacity)
        return host, host.to_device()

    def _host_lists(
        self, positions, cells, pbc, layout, previous=None, systems=None, row_capacity=0
    ):
        return neighbor_lists(
            positions,
            cells,
            pbc,
            layout,
            self.potential,
            self.skin,
            self.dtype,
            previous=previous,
            systems=systems,
            row_capacity=row_capacity,
        )

    def _seen_shape(self, layout: Layout, host, same_systems=False) -> tuple[int, int] | None:
        """(systems, rows) of a program already compiled that a new batch of ``layout`` with
        lists ``host`` fits: the same padded atoms, ghosts and images, at least its systems
        (exactly, with ``same_systems``: a running batch whose lists grew), and at least its
        rows but at most :attr:`row_reuse` times as many; the one with the fewest rows, then
        systems. Only for the row form of the lists: their capacity differs from batch to
        batch (a compilation each, ~10 s for SevenNet), while the rows a program pads cost
        little (nothing where empty blocks are skipped). None if there is none."""
        slots, ghosts, rows = host.shapes
        if not rows:
            return None
        images = host.shift.shape[0]
        fits = [
            (key[2][2], key[1])
            for key in self.shapes_seen
            if policy.runs_in(key, layout.n_padded_atoms, layout.n_systems, rows, self.row_reuse)
            and key[2][:2] == (slots, ghosts)
            and key[3] == images
            and (key[1] == layout.n_systems or not same_systems)
        ]
        if not fits:
            return None
        best_rows, best_systems = min(fits)
        return best_systems, best_rows

    def _rows_needed(self, live: LiveBatch, systems: list) -> int:
        """The row capacity a batch of the ``systems`` of ``live`` would be built with (their
        rows in its lists, with the builder's headroom); 0 without the row form."""
        host = live.nbrs_host
        if host.row_atom is None:
            return 0
        used = host.row_mask.any(axis=0)  # a row holds at least one pair; padding rows none
        owner = np.searchsorted(live.layout.offsets, host.row_atom[used], side="right") - 1
        return nl.row_capacity_for(int(np.isin(owner, systems).sum()))

    def _reference(self, cells, layout: Layout, batch: Batch, items: list):
        if not self.program.variable_cell:
            return None
        factor = np.ones(layout.n_systems, self.dtype)
        factor[: layout.n_real] = np.diff(layout.offsets)
        default = CellOptions.of(self.settings)
        options = [it.structure.cell_options or default for it in items]
        return cellfilter.make_reference(cells, factor, np.asarray(batch.pbc), self.dtype, options)

    def _coordinates(self, positions, layout):
        if not self.program.variable_cell:
            return positions
        return np.concatenate([positions, np.zeros((3 * layout.n_systems, 3), self.dtype)])

    @staticmethod
    def _shape_key(live: LiveBatch) -> tuple:
        """The shape its programs are compiled for: (padded atoms, systems, list shapes,
        images)."""
        return (
            live.layout.n_padded_atoms,
            live.layout.n_systems,
            live.nbrs_host.shapes,
            live.nbrs.shift.shape[0],
        )

    def _note_shape(self, live: LiveBatch) -> bool:
        """Count a new shape (a compilation); whether it was new."""
        key = self._shape_key(live)
        if key in self.shapes_seen:
            return False
        self.shapes_seen.add(key)
        self.compiles += 1
        return True

    def _launch(
        self, items: list, carry: dict | None = None, more_waiting: bool = False
    ) -> LiveBatch:
        """Pack ``items`` into a new batch; continuing systems keep their state (``carry``:
        key -> {"state": :func:`transplant.extract`'s dict, "reference_cell": ...}).
        ``more_waiting``: structures are queued for later batches (a new program then has
        room for :attr:`system_floor` systems)."""
        variable_cell = self.program.variable_cell
        carried = {k: carry[it.key] for k, it in enumerate(items) if carry and it.key in carry}

        def packed(layout=None):
            batch, positions, cells, layout = self._pack(items, layout)
            # continuing systems: current geometry (and variable-cell coordinates)
            for k, saved in carried.items():
                positions[layout.atoms_of(k)] = saved["state"]["positions"]
                cells[k] = saved["state"]["cell"]
            return batch, positions, cells, layout

        batch, positions, cells, layout = packed()
        pbc = np.asarray(batch.pbc)
        host = self._host_lists(positions, cells, pbc, layout)
        seen = self._seen_shape(layout, host)
        floor = self.system_floor if more_waiting else 0
        if seen is None and layout.n_systems < floor and host.shapes[2]:
            # a new program: with room for the systems of later, smaller structures
            seen = (bucket_systems(floor), host.shapes[2])
        if seen is not None and seen != (layout.n_systems, host.shapes[2]):
            # run in a program compiled before (a bigger one), not a new one
            n_systems, n_rows = seen
            if n_systems != layout.n_systems:  # more systems: packed and listed again
                padded = Layout(layout.offsets, layout.n_padded_atoms, n_systems)
                batch, positions, cells, layout = packed(padded)
                pbc = np.asarray(batch.pbc)
                host = self._host_lists(positions, cells, pbc, layout, row_capacity=n_rows)
            else:  # only more rows: the same lists, padded
                host = host.with_rows(n_rows)
        nbrs = host.to_device()
        reference_cells = cells.copy()
        if variable_cell:
            for k, saved in carried.items():
                reference_cells[k] = saved["reference_cell"]
        reference = self._reference(reference_cells, layout, batch, items)
        x = self._coordinates(positions, layout)
        if variable_cell:
            for k, saved in carried.items():
                atoms_x, cell_x = saved["state"]["x"]
                x[layout.atoms_of(k)] = atoms_x
                base = layout.n_padded_atoms + 3 * k
                x[base : base + 3] = cell_x
        record = self.settings.trajectory_interval != 0
        optimizer = self.program.optimizer
        if hasattr(optimizer, "for_batch"):  # per-system blocks sized to the largest system
            optimizer = optimizer.for_batch(
                int(np.max(np.diff(layout.offsets))) + (3 if variable_cell else 0)
            )
        program = dataclasses.replace(
            self.program,
            optimizer=optimizer,
            chunk=(
                chunk_for(layout.n_padded_atoms, self.settings.chunk)
                if record
                else self.settings.chunk
            ),
            record=record,
            roundtrip=variable_cell and bool(np.asarray(reference.roundtrip).any()),
        )
        state = initial_state(jax.device_put(x), jax.device_put(cells), batch, program)
        # step 0: the evaluation of the pending initial state, and no step after it
        state, _, _, _ = advance(
            state, batch, nbrs, self.potential, reference, self.targets, program, np.int32(0)
        )
        if carried:
            saved = {k: c["state"] for k, c in carried.items()}
            state = transplant.restore(state, saved, layout, variable_cell)
        live = LiveBatch(items, layout, batch, host, nbrs, reference, state, program, cells, pbc)
        live.new_shape = self._note_shape(live)
        self.starts += 1
        self.repacks += bool(carried)
        return live

    def _carry(self, live: LiveBatch, running: list) -> dict:
        """Host copies of the running systems of ``live``, to continue in another batch."""
        host_state = jax.device_get(live.state)
        canonical = getattr(self.program.optimizer, "canonical", None)
        carry = {}
        for k in running:
            state = transplant.extract(host_state, k, live.layout, self.program.variable_cell)
            if canonical is not None:  # e.g. rotate L-BFGS's ring to the start of a new batch
                state["opt"] = canonical(state["opt"])
            reference = np.asarray(live.reference.cell[k]) if live.reference else None
            carry[live.items[k].key] = {"state": state, "reference_cell": reference}
        return carry

    def _with_final_stress(self, live: LiveBatch, snap, finished: list):
        """Fill ``snap.dE_dstrain`` for finished periodic systems (one evaluation)."""
        if self.program.variable_cell or not self.settings.final_stress:
            return snap
        if not any(live.items[k].structure.pbc.all() for k in finished):
            return snap
        ev = evaluate_once(
            live.state.positions, live.state.cell, live.batch, live.nbrs, self.potential, True
        )
        snap.dE_dstrain = np.asarray(jax.device_get(ev.dE_dstrain))
        return snap

    # -- the loop ----------------------------------------------------------------------------
    def run(self, items: Sequence[tuple[Any, Structure]]) -> list[RelaxResult]:
        relieve_mapping_pressure()
        s = self.settings
        if self.memory_limit is None:
            self.memory_limit = s.max_memory or memory.default_limit()
        results: list[RelaxResult] = []
        # structures with periodic images need many more neighbour slots than molecules:
        # batching them apart keeps the padded neighbour capacity small for each
        ordered = sorted(items, key=lambda item: (not item[1].pbc.any(), -item[1].n_atoms))
        queue = deque()
        reach = float(self.potential.cutoff) + self.skin
        for key, structure in ordered:
            item = Item(key, structure)
            self.neighbours[key] = memory.neighbours_per_atom(structure, reach)
            need = self._bytes([item])
            if need > self.memory_limit:
                self._fail(
                    item,
                    f"needs about {memory.describe(need)} of memory (about "
                    f"{self.neighbours[key]:.0f} neighbours per atom within {reach:g} A), more "
                    f"than the {memory.describe(self.memory_limit)} allowed (--max-memory)",
                    results,
                )
            else:
                queue.append(item)
        total = len(queue) + len(results)
        carry: dict = {}
        keep: list = []
        left = None  # the shape of the last batch
        while queue or keep:
            interrupt.check()
            chosen = policy.admit(
                queue,
                keep,
                s.batch_size,
                self.max_batch_atoms,
                lambda batch: self._bytes(batch) <= self.memory_limit,
            )
            if self.claim is not None:
                chosen = self._claimed(chosen, carry)
                if not chosen:
                    continue
                total = len(results) + len(queue) + len(chosen)
            fresh = {it.key for it in chosen if it.key not in carry}
            now = time.perf_counter()
            for it in chosen:
                if it.key in fresh and not it.begun:
                    it.started_at = now
                    it.begun = True
                    self.sink.begin(it.key, it.structure)
            began = self.clock()
            # a compaction: only running systems move, none joins
            compacting = bool(keep) and not fresh
            try:
                live = self._launch(chosen, carry, more_waiting=bool(queue))
            except Exception as exc:
                if not memory.out_of_memory(exc):
                    raise
                keep = self._split_after_oom(chosen, queue, results, exc)
                continue
            if compacting and self._shape_key(live) == left:
                # it landed in the program it left (a bigger one seen before took it): moving
                # again would land there again, so this batch finishes where it is
                live.compactable = False
            live.setup_s = self.clock() - began
            self.reporter.emit_initial(
                live.items, live.layout, live.pbc, snapshot(live.state), fresh
            )
            keep, carry = self._run_batch(live, queue, results)
            left = self._shape_key(live)  # as it left: a rebuild may have grown its lists
            if self.progress:
                self.progress(len(results), total)
        return results

    # -- memory ------------------------------------------------------------------------------
    def _bytes(self, items: list) -> int:
        """Estimated bytes of a batch of ``items`` (:mod:`molopt.engine.memory`)."""
        atoms = sum(it.structure.n_atoms for it in items)
        neighbours = max(self.neighbours[it.key] for it in items)
        need = memory.bytes_for(atoms, neighbours, self.potential, self.dtype)
        state_bytes = getattr(self.program.optimizer, "state_bytes", None)
        if state_bytes is not None:  # e.g. BFGS's dense Hessians, quadratic in the atoms
            cell_rows = 3 if self.program.variable_cell else 0
            rows = [it.structure.n_atoms + cell_rows for it in items]
            need += state_bytes(rows, np.dtype(self.dtype).itemsize)
        return need

    def _fail(self, item: Item, reason: str, results: list) -> None:
        """Report ``item`` failed with ``reason`` without relaxing it (further)."""
        if not item.begun:
            item.begun = True
            item.started_at = time.perf_counter()
            self.sink.begin(item.key, item.structure)
        s = item.structure
        result = RelaxResult(
            key=item.key,
            structure=s,
            status="failed",
            energy=float("nan"),
            fmax=float("nan"),
            steps=item.step_offset,
            forces=np.zeros((s.n_atoms, 3)),
            error=reason,
            wall_time=time.perf_counter() - item.started_at,
            stop_reason="out_of_memory",
        )
        self.sink.end(item.key, result)
        results.append(result)

    def _split_after_oom(self, chosen: list, queue: deque, results: list, exc) -> list:
        """The device ran out of memory starting a batch of ``chosen``: a structure alone
        fails with the reason; more go back to the queue, and batches from now on are bounded
        by half of what this one was estimated to need. Returns the new ``keep`` (none)."""
        if len(chosen) == 1:
            message = str(exc).strip().splitlines()[0][:300]
            self._fail(chosen[0], f"the device ran out of memory ({message})", results)
            return []
        self.memory_limit = max(1, self._bytes(chosen) // 2)
        queue.extendleft(reversed(chosen))  # running ones keep their state in the carry
        return []

    def _claimed(self, chosen: list, carry: dict) -> list:
        """``chosen`` without the new structures :attr:`claim` refuses."""
        kept = []
        for it in chosen:
            if it.key in carry or it.begun or self.claim(it.key):
                kept.append(it)
            else:
                self.passed_over.append(it.key)
        return kept

    def _retire(self, live: LiveBatch, finished: list, queue: deque, results: list, done: set):
        """Report finished systems; a converged one the hook sends back goes to the queue."""
        snap = self._with_final_stress(live, snapshot(live.state), finished)
        for k in finished:
            item = live.items[k]
            self.reporter.emit_final(item, live.layout, live.pbc, snap, k)
            result = self.reporter.result(item, live.layout, k, snap, self.settings.final_stress)
            if live.reference is not None:  # which strain components were free
                free = np.asarray(jax.device_get(live.reference.mask[k])) > 0
                result.extra["cell_mask"] = cell_options.mask_names(free)
            done.add(k)
            if self.after_converged is not None and result.status == "converged":
                again = self.after_converged(result, item.restarts, self.potential)
                if again is not None:
                    item.structure = again
                    item.step_offset = result.steps
                    item.restarts += 1
                    queue.appendleft(item)
                    continue
            self.sink.end(item.key, result)
            results.append(result)

    def _run_batch(self, live: LiveBatch, queue: deque, results: list):
        """Advance ``live`` until it should be repacked; returns (still running, carry)."""
        done: set = set()
        while True:
            waiting = self.clock()
            status = np.asarray(jax.device_get(live.state.status))
            # about the last chunk's device time: the host waited for it in ``_advance`` (for
            # its frame count) or here
            computed = self.clock() - waiting + live.waited_s
            live.waited_s = 0.0
            interrupt.check()  # a Ctrl-C acts here, between compiled chunks
            n_real = live.layout.n_real
            finished = [k for k in range(n_real) if status[k] != Status.RUNNING and k not in done]
            if finished:
                self._retire(live, finished, queue, results, done)
                if self.progress:
                    self.progress(len(results), len(results) + len(queue) + n_real - len(done))
            running = [k for k in range(n_real) if status[k] == Status.RUNNING]
            if not running:
                return [], {}
            # every chunk: the idle account counts each chunk's waste
            repack, live.idle = policy.should_repack(
                live.layout,
                [live.items[k].structure.n_atoms for k in running],
                bool(queue),
                len(done),
                computed,
                live.idle,
                self.idle_cost,
                lambda target, running=running: policy.compaction_cost(
                    target,
                    self.shapes_seen,
                    self.start_cost,
                    self.compaction_cost,
                    rows=0 if queue else self._rows_needed(live, running),
                    row_reuse=self.row_reuse,
                ),
            )
            if repack and (queue or live.compactable):
                return [live.items[k] for k in running], self._carry(live, running)
            try:
                self._advance(live)
            except Exception as exc:
                if not memory.out_of_memory(exc):
                    raise
                # its state went with the failed call (donated): what ran fails with the
                # reason, and later batches are bounded by half of this one's estimate
                self.memory_limit = max(1, self._bytes(live.items) // 2)
                message = str(exc).strip().splitlines()[0][:300]
                for k in running:
                    reason = f"the device ran out of memory during the relaxation ({message})"
                    self._fail(live.items[k], reason, results)
                return [], {}

    def _advance(self, live: LiveBatch, limit: int | None = None) -> None:
        """One compiled chunk of steps (``limit`` 0: only evaluate a pending move); its frames
        reported. When a move made neighbour lists stale, they are rebuilt and the move is
        evaluated at once, so that between calls every system's forces belong to its
        positions (a batch repacked now carries consistent states)."""
        dispatched = self.clock()
        state, frames, n_frames, stale = advance(
            live.state,
            live.batch,
            live.nbrs,
            self.potential,
            live.reference,
            self.targets,
            live.program,
            np.int32(live.program.chunk if limit is None else limit),  # (one type: no retrace)
        )
        launched = self.clock()
        if not live.advanced:  # its first regular call (``_launch`` traced the program)
            live.advanced = True
            live.setup_s += launched - dispatched
            kind = "new" if live.new_shape else "known"
            self.start_cost[kind] = max(self.start_cost.get(kind, 0.0), live.setup_s)
        live.state = state
        n = int(n_frames)  # waits for the chunk to finish on the device
        live.waited_s += self.clock() - launched
        if n and live.program.record:
            # fields as they are (dataclasses.asdict deep-copies: a device copy of every frame
            # buffer, and a compile per buffer shape)
            host_frames = jax.device_get(
                {f.name: getattr(frames, f.name) for f in dataclasses.fields(frames)}
            )
            host_frames = {k: v[:n] for k, v in host_frames.items()}
            final_status = jax.device_get(state.status)
            self.reporter.emit_buffer(
                live.items, live.layout, live.pbc, host_frames, n, final_status
            )
        stale = np.asarray(stale)
        if stale.any():
            self._rebuild(live, np.nonzero(stale)[0])
            self._advance(live, limit=0)

    def _rebuild(self, live: LiveBatch, systems: np.ndarray):
        positions = np.asarray(live.state.positions, np.float64)
        cells = np.asarray(live.state.cell, np.float64)
        old_shapes = live.nbrs_host.shapes
        host = self._host_lists(
            positions, cells, live.pbc, live.layout, previous=live.nbrs_host, systems=systems
        )
        if host.shapes != old_shapes:  # the lists grew: a program compiled before, if any
            seen = self._seen_shape(live.layout, host, same_systems=True)
            if seen is not None:
                host = host.with_rows(seen[1])
        live.nbrs_host, live.nbrs = host, host.to_device()
        if host.shapes != old_shapes:
            self._note_shape(live)


def relax_structures(
    items,
    potential: Potential,
    settings: EngineSettings,
    sink: Sink | None = None,
    progress=None,
    after_converged: AfterConverged | None = None,
) -> list[RelaxResult]:
    """Relax (key, Structure) pairs; results in completion order."""
    return Engine(potential, settings, sink, progress, after_converged).run(items)
