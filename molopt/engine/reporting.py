"""What a relaxation reports: trajectory frames (sampled every ``trajectory_interval``
steps, the last frame of a finished system always) and one :class:`RelaxResult` per
structure, handed to a :class:`Sink` (the CLI's writes H5MD and extxyz from them)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np

from molopt._jax import jax
from molopt.engine.state import Status
from molopt.structure import Structure

#: the names of the evaluated quantities a frame holds, as in :class:`RelaxState`
FRAME_FIELDS = ("positions", "forces", "energy", "fmax", "n_steps", "status", "cell", "dE_dstrain")


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
    #: converged, step_limit, non_finite or exploded (:attr:`Status.stop_reason`)
    stop_reason: str = ""


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
class Item:
    """One structure's bookkeeping while it relaxes (across batches and restarts)."""

    key: Any
    structure: Structure
    started_at: float = 0.0
    initial_energy: float = float("nan")
    last_written_step: int = -1
    begun: bool = False
    step_offset: int = 0  # steps taken before a restart (a hook's new start)
    restarts: int = 0


def snapshot(state) -> SimpleNamespace:
    """The evaluated quantities of every system of a batch's state, on the host (not the
    optimizer state)."""
    values = jax.device_get(tuple(getattr(state, n) for n in FRAME_FIELDS))
    return SimpleNamespace(**dict(zip(FRAME_FIELDS, values, strict=True)))


def one_frame(st, n_systems: int) -> dict:
    """A snapshot as a one-step frame buffer (host arrays)."""
    return {
        "positions": st.positions[None],
        "forces": st.forces[None],
        "energy": st.energy[None],
        "fmax": st.fmax[None],
        "step": st.n_steps[None],
        "cell": st.cell[None],
        "dE_dstrain": st.dE_dstrain[None],
        "recorded": np.ones((1, n_systems), bool),
    }


class Reporter:
    """Cuts each system's frames out of a batch's step buffer, samples them and hands them
    to the sink; assembles results."""

    def __init__(self, sink: Sink, trajectory_interval: int, variable_cell: bool):
        self.sink = sink
        self.interval = trajectory_interval
        self.variable_cell = variable_cell

    def system_block(self, layout, pbc, frames: dict, n: int, k: int) -> dict | None:
        """System ``k``'s recorded steps among the first ``n`` of a (host) step buffer."""
        recorded = frames["recorded"][:n, k]
        if not recorded.any():
            return None
        t = np.nonzero(recorded)[0]
        if t[-1] - t[0] + 1 == len(t):  # every step recorded (the default): one copy, below
            t = slice(int(t[0]), int(t[-1]) + 1)
        rows = layout.atoms_of(k)
        # the block outlives the host buffer (a writer thread may hold it): copies of its own
        block = {
            "step": np.array(frames["step"][t, k]),
            "positions": np.array(frames["positions"][t, rows]),
            "forces": np.array(frames["forces"][t, rows]),
            "energy": np.array(frames["energy"][t, k]),
            "fmax": np.array(frames["fmax"][t, k]),
        }
        if self.variable_cell or pbc[k].any():
            block["cell"] = np.array(frames["cell"][t, k])
        if self.variable_cell:
            volume = np.abs(np.linalg.det(block["cell"]))
            block["stress"] = frames["dE_dstrain"][t, k] / volume[:, None, None]
        return block

    def emit(self, item: Item, block: dict, final: bool) -> None:
        """Frames to the sink, sampled every ``trajectory_interval`` steps (the last frame of
        a finished system always)."""
        block = dict(block, step=block["step"] + item.step_offset)
        steps = block["step"]
        if self.interval <= 0:
            keep = steps == 0
        else:
            keep = (steps % self.interval) == 0
        if final:
            keep[-1] = True
        keep &= steps > item.last_written_step
        if keep.all():
            self.sink.frames(item.key, block)
            item.last_written_step = int(steps[-1])
        elif keep.any():
            self.sink.frames(item.key, {k: v[keep] for k, v in block.items()})
            item.last_written_step = int(steps[keep][-1])

    def emit_buffer(self, items, layout, pbc, frames: dict, n: int, status) -> None:
        """Every system's frames from the first ``n`` steps of a host step buffer."""
        for k, item in enumerate(items):
            block = self.system_block(layout, pbc, frames, n, k)
            if block is not None:
                self.emit(item, block, final=int(status[k]) != Status.RUNNING)

    def emit_initial(self, items, layout, pbc, st, fresh: set) -> None:
        """Step 0 of the systems that start in this batch (``fresh`` keys)."""
        frames = one_frame(st, layout.n_systems)
        for k, item in enumerate(items):
            if item.key in fresh:
                block = self.system_block(layout, pbc, frames, 1, k)
                if item.step_offset == 0:
                    item.initial_energy = float(block["energy"][0])
                self.emit(item, block, final=int(st.status[k]) != Status.RUNNING)

    def emit_final(self, item: Item, layout, pbc, st, k: int) -> None:
        """The final frame of finished system ``k``, from the state (not the step buffer)."""
        self.emit(item, self.system_block(layout, pbc, one_frame(st, layout.n_systems), 1, k), True)

    @staticmethod
    def result(item: Item, layout, k: int, st, final_stress: bool) -> RelaxResult:
        """The result of finished system ``k`` from a snapshot ``st`` of its batch."""
        rows = layout.atoms_of(k)
        code = Status(int(st.status[k]))
        structure = item.structure.with_positions(
            np.asarray(st.positions[rows], np.float64), np.asarray(st.cell[k], np.float64)
        )
        stress = None
        if code.label != "failed" and structure.pbc.all() and final_stress:
            # with a fixed cell the loop does not compute dE/dstrain: the snapshot then holds
            # one evaluation with stress for every system finishing at this boundary
            stress = np.asarray(st.dE_dstrain[k], np.float64) / structure.volume
        error = None
        if code == Status.FAILED:
            error = "energy or forces became non-finite (NaN/inf): the structure exploded"
        elif code == Status.EXPLODED:
            per_atom = float(st.energy[k]) / structure.n_atoms
            error = (
                f"the energy fell to {per_atom:.4g} eV/atom, past any physical value: the "
                "structure exploded (the potential is outside what it describes); stopped early"
            )
        return RelaxResult(
            key=item.key,
            structure=structure,
            status=code.label,
            stop_reason=code.stop_reason,
            energy=float(st.energy[k]),
            fmax=float(st.fmax[k]),
            steps=int(st.n_steps[k]) + item.step_offset,
            forces=np.asarray(st.forces[rows], np.float64),
            stress=stress,
            initial_energy=item.initial_energy,
            error=error,
            wall_time=time.perf_counter() - item.started_at,
        )
