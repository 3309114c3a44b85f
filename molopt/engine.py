"""The relaxation engine: one jit boundary, and the host loop around it.

Inside jit (:func:`initial_state`, :func:`advance`): a bounded loop of up to ``chunk`` optimizer
steps over a padded batch of systems, each with its own optimizer state, step count and
status; it records every step's frame into a preallocated buffer and stops early when every
system has finished or some system's neighbour list has gone stale. No IO, no exceptions.

On the host (:func:`relax`): packing structures into bucketed batches, neighbour-list
(re)builds, handing frames to a sink (the trajectory writer), retiring finished systems and
refilling their places from the queue without recompiling.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from molopt import interrupt
from molopt import neighbors as nl
from molopt._jax import jax, relieve_mapping_pressure
from molopt.batch import Batch, Layout, pack, plan_layout, system_sum
from molopt.optimizers import OPTIMIZERS
from molopt.optimizers import cell as cellfilter
from molopt.optimizers.rows import Rows, field_axis
from molopt.potentials.base import PotentialMethods as Potential
from molopt.structure import Structure

RUNNING, CONVERGED, NOT_CONVERGED, FAILED = 0, 1, 2, 3
STATUS_NAMES = {CONVERGED: "converged", NOT_CONVERGED: "not_converged", FAILED: "failed"}


# =============================================================================================
# jitted core
# =============================================================================================


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RelaxState:
    """Everything that evolves. Rows: R = A atoms (+ 3S cell rows with a variable cell).

    ``x`` (R, 3) optimizer coordinates; ``positions`` (A, 3) A and ``cell`` (S, 3, 3) A;
    ``forces`` (A, 3) eV/A from the potential; ``generalized`` (R, 3) forces the optimizer
    sees (constraints applied; cell rows); ``energy`` (S,) eV; ``dE_dstrain`` (S, 3, 3) eV;
    ``fmax`` (S,) eV/A (ASE's, cell rows included); ``n_steps``/``status`` (S,) int32;
    ``completes`` (S,) whether the pending move is a full optimizer step; ``pending`` ()
    a move was made whose forces are not evaluated yet; ``opt`` the optimizer's state.
    """

    ROW_FIELDS = ("x", "generalized")
    ATOM_FIELDS = ("positions", "forces")

    x: jax.Array
    positions: jax.Array
    cell: jax.Array
    forces: jax.Array
    generalized: jax.Array
    energy: jax.Array
    dE_dstrain: jax.Array
    fmax: jax.Array
    n_steps: jax.Array
    status: jax.Array
    completes: jax.Array
    pending: jax.Array
    opt: Any


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Targets:
    """Convergence: ``fmax`` (eV/A, strict ``<`` as ASE) and ``max_steps`` per system."""

    fmax: jax.Array
    max_steps: jax.Array


@dataclass(frozen=True)
class Program:
    """Static configuration of the compiled computation (part of the cache key)."""

    optimizer: Any
    variable_cell: bool = False
    stress: bool = False
    chunk: int = 50
    record: bool = True  # keep every step's frame (else only the state: first/last frames)


def _rows(batch: Batch, program: Program) -> Rows:
    idx = batch.system_idx
    if program.variable_cell:
        cell_rows = jnp.repeat(jnp.arange(batch.n_systems, dtype=idx.dtype), 3)
        idx = jnp.concatenate([idx, cell_rows])
    return Rows(idx, batch.n_systems)


def _movable(batch: Batch, program: Program):
    movable = batch.atom_mask & ~batch.fixed
    if program.variable_cell:
        movable = jnp.concatenate([movable, jnp.repeat(batch.system_mask, 3)])
    return movable


def _physical(x, cell0, batch, program, reference):
    if program.variable_cell:
        return cellfilter.to_physical(x, batch.system_idx, reference)
    return x, cell0, None


def _evaluate(state: RelaxState, batch, nbrs, potential, program, reference, targets):
    """Forces etc. at ``state.x``; updates step counts and statuses of active systems."""
    rows = _rows(batch, program)
    positions, cell, F = _physical(state.x, state.cell, batch, program, reference)
    ev = potential.evaluate(positions, cell, batch, nbrs, program.stress or program.variable_cell)
    forces = jnp.where(batch.atom_mask[:, None], ev.forces, 0.0)
    constrained = jnp.where(batch.fixed[:, None], 0.0, forces)
    if program.variable_cell:
        generalized = cellfilter.generalized_forces(
            state.x, constrained, ev.dE_dstrain, cell, F, batch.system_idx, reference
        )
    else:
        generalized = constrained
    fmax = rows.max_norm(generalized)
    bad_rows = ~jnp.all(jnp.isfinite(generalized), axis=1)
    bad = (system_sum(bad_rows.astype(jnp.int32), rows.system_idx, batch.n_systems) > 0) | (
        ~jnp.isfinite(ev.energy)
    )
    running = (state.status == RUNNING) & batch.system_mask
    counted = running & state.completes
    n_steps = state.n_steps + (counted & state.pending).astype(jnp.int32)
    status = state.status
    status = jnp.where(running & bad, FAILED, status)
    status = jnp.where(counted & ~bad & (fmax < targets.fmax), CONVERGED, status)
    status = jnp.where(
        (status == RUNNING) & counted & (n_steps >= targets.max_steps), NOT_CONVERGED, status
    )
    updated = dataclasses.replace(
        state,
        positions=positions,
        cell=cell,
        forces=forces,
        generalized=generalized,
        energy=ev.energy,
        dE_dstrain=ev.dE_dstrain,
        fmax=fmax,
        n_steps=n_steps,
        status=status,
        pending=jnp.asarray(False),
    )
    # systems that were not running keep every evaluated quantity as it was
    return _keep_finished(updated, state, running, batch, program), counted


def _keep_finished(new: RelaxState, old: RelaxState, running, batch, program):
    atom_running = running[jnp.minimum(batch.system_idx, batch.n_systems - 1)]
    rows = _rows(batch, program)
    row_running = running[jnp.minimum(rows.system_idx, batch.n_systems - 1)]
    out = {}
    for name in ("positions", "forces", "generalized", "energy", "dE_dstrain", "fmax", "cell"):
        n, o = getattr(new, name), getattr(old, name)
        mask = {"positions": atom_running, "forces": atom_running, "generalized": row_running}.get(
            name, running
        )
        out[name] = jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
    return dataclasses.replace(new, **out)


@partial(jax.jit, static_argnames=("program",))
def initial_state(x, cell, batch, program: Program) -> RelaxState:
    """The state before step 0, nothing evaluated yet: ``pending``, with ``n_steps`` at -1
    so that the evaluation of the pending "move" (the first thing :func:`advance` does;
    ``limit`` 0 to do only that) counts it as step 0: converged already if fmax < target,
    "not converged" if max_steps is 0 (evaluate only). A program of its own this small
    costs next to nothing to trace and load; one that evaluated would trace the potential a
    second time (W1: 0.09 s of every warm run)."""
    n_rows = x.shape[0]
    dtype = x.dtype
    S = batch.n_systems
    return RelaxState(
        x=x,
        positions=x[: batch.n_padded_atoms],
        cell=cell,
        forces=jnp.zeros((batch.n_padded_atoms, 3), dtype),
        generalized=jnp.zeros((n_rows, 3), dtype),
        energy=jnp.zeros((S,), dtype),
        dE_dstrain=jnp.zeros((S, 3, 3), dtype),
        fmax=jnp.zeros((S,), dtype),
        n_steps=jnp.where(batch.system_mask, -1, 0).astype(jnp.int32),
        status=jnp.where(batch.system_mask, RUNNING, NOT_CONVERGED).astype(jnp.int32),
        completes=jnp.ones((S,), bool),
        pending=jnp.asarray(True),
        opt=program.optimizer.init(n_rows, S, dtype),
    )


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Frames:
    """Up to ``chunk`` recorded steps: ``positions``/``forces`` (k, A, 3); ``energy``,
    ``fmax``, ``step`` (k, S); ``cell``/``dE_dstrain`` (k, S, 3, 3); ``recorded`` (k, S)."""

    positions: jax.Array
    forces: jax.Array
    energy: jax.Array
    fmax: jax.Array
    step: jax.Array
    cell: jax.Array
    dE_dstrain: jax.Array
    recorded: jax.Array


def _empty_frames(state: RelaxState, k: int) -> Frames:
    def buf(a, dtype=None):
        return jnp.zeros((k,) + a.shape, dtype or a.dtype)

    return Frames(
        positions=buf(state.positions),
        forces=buf(state.forces),
        energy=buf(state.energy),
        fmax=buf(state.fmax),
        step=buf(state.n_steps),
        cell=buf(state.cell),
        dE_dstrain=buf(state.dE_dstrain),
        recorded=buf(state.status, bool),
    )


@partial(jax.jit, static_argnames=("program",), donate_argnames=("state",))
def advance(state: RelaxState, batch, nbrs, potential, reference, targets, program: Program, limit):
    """Run up to ``min(program.chunk, limit)`` steps (``limit`` a traced int: 0 only
    evaluates a pending move). Returns (state, frames, n_frames, stale (S,)).

    Each iteration moves every running system, then evaluates. When a system's neighbour
    list went stale with that move, the evaluation is discarded, the state is left
    ``pending`` and the loop stops: the host rebuilds the list and the next call evaluates
    first. No ``cond`` carries the big buffers (XLA would copy them every step).
    """
    rows = _rows(batch, program)
    movable = _movable(batch, program)[:, None]
    evaluated_fields = (
        "positions",
        "cell",
        "forces",
        "generalized",
        "energy",
        "dE_dstrain",
        "fmax",
        "n_steps",
        "status",
        "pending",
    )

    def record(frames: Frames, n, s: RelaxState, counted) -> Frames:
        if not program.record:
            return frames
        values = dict(
            positions=s.positions,
            forces=s.forces,
            energy=s.energy,
            fmax=s.fmax,
            step=s.n_steps,
            cell=s.cell,
            dE_dstrain=s.dE_dstrain,
            recorded=counted,
        )
        return Frames(**{k: getattr(frames, k).at[n].set(v) for k, v in values.items()})

    def finish_pending(args):
        s, frames = args
        s, counted = _evaluate(s, batch, nbrs, potential, program, reference, targets)
        return s, record(frames, 0, s, counted), jnp.asarray(1)

    def nothing_pending(args):
        s, frames = args
        return s, frames, jnp.asarray(0)

    def body(carry):
        s, frames, n, _ = carry
        active = (s.status == RUNNING) & batch.system_mask
        opt, dx, completes = program.optimizer.step(s.opt, s.x, s.generalized, active, rows)
        moved = dataclasses.replace(
            s,
            x=s.x + jnp.where(movable, dx, 0.0),
            opt=opt,
            pending=jnp.asarray(True),
            completes=completes,
        )
        positions, cell, _ = _physical(moved.x, s.cell, batch, program, reference)
        stale = (
            nl.stale_systems(
                positions, cell, batch.system_idx, batch.system_mask, nbrs, program.variable_cell
            )
            & active
        )
        ok = ~jnp.any(stale)
        evaluated, counted = _evaluate(moved, batch, nbrs, potential, program, reference, targets)
        s = dataclasses.replace(
            moved,
            **{
                name: jnp.where(ok, getattr(evaluated, name), getattr(moved, name))
                for name in evaluated_fields
            },
        )
        frames = record(frames, n, s, counted & ok)
        return s, frames, n + ok.astype(n.dtype), stale

    def keep_going(carry):
        s, _, n, stale = carry
        running = jnp.any((s.status == RUNNING) & batch.system_mask)
        return (n < jnp.minimum(program.chunk, limit)) & running & ~jnp.any(stale)

    frames = _empty_frames(state, program.chunk if program.record else 1)
    state, frames, n0 = jax.lax.cond(
        state.pending, finish_pending, nothing_pending, (state, frames)
    )
    stale0 = jnp.zeros((batch.n_systems,), bool)
    state, frames, n_frames, stale = jax.lax.while_loop(
        keep_going, body, (state, frames, n0, stale0)
    )
    return state, frames, n_frames, stale


@partial(jax.jit, static_argnames=("stress",))
def evaluate_once(positions, cell, batch, nbrs, potential, stress: bool):
    """Plain energy/forces(/dE_dstrain) of a packed batch (for final results, the API)."""
    return potential.evaluate(positions, cell, batch, nbrs, stress)


# =============================================================================================
# host side
# =============================================================================================


@dataclass(frozen=True)
class EngineSettings:
    """How to relax: optimizer name and options, fmax (eV/A), max steps, variable cell and
    pressure (eV/A^3), precision, neighbour skin (A), steps per jit call, batch limits, and
    the trajectory sampling interval (0: first and last frames only)."""

    optimizer: str = "fire"
    optimizer_options: tuple = ()
    fmax: float = 0.05
    steps: int = 10_000
    relax_cell: bool = False
    pressure: float = 0.0
    precision: str = "float64"
    skin: float = 1.0
    chunk: int = 64
    batch_size: int = 1024
    max_batch_atoms: int = 32_768
    trajectory_interval: int = 1
    final_stress: bool = True
    check_hessian: bool = False
    saddle_threshold: float = -1e-4  # eV/A^2: lower curvature means a saddle point
    max_restarts: int = 5

    @property
    def dtype(self):
        return np.float64 if self.precision == "float64" else np.float32

    def make_optimizer(self):
        cls = OPTIMIZERS[self.optimizer]
        return cls(**dict(self.optimizer_options))


@dataclass
class RelaxResult:
    """What happened to one structure. ``structure`` is the final geometry."""

    key: Any
    structure: Structure
    status: str
    energy: float
    fmax: float
    steps: int
    forces: np.ndarray
    stress: np.ndarray | None = None  # (3, 3) eV/A^3, periodic systems only
    initial_energy: float = float("nan")
    error: str | None = None
    wall_time: float = 0.0
    extra: dict = field(default_factory=dict)


class Sink(Protocol):
    """Receives trajectory frames and results (the CLI writes H5MD/extxyz from these)."""

    def begin(self, key, structure: Structure) -> None: ...

    def frames(self, key, block: dict[str, np.ndarray]) -> None: ...

    def end(self, key, result: RelaxResult) -> None: ...


class NullSink:
    def begin(self, key, structure):
        pass

    def frames(self, key, block):
        pass

    def end(self, key, result):
        pass


@dataclass
class _Item:
    key: Any
    structure: Structure
    started_at: float = 0.0
    initial_energy: float = float("nan")
    last_written_step: int = -1
    begun: bool = False
    step_offset: int = 0  # steps taken before a restart (saddle-point escape)
    restarts: int = 0


@dataclass
class _Live:
    """One batch on the device."""

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
    # programs in ``_launch``, and the first regular ``advance`` call's dispatch) and whether
    # its shape was new; the device time spent since it became sparse that a compacted batch
    # would have saved, and the fraction it would save now (see ``Engine._should_repack``)
    setup_s: float = 0.0
    new_shape: bool = True
    wasted_s: float = 0.0
    idle_fraction: float = 0.0
    advanced: bool = False


def _cast_potential(potential: Potential, dtype):
    def cast(a):
        if isinstance(a, jax.Array | np.ndarray) and jnp.issubdtype(a.dtype, jnp.floating):
            return jax.device_put(np.asarray(a, dtype))
        return a

    return jax.tree.map(cast, potential)


class Engine:
    """Host loop. ``relax(items)`` with ``items`` a sequence of (key, Structure)."""

    def __init__(
        self,
        potential: Potential,
        settings: EngineSettings,
        sink: Sink | None = None,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.settings = settings
        self.dtype = settings.dtype
        self.potential = _cast_potential(potential, self.dtype)
        self.sink = sink or NullSink()
        self.progress = progress
        optimizer = settings.make_optimizer()
        self.program = Program(
            optimizer=optimizer,
            variable_cell=settings.relax_cell,
            stress=settings.relax_cell,
            chunk=settings.chunk,
        )
        self.targets = Targets(
            fmax=jax.device_put(np.asarray(settings.fmax, self.dtype)),
            max_steps=jax.device_put(np.asarray(settings.steps, np.int32)),
        )
        self.compiles = 0
        self.shapes_seen: set = set()
        #: seconds a compaction is taken to cost; None: measured (``_compaction_cost``)
        self.compaction_cost: float | None = None
        #: the most starting a batch has cost, by whether its shape was new to this engine (a
        #: new shape traces and compiles, or loads, its programs; a known one only packs)
        self.start_cost: dict = {}
        self.clock = time.perf_counter  # for the compaction policy's timings

    # -- batching --------------------------------------------------------------------------
    def _take(self, queue: deque, keep: list) -> list:
        """Systems for the next batch: ``keep`` (still running) plus queued ones that fit."""
        s = self.settings
        chosen = list(keep)
        atoms = sum(it.structure.n_atoms for it in chosen)
        periodic = chosen[0].structure.pbc.any() if chosen else None
        while queue and len(chosen) < s.batch_size:
            n = queue[0].structure.n_atoms
            if chosen and atoms + n > s.max_batch_atoms:
                break
            if periodic is not None and bool(queue[0].structure.pbc.any()) != periodic:
                break  # molecules and crystals in separate batches (neighbour capacity)
            periodic = bool(queue[0].structure.pbc.any())
            chosen.append(queue.popleft())
            atoms += n
        return chosen

    def _pack(self, items: list) -> tuple:
        structures = [it.structure for it in items]
        species = {}
        for st in structures:
            species.update(self.potential.species_of(st.numbers))
        layout = plan_layout([st.n_atoms for st in structures])
        batch, positions, cells, layout = pack(structures, species, self.dtype, layout)
        if self.program.variable_cell:
            for k in range(layout.n_real, layout.n_systems):
                cells[k] = np.eye(3)
        return batch, positions, cells, layout

    def _neighbors(self, positions, cells, pbc, layout, previous=None, systems=None):
        host = nl.build(
            np.asarray(positions, np.float64),
            np.asarray(cells, np.float64),
            pbc,
            layout,
            self.potential.cutoff,
            self.settings.skin,
            previous=previous,
            systems=systems,
            ghosts=getattr(self.potential, "uses_ghosts", False),
        )
        host.ref_positions = host.ref_positions.astype(self.dtype)
        host.ref_cell = host.ref_cell.astype(self.dtype)
        return host, host.to_device()

    def _reference(self, cells, layout: Layout, batch: Batch):
        if not self.program.variable_cell:
            return None
        factor = np.ones(layout.n_systems, self.dtype)
        factor[: layout.n_real] = np.diff(layout.offsets)
        return cellfilter.CellReference(
            cell=jax.device_put(np.asarray(cells, self.dtype)),
            factor=jax.device_put(factor),
            pressure=jax.device_put(np.asarray(self.settings.pressure, self.dtype)),
        )

    def _coordinates(self, positions, layout):
        if not self.program.variable_cell:
            return positions
        return np.concatenate([positions, np.zeros((3 * layout.n_systems, 3), self.dtype)])

    def _note_shape(self, live: _Live) -> bool:
        """Count a new shape (a compilation); whether it was new."""
        key = (
            live.layout.n_padded_atoms,
            live.layout.n_systems,
            live.nbrs_host.shapes,
            live.nbrs.shift.shape[0],
        )
        if key in self.shapes_seen:
            return False
        self.shapes_seen.add(key)
        self.compiles += 1
        return True

    def _launch(self, items: list, carry: dict | None = None) -> _Live:
        """Pack ``items`` into a new batch; continuing systems keep their state (``carry``)."""
        batch, positions, cells, layout = self._pack(items)
        pbc = np.asarray(batch.pbc)
        if carry:
            # continuing systems: current geometry (and variable-cell coordinates)
            for k, it in enumerate(items):
                if it.key in carry:
                    rows = layout.atoms_of(k)
                    positions[rows] = carry[it.key]["positions"]
                    cells[k] = carry[it.key]["cell"]
        reference_cells = cells.copy()
        if carry and self.program.variable_cell:
            for k, it in enumerate(items):
                if it.key in carry:
                    reference_cells[k] = carry[it.key]["reference_cell"]
        host, nbrs = self._neighbors(positions, cells, pbc, layout)
        reference = self._reference(reference_cells, layout, batch)
        x = self._coordinates(positions, layout)
        if carry and self.program.variable_cell:
            for k, it in enumerate(items):
                if it.key in carry:
                    rows = layout.atoms_of(k)
                    x[rows] = carry[it.key]["x_atoms"]
                    base = layout.n_padded_atoms + 3 * k
                    x[base : base + 3] = carry[it.key]["x_cell"]
        record = self.settings.trajectory_interval != 0
        program = dataclasses.replace(
            self.program,
            chunk=(
                chunk_for(layout.n_padded_atoms, self.settings.chunk)
                if record
                else self.settings.chunk
            ),
            record=record,
        )
        state = initial_state(jax.device_put(x), jax.device_put(cells), batch, program)
        # step 0: the evaluation of the pending initial state, and no step after it
        state, _, _, _ = advance(
            state, batch, nbrs, self.potential, reference, self.targets, program, np.int32(0)
        )
        if carry:
            state = self._restore(state, items, layout, carry)
        live = _Live(items, layout, batch, host, nbrs, reference, state, program, cells, pbc)
        live.new_shape = self._note_shape(live)
        return live

    # -- state transplant for continuing systems --------------------------------------------
    def _extract(self, live: _Live, k: int, st: RelaxState) -> dict:
        """Host copy of everything system ``k`` of ``live`` carries into another batch
        (``st``: the batch's state, already on the host)."""
        layout = live.layout
        rows = layout.atoms_of(k)
        A = layout.n_padded_atoms
        cell_rows = slice(A + 3 * k, A + 3 * k + 3)
        out = {
            "positions": st.positions[rows],
            "cell": st.cell[k],
            "reference_cell": np.asarray(live.reference.cell[k]) if live.reference else None,
            "x_atoms": st.x[rows],
            "x_cell": st.x[cell_rows] if self.program.variable_cell else None,
            "state": {},
        }
        for name in ("forces", "positions"):
            out["state"][name] = getattr(st, name)[rows]
        for name in ("x", "generalized"):
            a = getattr(st, name)
            out["state"][name] = (a[rows], a[cell_rows] if self.program.variable_cell else None)
        for name in ("cell", "energy", "dE_dstrain", "fmax", "n_steps", "status", "completes"):
            out["state"][name] = getattr(st, name)[k]
        opt = st.opt
        out["opt"] = {}
        cell_index = np.arange(cell_rows.start, cell_rows.stop)
        for f in dataclasses.fields(opt):
            a = getattr(opt, f.name)
            kind, axis = field_axis(type(opt), f.name)
            if kind == "row":
                atoms = np.take(a, np.arange(rows.start, rows.stop), axis=axis)
                cells = np.take(a, cell_index, axis=axis) if self.program.variable_cell else None
                out["opt"][f.name] = (atoms, cells)
            else:
                out["opt"][f.name] = np.take(a, k, axis=axis)
        canonical = getattr(self.program.optimizer, "canonical", None)
        if canonical is not None:  # e.g. rotate L-BFGS's ring to the start of a new batch
            out["opt"] = canonical(out["opt"])
        return out

    def _restore(self, state: RelaxState, items, layout: Layout, carry: dict) -> RelaxState:
        st = jax.device_get(state)
        A = layout.n_padded_atoms
        fields = {
            f.name: np.array(getattr(st, f.name))
            for f in dataclasses.fields(st)
            if f.name not in ("opt", "pending")
        }
        opt_fields = {f.name: np.array(getattr(st.opt, f.name)) for f in dataclasses.fields(st.opt)}
        for k, it in enumerate(items):
            if it.key not in carry:
                continue
            saved = carry[it.key]
            rows = layout.atoms_of(k)
            cell_rows = slice(A + 3 * k, A + 3 * k + 3)
            for name, value in saved["state"].items():
                if name in RelaxState.ROW_FIELDS:
                    fields[name][rows] = value[0]
                    if value[1] is not None:
                        fields[name][cell_rows] = value[1]
                elif name in RelaxState.ATOM_FIELDS:
                    fields[name][rows] = value
                else:
                    fields[name][k] = value
            for name, value in saved["opt"].items():
                kind, axis = field_axis(type(st.opt), name)
                target = np.moveaxis(opt_fields[name], axis, 0)  # a view: writes go through
                if kind == "row":
                    target[rows] = np.moveaxis(value[0], axis, 0)
                    if value[1] is not None:
                        target[cell_rows] = np.moveaxis(value[1], axis, 0)
                else:
                    target[k] = value
        opt = type(st.opt)(**{k: jax.device_put(v) for k, v in opt_fields.items()})
        return RelaxState(
            **{k: jax.device_put(v) for k, v in fields.items()},
            pending=jax.device_put(np.asarray(False)),
            opt=opt,
        )

    # -- results -----------------------------------------------------------------------------
    def _system_block(self, live: _Live, frames: dict, n: int, k: int) -> dict | None:
        recorded = frames["recorded"][:n, k]
        if not recorded.any():
            return None
        t = np.nonzero(recorded)[0]
        rows = live.layout.atoms_of(k)
        block = {
            "step": frames["step"][t, k],
            "positions": frames["positions"][t, rows],
            "forces": frames["forces"][t, rows],
            "energy": frames["energy"][t, k],
            "fmax": frames["fmax"][t, k],
        }
        if self.program.variable_cell or live.pbc[k].any():
            block["cell"] = frames["cell"][t, k]
        if self.program.variable_cell:
            volume = np.abs(np.linalg.det(block["cell"]))
            block["stress"] = frames["dE_dstrain"][t, k] / volume[:, None, None]
        return block

    def _emit(self, item: _Item, block: dict, final: bool):
        """Frames to the sink, sampled every ``trajectory_interval`` steps (the last frame of
        a finished system always)."""
        interval = self.settings.trajectory_interval
        block = dict(block, step=block["step"] + item.step_offset)
        steps = block["step"]
        if interval <= 0:
            keep = steps == 0
        else:
            keep = (steps % interval) == 0
        if final:
            keep[-1] = True
        keep &= steps > item.last_written_step
        if keep.any():
            self.sink.frames(item.key, {k: v[keep] for k, v in block.items()})
            item.last_written_step = int(steps[keep][-1])

    @staticmethod
    def _snapshot(live: _Live):
        """The evaluated quantities of every system, on the host (not the optimizer state)."""
        st = live.state
        names = ("positions", "forces", "energy", "fmax", "n_steps", "status", "cell", "dE_dstrain")
        values = jax.device_get(tuple(getattr(st, n) for n in names))
        return SimpleNamespace(**dict(zip(names, values, strict=True)))

    def _state_block(self, live: _Live, st, k: int) -> dict:
        frames = {
            "positions": st.positions[None],
            "forces": st.forces[None],
            "energy": st.energy[None],
            "fmax": st.fmax[None],
            "step": st.n_steps[None],
            "cell": st.cell[None],
            "dE_dstrain": st.dE_dstrain[None],
            "recorded": np.ones((1, live.layout.n_systems), bool),
        }
        return self._system_block(live, frames, 1, k)

    def _initial_frames(self, live: _Live, fresh: set):
        st = self._snapshot(live)
        frames = {
            "positions": st.positions[None],
            "forces": st.forces[None],
            "energy": st.energy[None],
            "fmax": st.fmax[None],
            "step": st.n_steps[None],
            "cell": st.cell[None],
            "dE_dstrain": st.dE_dstrain[None],
            "recorded": np.ones((1, live.layout.n_systems), bool),
        }
        for k, item in enumerate(live.items):
            if item.key in fresh:
                block = self._system_block(live, frames, 1, k)
                if item.step_offset == 0:
                    item.initial_energy = float(block["energy"][0])
                self._emit(item, block, final=int(st.status[k]) != RUNNING)

    def _finish(self, live: _Live, k: int, st) -> RelaxResult:
        item = live.items[k]
        rows = live.layout.atoms_of(k)
        code = int(st.status[k])
        structure = item.structure.with_positions(
            np.asarray(st.positions[rows], np.float64), np.asarray(st.cell[k], np.float64)
        )
        stress = None
        if code != FAILED and structure.pbc.all() and self.settings.final_stress:
            # with a fixed cell the loop does not compute dE/dstrain: the snapshot then holds
            # one evaluation with stress for every system finishing at this boundary
            stress = np.asarray(st.dE_dstrain[k], np.float64) / structure.volume
        error = None
        if code == FAILED:
            error = "energy or forces became non-finite (NaN/inf): the structure exploded"
        result = RelaxResult(
            key=item.key,
            structure=structure,
            status=STATUS_NAMES.get(code, "not_converged"),
            energy=float(st.energy[k]),
            fmax=float(st.fmax[k]),
            steps=int(st.n_steps[k]) + item.step_offset,
            forces=np.asarray(st.forces[rows], np.float64),
            stress=stress,
            initial_energy=item.initial_energy,
            error=error,
            wall_time=time.perf_counter() - item.started_at,
        )
        return result

    def _check_curvature(self, item: _Item, result: RelaxResult):
        """Lowest Hessian eigenvalue at a converged structure (recorded in the result). On
        negative curvature, the item displaced along that mode for another relaxation."""
        from molopt.differentiable import lowest_modes

        values, vectors = lowest_modes(result.structure, self.potential, k=1)
        lowest = float(values[0])
        result.extra["lowest_eigenvalue"] = lowest
        result.extra["restarts"] = item.restarts
        if lowest >= self.settings.saddle_threshold or item.restarts >= self.settings.max_restarts:
            return None
        mode = vectors[:, 0].reshape(-1, 3)
        mode = mode / np.abs(np.linalg.norm(mode, axis=1)).max()  # largest atom move: 1 A
        mode[result.structure.fixed] = 0.0
        # a saddle can be very flat: step along the mode to the lowest of a few trial points
        # (largest atom move 0.05 to 1.6 A, both directions) so the relaxation has forces
        trials = [
            result.structure.with_positions(result.structure.positions + sign * d * mode)
            for d in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
            for sign in (1.0, -1.0)
        ]
        energies = [e for e, _, _ in evaluate(trials, self.potential, stress=False)]
        best = int(np.argmin(energies))
        item.structure = trials[best]
        item.step_offset = result.steps
        item.restarts += 1
        return item

    def _with_final_stress(self, live: _Live, snapshot, finished: list):
        """Fill ``snapshot.dE_dstrain`` for finished periodic systems (one evaluation)."""
        if self.program.variable_cell or not self.settings.final_stress:
            return snapshot
        if not any(live.items[k].structure.pbc.all() for k in finished):
            return snapshot
        ev = evaluate_once(
            live.state.positions, live.state.cell, live.batch, live.nbrs, self.potential, True
        )
        snapshot.dE_dstrain = np.asarray(jax.device_get(ev.dE_dstrain))
        return snapshot

    # -- the loop ----------------------------------------------------------------------------
    def relax(self, items: Sequence[tuple[Any, Structure]]) -> list[RelaxResult]:
        relieve_mapping_pressure()
        # structures with periodic images need many more neighbour slots than molecules:
        # batching them apart keeps the padded neighbour capacity small for each
        ordered = sorted(items, key=lambda item: (not item[1].pbc.any(), -item[1].n_atoms))
        queue = deque(_Item(key, s) for key, s in ordered)
        total = len(queue)
        results: list[RelaxResult] = []
        live: _Live | None = None
        carry: dict = {}
        keep: list = []
        while queue or keep:
            interrupt.check()
            chosen = self._take(queue, keep)
            fresh = {it.key for it in chosen if it.key not in carry}
            now = time.perf_counter()
            for it in chosen:
                if it.key in fresh and not it.begun:
                    it.started_at = now
                    it.begun = True
                    self.sink.begin(it.key, it.structure)
            began = self.clock()
            live = self._launch(chosen, carry)
            live.setup_s = self.clock() - began
            self._initial_frames(live, fresh)
            keep, carry = self._run_batch(live, queue, results)
            if self.progress:
                self.progress(len(results), total)
        return results

    def _run_batch(self, live: _Live, queue: deque, results: list):
        """Advance ``live`` until it should be repacked; returns (still running, carry)."""
        done: set = set()
        while True:
            waiting = self.clock()
            status = np.asarray(jax.device_get(live.state.status))
            computed = self.clock() - waiting  # about the last chunk's device time
            interrupt.check()  # a Ctrl-C acts here, between compiled chunks
            finished = [
                k for k in range(live.layout.n_real) if status[k] != RUNNING and k not in done
            ]
            if finished:
                snapshot = self._with_final_stress(live, self._snapshot(live), finished)
                for k in finished:
                    item = live.items[k]
                    # the final frame is always written (from the state, not the frame buffer)
                    self._emit(item, self._state_block(live, snapshot, k), final=True)
                    result = self._finish(live, k, snapshot)
                    if self.settings.check_hessian and result.status == "converged":
                        escaped = self._check_curvature(item, result)
                        if escaped is not None:  # a saddle point: relax again, displaced
                            queue.appendleft(escaped)
                            done.add(k)
                            continue
                    self.sink.end(item.key, result)
                    results.append(result)
                    done.add(k)
                if self.progress:
                    self.progress(
                        len(results), len(results) + len(queue) + live.layout.n_real - len(done)
                    )
            running = [k for k in range(live.layout.n_real) if status[k] == RUNNING]
            if not running:
                return [], {}
            if (finished or not queue) and self._should_repack(
                live, running, queue, done, computed
            ):
                host_state = jax.device_get(live.state)
                carry = {live.items[k].key: self._extract(live, k, host_state) for k in running}
                return [live.items[k] for k in running], carry
            dispatched = self.clock()
            state, frames, n_frames, stale = advance(
                live.state,
                live.batch,
                live.nbrs,
                self.potential,
                live.reference,
                self.targets,
                live.program,
                np.int32(live.program.chunk),  # (one type for every limit: no retrace)
            )
            if not live.advanced:  # its first regular call (``_launch`` traced the program)
                live.advanced = True
                live.setup_s += self.clock() - dispatched
                kind = "new" if live.new_shape else "known"
                self.start_cost[kind] = max(self.start_cost.get(kind, 0.0), live.setup_s)
            live.state = state
            n = int(n_frames)
            if n and live.program.record:
                # fields as they are (dataclasses.asdict deep-copies: a device copy of
                # every frame buffer, and a compile per buffer shape)
                host_frames = jax.device_get(
                    {f.name: getattr(frames, f.name) for f in dataclasses.fields(frames)}
                )
                host_frames = {k: v[:n] for k, v in host_frames.items()}
                final_status = jax.device_get(state.status)
                for k, item in enumerate(live.items):
                    block = self._system_block(live, host_frames, n, k)
                    if block is not None:
                        self._emit(item, block, final=int(final_status[k]) != RUNNING)
            stale = np.asarray(stale)
            if stale.any():
                self._rebuild(live, np.nonzero(stale)[0])

    def _should_repack(
        self, live: _Live, running: list, queue: deque, done: set, computed: float
    ) -> bool:
        """Refill when a quarter of the batch is free and structures wait. With none waiting,
        compact (a smaller bucket) once three quarters are idle *and* the device time this
        sparse batch has wasted since (``computed`` per chunk, times the fraction of the
        padded atoms a compacted batch would drop) has reached what starting the compacted
        batch costs: rent or buy, never more than twice the better of the two choices. A
        short tail then finishes where it is (W3, 256 clusters: warm 5.5 -> 5.0-5.2 s, cold
        8.2 -> 6.0-6.3 s: no second and third program), and a long one still moves."""
        A = live.layout.n_padded_atoms
        sizes = [live.items[k].structure.n_atoms for k in running]
        atoms = sum(sizes)
        if queue:
            free_atoms = A - atoms
            return free_atoms >= A // 4 or len(done) >= max(1, live.layout.n_systems // 4)
        target = plan_layout(sizes)
        smaller = target.n_padded_atoms
        sparse = smaller <= A // 4 or (
            len(running) <= live.layout.n_systems // 4 and live.layout.n_systems > 4
        )
        # the chunk just computed ran at the idle fraction seen when it was launched
        live.wasted_s += computed * live.idle_fraction
        live.idle_fraction = max(0.0, 1.0 - smaller / A) if sparse else 0.0
        if not sparse:
            return False
        return live.wasted_s >= self._compaction_cost(target)

    def _compaction_cost(self, target: Layout) -> float:
        """Seconds a move to a batch of layout ``target`` is expected to cost: the most a
        start of a batch of a new shape has cost this engine, or, when the compacted shape
        has run before, the most a start of a known shape has."""
        if self.compaction_cost is not None:
            return self.compaction_cost
        known = any(k[:2] == (target.n_padded_atoms, target.n_systems) for k in self.shapes_seen)
        if known and "known" in self.start_cost:
            return self.start_cost["known"]
        return self.start_cost.get("new", 0.0)

    def _rebuild(self, live: _Live, systems: np.ndarray):
        positions = np.asarray(live.state.positions, np.float64)
        cells = np.asarray(live.state.cell, np.float64)
        old_shapes = live.nbrs_host.shapes
        live.nbrs_host, live.nbrs = self._neighbors(
            positions, cells, live.pbc, live.layout, previous=live.nbrs_host, systems=systems
        )
        if live.nbrs_host.shapes != old_shapes:
            self._note_shape(live)


def relax(
    items, potential: Potential, settings: EngineSettings, sink: Sink | None = None, progress=None
) -> list[RelaxResult]:
    """Relax (key, Structure) pairs; results in completion order."""
    return Engine(potential, settings, sink, progress).relax(items)


def chunk_for(n_atoms: int, requested: int) -> int:
    """Steps per jit call so that the frame buffer stays under ~256 MB."""
    per_step = max(n_atoms, 1) * 3 * 8 * 2
    return int(max(1, min(requested, 2 ** math.floor(math.log2(max(1, 2**28 // per_step))))))


def evaluate(
    structures: Sequence[Structure],
    potential: Potential,
    stress: bool = True,
    precision: str = "float64",
    skin: float = 0.0,
):
    """Energy (eV), forces (n, 3) eV/A and stress (3, 3) eV/A^3 (None unless periodic in all
    directions) of each structure, evaluated together in one padded batch."""
    dtype = np.float64 if precision == "float64" else np.float32
    potential = _cast_potential(potential, dtype)
    species = {}
    for st in structures:
        species.update(potential.species_of(st.numbers))
    batch, positions, cells, layout = pack(list(structures), species, dtype)
    host = nl.build(
        np.asarray(positions, np.float64),
        np.asarray(cells, np.float64),
        np.asarray(batch.pbc),
        layout,
        potential.cutoff,
        max(skin, 1e-9),
    )
    host.ref_positions = host.ref_positions.astype(dtype)
    host.ref_cell = host.ref_cell.astype(dtype)
    ev = jax.device_get(
        evaluate_once(
            jax.device_put(positions),
            jax.device_put(cells),
            batch,
            host.to_device(),
            potential,
            stress,
        )
    )
    out = []
    for k, st in enumerate(structures):
        rows = layout.atoms_of(k)
        s = None
        if stress and st.pbc.all():
            s = np.asarray(ev.dE_dstrain[k], np.float64) / st.volume
        out.append((float(ev.energy[k]), np.asarray(ev.forces[rows], np.float64), s))
    return out
