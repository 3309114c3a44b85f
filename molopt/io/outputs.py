"""The outputs of ``molopt relax``: each structure's H5MD trajectory and relaxed extxyz, and
its JSON record, written from what the engine reports (an engine ``Sink``).

Nothing is half-written: files are written under temporary names and renamed into place, the
trajectory last (its presence marks a finished structure). A write error fails that structure
alone, with the reason, and leaves nothing of it; an error that every later write would meet
too (disk full, quota, read-only filesystem) stops the run: the sink raises
:class:`OutputsUnwritable` to the engine's loop, and every structure not yet written gets a
``failed`` record saying why, so that a rerun after the cause is fixed does the rest.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from molopt.io import atomic
from molopt.io import results as out
from molopt.io.claims import Claims
from molopt.io.read import OUTPUT_MARKER, described_constraints

#: errors after which no later write can succeed either
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class OutputsUnwritable(Exception):
    """Outputs cannot be written any more (``reason``); the run must stop."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


#: frame writes of one trajectory queued on the writer thread (each up to h5md.BUFFER_BYTES)
#: before the engine waits for the oldest
MAX_STREAMS = 2


def describe(exc: OSError) -> str:
    name = exc.strerror or type(exc).__name__
    return f"{name} ({exc.filename})" if exc.filename else name


def final_cell(result) -> dict:
    """The final cell of a periodic structure as a record gives it: lengths (A), angles
    (degrees), volume (A^3) and, when its stress is known, the pressure (GPa, -trace/3)."""
    structure = result.structure
    if not structure.pbc.any():
        return {}
    import numpy as np
    from ase.geometry import cell_to_cellpar
    from ase.units import GPa

    par = cell_to_cellpar(structure.cell)
    report = {
        "cell_lengths": [float(x) for x in par[:3]],
        "cell_angles": [float(x) for x in par[3:]],
        "volume": structure.volume,
    }
    if result.stress is not None:
        report["pressure_final_GPa"] = float(-np.trace(result.stress) / 3 / GPa)
    return report


