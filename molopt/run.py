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
from dataclasses import dataclass, field
from pathlib import Path

from molopt import elements as el
from molopt import interrupt
from molopt.config import GPA, RunSettings, parse_memory
from molopt.errors import ConfigError, InputError, PotentialError
from molopt.io import atomic
from molopt.io import read as reader
from molopt.io import results as out
from molopt.io.claims import Claims
from molopt.optimizers.cell_options import free_components, parse_mask, parse_stress
from molopt.potentials import registry


@dataclass
class Summary:
    records: list = field(default_factory=list)
    potential: str = ""
    potential_note: str = ""
    compiles: int = 0
    wall_time: float = 0.0
    #: why the run stopped before relaxing everything (outputs cannot be written), or None
    stopped: str | None = None

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
        cell_mask=parse_mask(settings.cell_mask) if settings.cell_mask else None,
        stress=tuple(v * GPA for v in parse_stress(settings.stress)) if settings.stress else None,
        hydrostatic=settings.hydrostatic,
        constant_volume=settings.constant_volume,
        precision=settings.precision,
        skin=settings.skin,
        chunk=settings.chunk,
        batch_size=settings.batch_size,
        max_batch_atoms=settings.max_batch_atoms,
        trajectory_interval=settings.trajectory_interval,
        max_memory=parse_memory(settings.max_memory) if settings.max_memory else None,
    )


def _cell_refusal(structure, settings: RunSettings) -> str | None:
    """Why ``--relax-cell`` cannot relax ``structure``'s cell, or None. Only components
    between periodic directions are free (a slab periodic in x and y relaxes xx, yy, xy);
    its constraints must be keepable with a moving cell."""
    pbc = structure.pbc
    if not pbc.any():
        return "--relax-cell needs a structure periodic in at least one direction"
    mask = parse_mask(settings.cell_mask) if settings.cell_mask else None
    if not free_components(mask, pbc).any():
        axes = "".join(a for a, p in zip("xyz", pbc, strict=True) if p)
        return (
            f"--cell-mask {settings.cell_mask} frees no component between the periodic "
            f"directions ({axes}) of this structure"
        )
    from molopt import constraints as cons

    return cons.cell_refusal(structure.constraints, structure.n_atoms, structure.cell)


def _device_description() -> str:
    from molopt._jax import jax

    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"


def common_parameters(settings: RunSettings, spec) -> dict:
    """What every trajectory of a run with potential ``spec`` records in ``/parameters``."""
    import jax

    from molopt import __version__

    return {
        "molopt_version": __version__,
        "jax_version": jax.__version__,
        "device": _device_description(),
        "precision": settings.precision,
        "potential_name": spec.name,
        "potential_path": str(spec.path),
        "potential_sha256": spec.sha256,
        "potential_spec": spec.data,
        "optimizer": settings.optimizer,
        "optimizer_options": settings.optimizer_options,
        "fmax_target": settings.fmax,
        "max_steps": settings.steps,
        "relax_cell": settings.relax_cell,
        "pressure_GPa": settings.pressure,
        "cell_options": settings.cell_options(),
        "trajectory_interval": settings.trajectory_interval,
        "settings": settings.result_settings(),
    }


def _prepare_out_dir(out_dir: Path) -> None:
    """Create the output directory, or fail before any work with the reason."""
    for place in (out_dir, *out_dir.parents):  # the nearest part that exists must be a folder
        if place.exists():
            if not place.is_dir():
                why = "is a file" if place == out_dir else f"cannot be created: {place} is a file"
                raise ConfigError(f"the output directory {out_dir} {why}")
            break
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


class PotentialChoice:
    """Which potential relaxes each structure: ``--potential`` for all, or else, per
    structure, the most specific shipped potential that covers its elements."""

    def __init__(self, settings: RunSettings):
        self.given = None
        try:
            if settings.potential:
                self.given = registry.load(settings.potential)
            else:
                registry.shipped()  # a broken shipped file is an error of its own, up front
        except PotentialError as exc:
            raise ConfigError(str(exc)) from exc
        self.chosen: dict = {}

    def spec_for(self, structure):
        """The spec, or a PotentialError saying why none applies."""
        if self.given is not None:
            return self.given
        wanted = frozenset(int(z) for z in structure.numbers)
        if wanted not in self.chosen:
            try:
                self.chosen[wanted] = registry.choose(wanted)
            except PotentialError as exc:
                self.chosen[wanted] = exc
        found = self.chosen[wanted]
        if isinstance(found, PotentialError):
            raise found
        return found


