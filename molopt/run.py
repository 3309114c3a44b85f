"""``molopt relax`` as a library call: inputs -> validated frames -> engine -> outputs.

This is the glue between the edges (files, potential files, settings) and the engine; the CLI
and the Python API both call :func:`relax_files`. It never raises for one bad structure: each
gets a JSON-able record with its status.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from molopt import elements as el
from molopt import interrupt
from molopt.config import GPA, RunSettings
from molopt.errors import ConfigError, PotentialError
from molopt.io import read as reader
from molopt.io import results as out
from molopt.potentials import registry


@dataclass
class Summary:
    records: list = field(default_factory=list)
    potential: str = ""
    potential_note: str = ""
    compiles: int = 0
    wall_time: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r["status"] == status)

    @property
    def exit_code(self) -> int:
        """0 when every structure converged (now or in the run that is skipped)."""
        ok = all(
            r["status"] == "converged"
            or (r["status"] == "skipped" and r.get("previous_status") == "converged")
            for r in self.records
        )
        return 0 if ok else 1


def engine_settings(settings: RunSettings):
    """The engine's settings for a run's (the one place GPa becomes eV/A^3)."""
    from molopt.engine import EngineSettings

    return EngineSettings(
        optimizer=settings.optimizer,
        optimizer_options=tuple(sorted(settings.optimizer_options.items())),
        fmax=settings.fmax,
        steps=settings.steps,
        relax_cell=settings.relax_cell,
        pressure=settings.pressure * GPA,
        precision=settings.precision,
        skin=settings.skin,
        chunk=settings.chunk,
        batch_size=settings.batch_size,
        max_batch_atoms=settings.max_batch_atoms,
        trajectory_interval=settings.trajectory_interval,
    )


def _device_description() -> str:
    from molopt._jax import jax

    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"


class OutputSink:
    """Writes each structure's trajectory and relaxed extxyz; failed ones leave nothing."""

    def __init__(self, frames_by_key: dict, settings: RunSettings, spec, on_record: Callable):
        self.frame_of = frames_by_key
        self.settings = settings
        self.spec = spec
        self.on_record = on_record
        self.writers: dict = {}
        self.out_dir = Path(settings.out_dir)
        self.common = None
        # finished structures are written by one background thread, while the engine computes
        # (JAX releases the GIL); their order is kept
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="molopt-writer")
        self.pending: list = []
        self.in_flight: set = set()
        self.template: Path | None = None  # run-wide H5MD layout and parameters (hidden file)

    def _common(self) -> dict:
        if self.common is None:
            import jax

            from molopt import __version__

            s = self.settings
            self.common = {
                "molopt_version": __version__,
                "jax_version": jax.__version__,
                "device": _device_description(),
                "precision": s.precision,
                "potential_name": self.spec.name,
                "potential_path": str(self.spec.path),
                "potential_sha256": self.spec.sha256,
                "potential_spec": self.spec.data,
                "optimizer": s.optimizer,
                "optimizer_options": s.optimizer_options,
                "fmax_target": s.fmax,
                "max_steps": s.steps,
                "relax_cell": s.relax_cell,
                "pressure_GPa": s.pressure,
                "trajectory_interval": s.trajectory_interval,
                "settings": s.result_settings(),
            }
        return self.common

    def _template(self) -> Path:
        """Written once per run, on the main thread (the common parameters ask JAX for the
        device), beside the outputs (``relax_files`` created the directory); removed by
        :meth:`abort_all`."""
        if self.template is None:
            from molopt.io.h5md import write_template

            path = self.out_dir / f".molopt-template.{os.getpid()}.tmp"
            self.template = write_template(path, self._common())
        return self.template

    def begin(self, key, structure):
        from molopt.io.h5md import TrajectoryWriter

        frame = self.frame_of[key]
        h5md_path, _ = out.output_paths(self.out_dir, frame.stem)
        self.writers[key] = TrajectoryWriter(
            h5md_path,
            structure.numbers,
            structure.pbc,
            self.settings.relax_cell,
            template=self._template(),
        )

    def frames(self, key, block):
        self.writers[key].append(block)

    def end(self, key, result):
        writer = self.writers.pop(key)
        self.in_flight.add(writer)
        self.pending.append(self.pool.submit(self._finish, key, writer, result))
        self._reap()

    def _reap(self):
        """Raise an error of a finished background write; forget finished futures."""
        still = []
        for future in self.pending:
            if future.done():
                future.result()
            else:
                still.append(future)
        self.pending = still

    def flush(self):
        """Wait for every write; re-raise the first error."""
        for future in self.pending:
            future.result()
        self.pending = []

    def _finish(self, key, writer, result):
        try:
            self._write(key, writer, result)
        finally:
            self.in_flight.discard(writer)

    def _write(self, key, writer, result):
        frame = self.frame_of[key]
        h5md_path, xyz_path = out.output_paths(self.out_dir, frame.stem)
        if result.status == "failed":
            writer.abort()
            self.on_record(
                out.record(
                    input=frame.path,
                    index=frame.index,
                    output=None,
                    status="failed",
                    energy=result.energy,
                    fmax=result.fmax,
                    steps=result.steps,
                    error=f"{frame.path}: {result.error}",
                )
            )
            return
        # the run-wide parameters are in the template the trajectory started from
        params = {
            "input": str(frame.path),
            "input_sha256": frame.sha256,
            "index": -1 if frame.index is None else frame.index,
            "run_hash": frame_run_hash(frame, self.settings, self.spec),
            "status": result.status,
            "steps": result.steps,
            "energy_initial": result.initial_energy,
            "energy_final": result.energy,
            "fmax_final": result.fmax,
            "wall_time_s": result.wall_time,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        extra = getattr(result, "extra", None) or {}
        params.update({k: v for k, v in extra.items() if v is not None})
        info = {
            reader.OUTPUT_MARKER: params["run_hash"],
            "molopt_status": result.status,
            "molopt_steps": result.steps,
            "molopt_fmax": result.fmax,
            "molopt_potential": self.spec.name,
        }
        try:
            out.write_extxyz(xyz_path, result, info)
            writer.close(params)  # the trajectory lands last: its presence marks completion
        except BaseException:
            writer.abort()
            raise
        self.on_record(
            out.record(
                input=frame.path,
                index=frame.index,
                output=str(h5md_path),
                status=result.status,
                energy=result.energy,
                fmax=result.fmax,
                steps=result.steps,
                error=None,
                initial_energy=result.initial_energy,
                relax_time_s=round(result.wall_time, 4),
                **extra,
            )
        )

    def abort_all(self):
        """After an interruption: finish the write in progress, drop queued ones, and leave
        no temporary file behind."""
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


def _prepare_out_dir(out_dir: Path) -> None:
    """Create the output directory, or fail before any work with the reason."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot create the output directory {out_dir} ({reason})") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"the output directory {out_dir} is not writable")


def frame_run_hash(frame, settings: RunSettings, spec) -> str:
    return out.run_hash(frame.sha256, frame.index, settings.result_settings(), spec.sha256)


def _select_shard(paths: list, settings: RunSettings) -> list:
    """Part I of N: the files at positions I, I + N, I + 2N, ... of the ordered inputs."""
    pair = settings.shard_pair()
    if pair is None:
        return paths
    i, n = pair
    return [p for k, p in enumerate(paths) if k % n == i]


def resolve_potential(settings: RunSettings, frames) -> tuple[object, str]:
    """The potential spec to use and a note saying how it was chosen."""
    if settings.potential:
        try:
            return registry.load(settings.potential), ""
        except PotentialError as exc:
            raise ConfigError(str(exc)) from exc
    numbers = set()
    for f in frames:
        if f.structure is not None:
            numbers.update(int(z) for z in f.structure.numbers)
    if not numbers:
        return None, ""
    try:
        spec = registry.choose(numbers)
    except PotentialError as exc:
        raise ConfigError(str(exc)) from exc
    return (
        spec,
        f"using potential '{spec.name}' "
        f"(covers {', '.join(el.symbol(z) for z in sorted(numbers))})",
    )


def relax_files(
    inputs: list[str],
    settings: RunSettings,
    on_record: Callable[[dict], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Relax every structure in ``inputs``. Raises ConfigError before any work for usage
    problems (missing paths, duplicate output names, conflicting earlier results)."""
    t0 = time.perf_counter()
    summary = Summary()
    note = on_note or (lambda text: None)

    def emit(rec: dict):
        summary.records.append(rec)
        if on_record:
            on_record(rec)

    paths = _select_shard(reader.discover_with_places(inputs, settings.recursive), settings)
    frames = []
    for path, place in paths:
        interrupt.check()
        read = reader.read_frames(path, settings.index)
        if place != Path("."):  # a recursive search: outputs mirror the input tree
            read = [dataclasses.replace(f, stem=(place / f.stem).as_posix()) for f in read]
        frames.extend(read)
    stems: dict[str, Path] = {}
    for f in frames:
        if f.stem in stems and stems[f.stem] != f.path:
            raise ConfigError(
                f"inputs {stems[f.stem]} and {f.path} would both write {f.stem}.h5md; "
                "rename one or relax them in separate --out-dir directories"
            )
        stems[f.stem] = f.path
    out_dir = Path(settings.out_dir)
    for f in frames:
        for target in out.output_paths(out_dir, f.stem):
            if target.exists() and target.resolve() == f.path.resolve():
                raise ConfigError(
                    f"the output {target} would overwrite the input {f.path}; "
                    "choose another --out-dir"
                )
    spec, chosen = resolve_potential(settings, frames)
    if chosen:
        note(chosen)
    if spec is not None:
        summary.potential = spec.name
        summary.potential_note = chosen

    todo = []
    conflicts = []
    for key, f in enumerate(frames):
        if f.structure is None:
            continue
        state, previous = out.previous_run(out_dir, f.stem)
        if state == "absent":
            todo.append(key)
            continue
        same = previous.get("run_hash") == frame_run_hash(f, settings, spec)
        if same and state == "complete" and not settings.overwrite:
            continue
        if not same and not settings.overwrite:
            conflicts.append(out.output_paths(out_dir, f.stem)[0 if state == "complete" else 1])
            continue
        todo.append(key)
    if conflicts:
        shown = ", ".join(str(p) for p in conflicts[:3]) + (" ..." if len(conflicts) > 3 else "")
        raise ConfigError(
            f"{len(conflicts)} output(s) already exist from a run with different inputs or "
            f"settings ({shown}); pass --overwrite to replace them, or use another --out-dir"
        )
    todo_set = set(todo)

    def fail(f, reason):
        where = f"{f.path}{'' if f.index is None else f' (frame {f.index})'}"
        emit(
            out.record(
                input=f.path,
                index=f.index,
                output=None,
                status="failed",
                error=f"{where}: {reason}",
            )
        )

    items = []
    for key, f in enumerate(frames):
        if f.structure is None:
            fail(f, f.error)
            continue
        if key not in todo_set:
            h5md_path, _ = out.output_paths(out_dir, f.stem)
            _, previous = out.previous_run(out_dir, f.stem)
            emit(
                out.record(
                    input=f.path,
                    index=f.index,
                    output=str(h5md_path),
                    status="skipped",
                    energy=previous.get("energy_final"),
                    fmax=previous.get("fmax_final"),
                    steps=previous.get("steps"),
                    previous_status=previous.get("status"),
                )
            )
            continue
        if not spec.covers(f.structure.numbers):
            missing = sorted(set(int(z) for z in f.structure.numbers) - set(spec.elements))
            names = ", ".join(el.symbol(z) for z in missing)
            fail(f, f"element(s) {names} not covered by potential '{spec.name}'")
            continue
        if settings.relax_cell and not f.structure.pbc.all():
            fail(f, "--relax-cell needs a structure periodic in all three directions")
            continue
        items.append((key, f.structure))

    if items:
        _prepare_out_dir(out_dir)
        for place in {Path(frames[key].stem).parent for key, _ in items} - {Path(".")}:
            _prepare_out_dir(out_dir / place)
        from molopt._jax import enable_compilation_cache
        from molopt.engine import Engine

        enable_compilation_cache()
        potential = spec.potential
        frame_of = {key: frames[key] for key, _ in items}
        sink = OutputSink(frame_of, settings, spec, emit)
        after_converged = None
        if settings.check_hessian:
            from molopt.analysis.saddle import SaddleEscape

            after_converged = SaddleEscape()
        engine = Engine(potential, engine_settings(settings), sink, progress, after_converged)
        try:
            engine.relax(items)
            sink.flush()
            interrupt.check()  # interrupted during the last writes: still an interruption
        finally:
            sink.abort_all()
        summary.compiles = getattr(engine, "compiles", 0)
    summary.wall_time = time.perf_counter() - t0
    return summary