class OutputSink:
    """Writes each structure's trajectory and relaxed extxyz and emits its record.

    ``frame_of`` key -> input frame (path, index, stem, sha256); ``run_hash_of`` key -> the
    identity stored in the outputs; ``common`` makes the run-wide H5MD parameters (called
    once, on the main thread); ``on_record(key, record)``; ``claims`` are released as
    structures finish."""

    def __init__(
        self,
        frame_of: dict,
        out_dir: Path,
        variable_cell: bool,
        potential_name: str,
        run_hash_of: Callable,
        common: Callable[[], dict],
        on_record: Callable[[object, dict], None],
        claims: Claims | None = None,
        symprec: float | None = None,
        symmetrize: bool = False,
    ):
        self.frame_of = frame_of
        #: with a tolerance (A), records and trajectories give the space group at the start
        #: and the end; ``symmetrize``: the relaxed structure is refined to its space group
        self.symprec = symprec
        self.symmetrize = symmetrize
        self.out_dir = Path(out_dir)
        self.variable_cell = variable_cell
        self.potential_name = potential_name
        self.run_hash_of = run_hash_of
        self.common = common
        self.on_record = on_record
        self.claims = claims
        self.writers: dict = {}
        self.broken: dict = {}  # key -> reason its trajectory could not be written
        self.recorded: set = set()
        self.fatal: str | None = None
        # finished structures are written by one background thread, while the engine computes
        # (JAX releases the GIL); their order is kept
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="molopt-writer")
        self.pending: list = []
        self.in_flight: set = set()
        self.template: Path | None = None  # run-wide H5MD layout and parameters (hidden file)
        self.temporaries = atomic.TemporaryIndex()
        self.streams: dict = {}  # key -> its trajectory's frame writes queued on the thread

    # -- the engine's Sink interface (main thread) ---------------------------------------------
    def begin(self, key, structure):
        from molopt.io.h5md import TrajectoryWriter

        self._check()
        h5md_path, xyz_path = out.output_paths(self.out_dir, self.frame_of[key].stem)
        if self.claims is not None:  # this process holds the claim: any other writer is dead
            for leftover in self.temporaries.of(h5md_path) + self.temporaries.of(xyz_path):
                leftover.unlink(missing_ok=True)
        try:
            template = self._template()
        except OSError as exc:
            self._write_error(exc)
            raise OutputsUnwritable(self.fatal or describe(exc)) from exc
        arrays = structure.arrays
        masses = arrays.get("masses")
        if masses is None:
            from ase.data import atomic_masses

            masses = atomic_masses[structure.numbers]
        self.writers[key] = TrajectoryWriter(
            h5md_path,
            structure.numbers,
            structure.pbc,
            self.variable_cell,
            template=template,
            masses=masses,
            charges=arrays.get("initial_charges"),
        )

    def frames(self, key, block):
        if key in self.broken:
            return
        writer = self.writers[key]
        writer.append(block, stream=False)
        if writer.full:  # a long trajectory: its frames go to the file on the writer thread
            streams = self.streams.setdefault(key, [])
            while len(streams) >= MAX_STREAMS:  # bounded memory: wait for the oldest
                streams.pop(0).result()
            streams.append(self.pool.submit(self._stream, key, writer, writer.detach()))
            self.pending.append(streams[-1])
        self._reap()
        self._check()

    def _stream(self, key, writer, blocks):
        """On the writer thread: append ``blocks`` to ``key``'s trajectory file; a write error
        breaks that trajectory (its structure fails) and, for a full disk, the run."""
        if key in self.broken:
            return
        try:
            writer.write_blocks(blocks)
        except OSError as exc:
            self.broken[key] = describe(exc)
            writer.abort()
            self._write_error(exc)

    def end(self, key, result):
        self.streams.pop(key, None)
        writer = self.writers.pop(key)
        self.in_flight.add(writer)
        self.pending.append(self.pool.submit(self._finish, key, writer, result))
        self._reap()
        self._check()

    # -- the run's side ----------------------------------------------------------------------
    def flush(self):
        """Wait for every write; re-raise an unexpected error of one."""
        for future in self.pending:
            future.result()
        self.pending = []

    def abort_all(self):
        """After an interruption or a fatal write error: finish the write in progress, drop
        queued ones, and leave no temporary file behind. The keys begun and not recorded."""
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for writer in list(self.writers.values()) + list(self.in_flight):
            writer.abort()
        self.writers.clear()
        self.in_flight.clear()
        if self.template is not None:
            self.template.unlink(missing_ok=True)
            self.template = None

    def _check(self):
        if self.fatal is not None:
            raise OutputsUnwritable(self.fatal)

    def _reap(self):
        """Raise an unexpected error of a finished background write; forget finished ones."""
        still = []
        for future in self.pending:
            if future.done():
                future.result()
            else:
                still.append(future)
        self.pending = still

    def _write_error(self, exc: OSError) -> None:
        if exc.errno in FATAL_ERRNOS and self.fatal is None:
            self.fatal = f"cannot write to {self.out_dir}: {describe(exc)}"

    def _template(self) -> Path:
        """Written once per run, on the main thread, beside the outputs; removed by
        :meth:`abort_all`."""
        if self.template is None:
            from molopt.io.h5md import write_template

            path = atomic.temporary_path(self.out_dir / "molopt-template")
            self.template = write_template(path, self.common())
        return self.template

    # -- the writer thread -------------------------------------------------------------------
    def _finish(self, key, writer, result):
        try:
            self._write(key, writer, result)
        finally:
            self.in_flight.discard(writer)

    def _emit(self, key, record: dict) -> None:
        self.recorded.add(key)
        if self.claims is not None:
            self.claims.release(self.frame_of[key].stem, record["status"], record["error"] or "")
        self.on_record(key, record)

    def _failed(self, key, result, reason: str) -> None:
        self._emit(
            key,
            out.failed_record(
                self.frame_of[key],
                reason,
                energy=result.energy,
                fmax=result.fmax,
                steps=result.steps,
                potential=self.potential_name,
                stop_reason=result.stop_reason or None,
            ),
        )

    def _symmetry(self, start, result):
        """(result, record fields): the result refined to its space group with
        ``symmetrize``, and the space groups at the start and the end."""
        if self.symprec is None:
            return result, {}
        from molopt import symmetry

        if self.symmetrize:
            refined = symmetry.symmetrized(result.structure, self.symprec)
            result = dataclasses.replace(result, structure=refined)
        return result, {
            "spacegroup_initial": symmetry.space_group(start, self.symprec),
            "spacegroup_final": symmetry.space_group(result.structure, self.symprec),
        }

    def _write(self, key, writer, result):
        frame = self.frame_of[key]
        h5md_path, xyz_path = out.output_paths(self.out_dir, frame.stem)
        if result.status == "failed" or key in self.broken:
            writer.abort()
            reason = result.error if result.status == "failed" else None
            if reason is None:
                reason = f"cannot write its trajectory: {self.broken[key]}"
            self._failed(key, result, reason)
            return
        if self.fatal is not None:
            writer.abort()
            self._failed(key, result, f"relaxed, but its outputs cannot be written: {self.fatal}")
            return
        # the run-wide parameters are in the template the trajectory started from
        params = {
            "input": str(frame.path),
            "input_sha256": frame.sha256,
            "index": -1 if frame.index is None else frame.index,
            "run_hash": self.run_hash_of(key),
            "status": result.status,
            "steps": result.steps,
            "energy_initial": result.initial_energy,
            "energy_final": result.energy,
            "fmax_final": result.fmax,
            "wall_time_s": result.wall_time,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        result, groups = self._symmetry(frame.structure, result)
        extra = {"stop_reason": result.stop_reason, **final_cell(result), **groups}
        extra.update(getattr(result, "extra", None) or {})
        params["constraints"] = described_constraints(frame.structure)
        params.update({k: v for k, v in extra.items() if v is not None})
        info = {
            OUTPUT_MARKER: params["run_hash"],
            "molopt_status": result.status,
            "molopt_steps": result.steps,
            "molopt_fmax": result.fmax,
            "molopt_potential": self.potential_name,
        }
        xyz_written = False
        try:
            out.write_extxyz(xyz_path, result, info)
            xyz_written = True
            writer.close(params)  # the trajectory lands last: its presence marks completion
        except OSError as exc:
            writer.abort()
            if xyz_written:  # alone it would look like a finished structure's
                xyz_path.unlink(missing_ok=True)
            self._write_error(exc)
            reason = f"relaxed, but its outputs cannot be written: {describe(exc)}"
            self._failed(key, result, reason)
            return
        except BaseException:
            writer.abort()
            raise
        self._emit(
            key,
            out.record(
                input=frame.path,
                index=frame.index,
                output=str(h5md_path),
                status=result.status,
                energy=result.energy,
                fmax=result.fmax,
                steps=result.steps,
                error=None,
                potential=self.potential_name,
                initial_energy=result.initial_energy,
                relax_time_s=round(result.wall_time, 4),
                **extra,
            ),
        )