def _prepared(frame, settings: RunSettings):
    """``frame`` with ``--fix``'s atoms fixed and, with ``--fix-symmetry``, its structure
    refined to its space group and carrying the operations to keep; a failed frame naming
    the reason when that cannot be done."""
    if frame.structure is None or not (settings.fix or settings.fix_symmetry):
        return frame
    from molopt import constraints as cons
    from molopt import symmetry

    try:
        structure = frame.structure
        if settings.fix:
            structure = cons.with_fix(structure, settings.fix)
        if settings.fix_symmetry:
            structure = symmetry.prepare(structure, settings.symprec)
    except InputError as exc:
        return dataclasses.replace(frame, structure=None, error=exc.reason)
    return dataclasses.replace(frame, structure=structure)


def _uncovered(spec, structure) -> str:
    missing = sorted(set(int(z) for z in structure.numbers) - set(spec.elements))
    names = ", ".join(el.symbol(z) for z in missing)
    return f"element(s) {names} not covered by potential '{spec.name}'"


def _no_potential(structure) -> str:
    have = ", ".join(el.symbol(z) for z in sorted(set(int(z) for z in structure.numbers)))
    return f"no shipped potential covers {have}; choose one with --potential (`molopt potentials`)"


def relax_files(
    inputs: list[str],
    settings: RunSettings,
    on_record: Callable[[dict], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    members: list | None = None,
    on_workers: Callable[[int], None] | None = None,
) -> Summary:
    """Relax every structure in ``inputs``. Raises ConfigError before any work for usage
    problems (missing paths, duplicate output names, conflicting earlier results).
    ``members``: instead of ``inputs``, exactly these frames, (path, index, stem) each (a
    Dask task: :mod:`molopt.cluster`). ``on_workers``: on a cluster, the number of workers
    alive, whenever it changes."""
    run = _Run(settings, on_record, on_note, progress, members)
    run.on_workers = on_workers
    return run.run(inputs)


def relax_members(members: list, settings: RunSettings) -> list[dict]:
    """A Dask task, on a worker: relax the frames ``members`` ((path, index, stem) each) as
    one process would; their records."""
    records: list[dict] = []
    relax_files([], settings, on_record=records.append, members=members)
    return records


class _Run:
    """One ``relax_files`` call: plan (read, choose potentials, compare with earlier outputs),
    then relax the structures this process can claim, one engine per potential, then wait for
    those other processes hold and relax what they left unfinished."""

    def __init__(self, settings, on_record, on_note, progress, members=None):
        self.settings = settings
        self.members = members
        self.summary = Summary()
        self.on_record = on_record
        self.note = on_note or (lambda text: None)
        self.progress = progress
        self.out_dir = Path(settings.out_dir)
        self.frames: list = []
        self.spec_of: dict = {}  # key -> PotentialSpec
        self.recorded: set = set()
        self.summary_status: dict = {}  # key -> its record's status
        self.no_potential: dict = {}  # key -> why no shipped potential applies
        self.claims = None
        self.stopped: str | None = None
        self.on_workers: Callable[[int], None] | None = None

    def emit(self, key, rec: dict):
        self.recorded.add(key)
        self.summary_status[key] = rec["status"]
        self.summary.records.append(rec)
        if self.on_record:
            self.on_record(rec)
        if self.progress:
            self.progress(len(self.summary.records), len(self.frames))

    def fail(self, key, reason: str):
        self.emit(key, out.failed_record(self.frames[key], reason))

    def skipped(self, key, previous: dict, **extra):
        f = self.frames[key]
        h5md_path, _ = out.output_paths(self.out_dir, f.stem)
        self.emit(
            key,
            out.record(
                input=f.path,
                index=f.index,
                output=str(h5md_path),
                status="skipped",
                energy=previous.get("energy_final"),
                fmax=previous.get("fmax_final"),
                steps=previous.get("steps"),
                previous_status=previous.get("status"),
                potential=previous.get("potential_name"),
                **extra,
            ),
        )

    def run_hash(self, key) -> str:
        return frame_run_hash(self.frames[key], self.settings, self.spec_of[key])

    # -- planning ----------------------------------------------------------------------------
    def read(self, inputs):
        settings = self.settings
        if self.members is not None:
            self.read_members()
            return
        paths = _select_shard(reader.discover_with_places(inputs, settings.recursive), settings)
        for path, place in paths:
            interrupt.check()
            read = [_prepared(f, settings) for f in reader.read_frames(path, settings.index)]
            if place != Path("."):  # a recursive search: outputs mirror the input tree
                read = [dataclasses.replace(f, stem=(place / f.stem).as_posix()) for f in read]
            self.frames.extend(read)
        stems: dict[str, Path] = {}
        for f in self.frames:
            if f.stem in stems and stems[f.stem] != f.path:
                raise ConfigError(
                    f"inputs {stems[f.stem]} and {f.path} would both write {f.stem}.h5md; "
                    "rename one or relax them in separate --out-dir directories"
                )
            stems[f.stem] = f.path
        for path, keys in self.multi_frame().items():
            combined = self.combined_stem(keys)
            if stems.get(combined, path) != path:
                raise ConfigError(
                    f"the input {stems[combined]} would write {combined}.extxyz, the combined "
                    f"output of the frames of {path}; rename one of them"
                )
        for f in self.frames:
            for target in out.output_paths(self.out_dir, f.stem):
                if target.exists() and target.resolve() == f.path.resolve():
                    raise ConfigError(
                        f"the output {target} would overwrite the input {f.path}; "
                        "choose another --out-dir"
                    )

    def read_members(self) -> None:
        """The frames named by ``members`` (path, index, stem), with those stems."""
        wanted: dict = {}
        for path, index, stem in self.members:
            wanted.setdefault(path, {})[index] = stem
        for path, stems in wanted.items():
            interrupt.check()
            for f in reader.read_frames(Path(path), self.settings.index):
                if f.index in stems:
                    f = dataclasses.replace(_prepared(f, self.settings), stem=stems[f.index])
                    self.frames.append(f)

    def multi_frame(self) -> dict:
        """Input path -> keys of its frames, for the files read as several frames."""
        groups: dict = {}
        for key, f in enumerate(self.frames):
            if f.index is not None:
                groups.setdefault(f.path, []).append(key)
        return groups

    def combined_stem(self, keys: list) -> str:
        """``<stem>-all``: where the relaxed frames of one multi-frame file are collected."""
        return self.frames[keys[0]].stem.rsplit("-", 1)[0] + "-all"

    def write_combined(self) -> None:
        """For each multi-frame input, one extxyz with the relaxed frames that have outputs,
        in input order (each with its ``molopt_index``), rewritten when one of them was
        relaxed in this run."""
        for path, keys in self.multi_frame().items():
            relaxed_now = [
                k
                for k in keys
                if k in self.recorded
                and self.summary_status.get(k) in ("converged", "not_converged")
            ]
            target = out.output_paths(self.out_dir, self.combined_stem(keys))[1]
            if not relaxed_now and target.exists():
                continue
            done = [
                k
                for k in keys
                if out.previous_run(self.out_dir, self.frames[k].stem)[0] == "complete"
            ]
            if not done:
                continue
            try:
                out.combine_extxyz(
                    target,
                    [out.output_paths(self.out_dir, self.frames[k].stem)[1] for k in done],
                    [self.frames[k].index for k in done],
                )
            except OSError as exc:
                self.note(
                    f"cannot write {target} ({exc.strerror}); the frames' own outputs are whole"
                )
                continue
            missing = len(keys) - len(done)
            note = f" ({missing} frame(s) without outputs left out)" if missing else ""
            self.note(f"{len(done)} relaxed frames of {path} collected in {target}{note}")

    def choose_potentials(self) -> list:
        """Keys with a potential; failed records for the others."""
        choice = PotentialChoice(self.settings)
        keys = []
        for key, f in enumerate(self.frames):
            if f.structure is None:
                continue
            try:
                spec = choice.spec_for(f.structure)
            except PotentialError:
                self.no_potential[key] = _no_potential(f.structure)
                continue
            self.spec_of[key] = spec
            keys.append(key)
        by_spec: dict = {}
        for key in keys:
            by_spec.setdefault(self.spec_of[key].name, []).append(key)
        names = sorted(by_spec)
        self.summary.potential = ", ".join(names)
        if choice.given is None:
            for name in names:
                group = by_spec[name]
                numbers = set()
                for key in group:
                    numbers.update(int(z) for z in self.frames[key].structure.numbers)
                covers = ", ".join(el.symbol(z) for z in sorted(numbers))
                count = f"{len(group)} structure{'s' if len(group) != 1 else ''}"
                text = f"using potential '{name}' for {count} (covers {covers})"
                self.note(text)
                notes = [self.summary.potential_note, text]
                self.summary.potential_note = "; ".join(n for n in notes if n)
        return keys

    def plan(self) -> list:
        """The keys to relax, in input order; records for everything else."""
        settings = self.settings
        keys = set(self.choose_potentials())
        todo, conflicts, redo = [], [], []
        finished: dict = {}  # key -> the earlier run's parameters, for its skipped record
        for key, f in enumerate(self.frames):
            if key not in keys:
                continue
            state, previous = out.previous_run(self.out_dir, f.stem)
            if state == "absent":
                todo.append(key)
                continue
            same = previous.get("run_hash") == self.run_hash(key)
            if same and state == "complete" and not settings.overwrite:
                finished[key] = previous
                continue
            if not same and not settings.overwrite:
                which = 0 if state in ("complete", "incomplete") else 1
                conflicts.append(out.output_paths(self.out_dir, f.stem)[which])
                continue
            if same and state == "incomplete":
                redo.append(f.stem)
            todo.append(key)
        if conflicts:
            shown = ", ".join(str(p) for p in conflicts[:3])
            shown += " ..." if len(conflicts) > 3 else ""
            raise ConfigError(
                f"{len(conflicts)} output(s) already exist from a run with different inputs or "
                f"settings ({shown}); pass --overwrite to replace them, or use another --out-dir"
            )
        if redo:
            shown = ", ".join(redo[:3]) + (" ..." if len(redo) > 3 else "")
            self.note(
                f"{len(redo)} finished structure(s) miss an output ({shown}): relaxing them again"
            )
        todo_set = set(todo)
        items = []
        for key, f in enumerate(self.frames):
            if f.structure is None:
                self.fail(key, f.error)
                continue
            if key not in keys:
                self.fail(key, self.no_potential[key])
                continue
            spec = self.spec_of[key]
            if key not in todo_set:
                self.skipped(key, finished[key])
                continue
            if not spec.covers(f.structure.numbers):
                self.fail(key, _uncovered(spec, f.structure))
                continue
            if settings.relax_cell and _cell_refusal(f.structure, settings):
                self.fail(key, _cell_refusal(f.structure, settings))
                continue
            items.append(key)
        return items

    # -- relaxing ----------------------------------------------------------------------------
    def run(self, inputs) -> Summary:
        t0 = time.perf_counter()
        self.read(inputs)
        if self.progress:
            self.progress(0, len(self.frames))
        keys = self.plan()
        if keys:
            _prepare_out_dir(self.out_dir)
            places = {Path(self.frames[key].stem).parent for key in keys} - {Path(".")}
            for place in places:
                _prepare_out_dir(self.out_dir / place)
            directories = {self.out_dir} | {self.out_dir / p for p in places}
            removed = [p for d in directories for p in atomic.remove_dead_leftovers(d)]
            if removed:
                self.note(f"removed {len(removed)} temporary file(s) left by runs that died")
            from molopt._jax import enable_compilation_cache

            enable_compilation_cache()
            self.claims = Claims(self.out_dir)
            try:
                if self.settings.cluster or self.settings.scheduler:
                    self.relax_on_cluster(keys)
                else:
                    self.relax_all(keys)
            finally:
                self.claims.release_all()
            for directory in directories:  # of a process that died while this one ran
                atomic.remove_dead_leftovers(directory)
        if not self.stopped and self.members is None:  # (a Dask task: its client does it)
            self.write_combined()
        if self.stopped:
            for key in keys:
                if key not in self.recorded:
                    reason = f"not relaxed: the run stopped ({self.stopped}); rerun to finish"
                    self.fail(key, reason)
        self.summary.stopped = self.stopped
        self.summary.wall_time = time.perf_counter() - t0
        return self.summary

    def relax_all(self, keys: list) -> None:
        """Relax what this process claims; then, for each structure another process held,
        wait for it: record its outcome, or relax it here if that process died."""
        held_elsewhere = self.relax_claimed(keys)
        while held_elsewhere and not self.stopped:
            again = []
            for key in held_elsewhere:
                interrupt.check()
                f = self.frames[key]
                outcome, held = self.claims.wait(f.stem)
                state, previous = out.previous_run(self.out_dir, f.stem)
                done = state == "complete" and previous.get("run_hash") == self.run_hash(key)
                if done or outcome.status == "failed":
                    if held:
                        self.claims.release(f.stem)
                    if done:
                        self.skipped(key, previous, relaxed_by=outcome.owner or None)
                    else:
                        where = f"in another molopt process ({outcome.owner})"
                        self.fail(key, f"failed {where}: {outcome.error}")
                    continue
                if held:  # its owner ended without finishing it
                    again.append(key)
            held_elsewhere = self.relax_claimed(again) if again else []

    def relax_on_cluster(self, keys: list) -> None:
        """Relax ``keys`` as Dask tasks (:mod:`molopt.cluster`); each record arrives as its
        task finishes. A structure a lost worker had finished comes back as already done: it
        is reported as the relaxation it was."""
        from molopt.cluster import run_tasks

        key_of = {(str(self.frames[k].path), self.frames[k].index): k for k in keys}
        members = [
            (str(self.frames[k].path), self.frames[k].index, self.frames[k].stem) for k in keys
        ]

        def deliver(member, rec):
            key = key_of[(member[0], member[1])]
            if rec["status"] == "skipped" and rec.get("previous_status"):
                rec = dict(rec, status=rec["previous_status"], resumed=True)
                rec.pop("previous_status")
            self.emit(key, rec)

        def fail(member, reason):
            self.fail(key_of[(member[0], member[1])], reason)

        sizes = [self.frames[k].structure.n_atoms for k in keys]
        run_tasks(
            relax_members, members, sizes, self.settings, deliver, fail, self.note, self.on_workers
        )

    def _claim(self, key) -> bool:
        """The engine's claim hook: take ``key`` unless another process holds it or finished
        it meanwhile (then it is recorded as skipped)."""
        f = self.frames[key]
        if f.stem in self.claims.held:
            return True
        if not self.claims.try_claim(f.stem):
            return False
        state, previous = out.previous_run(self.out_dir, f.stem)
        if state == "complete" and previous.get("run_hash") == self.run_hash(key):
            if not self.settings.overwrite:
                self.claims.release(f.stem)
                self.skipped(key, previous)  # finished by another process meanwhile
                return False
        return True

    def relax_claimed(self, keys: list) -> list:
        """Run the engine over ``keys``, one engine per potential; the keys another process
        held when their turn came."""
        from molopt.engine import Engine
        from molopt.io.outputs import OutputSink, OutputsUnwritable

        settings = self.settings
        held_elsewhere: list = []
        by_spec: dict = {}
        for key in keys:
            by_spec.setdefault(self.spec_of[key].name, []).append(key)
        for group in by_spec.values():
            if self.stopped:
                break
            spec = self.spec_of[group[0]]
            frame_of = {key: self.frames[key] for key in group}
            sink = OutputSink(
                frame_of,
                self.out_dir,
                settings.relax_cell,
                spec.name,
                self.run_hash,
                lambda spec=spec: common_parameters(settings, spec),
                self.emit,
                self.claims,
                symprec=settings.symprec if settings.fix_symmetry or settings.symmetrize else None,
                symmetrize=settings.symmetrize,
            )
            after_converged = None
            if settings.check_hessian:
                from molopt.analysis.saddle import SaddleEscape

                after_converged = SaddleEscape()
            engine = Engine(
                spec.potential,
                engine_settings(settings),
                sink,
                None,  # progress: as records arrive (emit)
                after_converged,
                claim=self._claim,
            )
            items = [(key, self.frames[key].structure) for key in group]
            try:
                engine.run(items)
                sink.flush()
                interrupt.check()  # interrupted during the last writes: still an interruption
            except OutputsUnwritable as exc:
                self.stopped = exc.reason
                sink.flush()
            finally:
                sink.abort_all()
            self.summary.compiles += getattr(engine, "compiles", 0)
            held_elsewhere += [key for key in engine.passed_over if key not in self.recorded]
        return held_elsewhere
