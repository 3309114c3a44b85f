"""H5MD 1.1 trajectories (https://www.nongnu.org/h5md/h5md.html), written atomically.

Layout (one relaxation per file; frame k = optimizer step ``step[k]``):

    /h5md                     version [1, 1]; author/, creator/ (molopt + version)
    /particles/trajectory/
        box/                  dimension 3, boundary per axis "periodic"/"none";
                              edges/ {step, time, value (T, 3, 3) Angstrom} if any axis periodic
        position/             {step, time, value (T, N, 3) Angstrom}
        force/                {step, time, value (T, N, 3) kJ mol-1 Angstrom-1}  (MDAnalysis)
        force_ev/             {step, time, value (T, N, 3) eV Angstrom-1}        (ASE units)
                              (both float32, :data:`SINGLE`; everything else float64)
        species               (N,) atomic numbers, time-independent
    /observables/
        potential_energy/     {step, time, value (T,) eV}
        fmax/                 {step, time, value (T,) eV Angstrom-1}
        stress/, volume/      (T, 3, 3) eV Angstrom-3 and (T,) Angstrom3 with a variable cell
    /parameters/              run metadata (attributes; ``settings`` and ``potential`` as JSON)

``time`` is the step number in "fs" (a pseudo-time: MDAnalysis requires a time unit it knows;
a relaxation has no physical time). Forces are stored twice because MDAnalysis knows no
eV-based force unit: ``force`` in its units, ``force_ev`` in ASE's.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from molopt.io.atomic import temporary_path

#: 1 eV/A in kJ mol-1 A-1 (CODATA 2018 via ase.units: eV * N_A / 1000)
EV_TO_KJ_PER_MOL = 96.48533212331002

#: elements stored in single precision (7 significant digits, as MD trajectories store
#: forces): the forces, twice over (MDAnalysis's units and eV/A). Positions, cells, energies
#: and stresses stay double: the last frame is the relaxed structure, exactly.
SINGLE = ("particles/trajectory/force", "particles/trajectory/force_ev")

#: frames are kept in memory up to this many bytes, then streamed to the file
BUFFER_BYTES = 64 * 1024 * 1024

#: the ``unit`` attribute of each element's ``value``; every ``time`` is in "fs"
UNITS = {
    "particles/trajectory/position": "Angstrom",
    "particles/trajectory/force": "kJ mol-1 Angstrom-1",
    "particles/trajectory/force_ev": "eV Angstrom-1",
    "observables/potential_energy": "eV",
    "observables/fmax": "eV Angstrom-1",
    "particles/trajectory/box/edges": "Angstrom",
    "observables/stress": "eV Angstrom-3",
    "observables/volume": "Angstrom3",
}


def write_template(path: Path, parameters: dict, author: str = "molopt") -> Path:
    """A file with what every trajectory of a run shares: the H5MD layout (no arrays) and the
    run-wide ``/parameters``. A :class:`TrajectoryWriter` given it copies it instead of
    building those groups and attributes again (HDF5 costs 30-100 us per object, a large part
    of writing a small trajectory)."""
    path = Path(path)  # a name of the caller's own, removed by it after the run
    try:
        with h5py.File(path, "w", libver="latest") as f:
            _write_layout(f, author)
            _write_parameters(f, parameters)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _write_layout(f: h5py.File, author: str) -> None:
    from molopt import __version__

    h5md = f.create_group("h5md")
    h5md.attrs["version"] = np.array([1, 1], np.int32)
    h5md.create_group("author").attrs["name"] = author
    creator = h5md.create_group("creator")
    creator.attrs["name"] = "molopt"
    creator.attrs["version"] = __version__
    f.create_group("particles/trajectory/box").attrs["dimension"] = np.int32(3)
    f.create_group("observables")
    f.create_group("parameters")


_TEXT = h5py.string_dtype()  # what h5py stores a Python str as: variable-length UTF-8
_SCALAR = h5py.h5s.create(h5py.h5s.SCALAR)


def _set_attribute(obj, name: str, value) -> None:
    """``obj.attrs[name] = value``, stored exactly as h5py stores it (a str as variable-length
    UTF-8, numbers and arrays with their numpy type), in two HDF5 calls when the attribute is
    new: h5py's attribute manager converts, checks and may delete first, ~70 us an
    attribute, and a trajectory has ~20 of them. ``obj``: an h5py object, or the low-level
    identifier of a dataset (:func:`_new_dataset`)."""
    low = isinstance(obj, h5py.h5d.DatasetID)
    oid = obj if low else obj.id
    if h5py.h5a.exists(oid, name.encode()):
        (h5py.Dataset(oid) if low else obj).attrs[name] = value
        return
    data = np.array(value, dtype=_TEXT) if isinstance(value, str) else np.asarray(value)
    space = _SCALAR if data.ndim == 0 else h5py.h5s.create_simple(data.shape)
    attribute = h5py.h5a.create(oid, name.encode(), h5py.h5t.py_create(data.dtype, True), space)
    attribute.write(data)


@functools.cache
def _plists():
    """(dataset creation, link creation) property lists as h5py makes them for a plain
    dataset: contiguous, no timestamps; links with intermediate groups, ASCII names."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_obj_track_times(False)
    lcpl = h5py.h5p.create(h5py.h5p.LINK_CREATE)
    lcpl.set_create_intermediate_group(True)
    lcpl.set_char_encoding(h5py.h5t.CSET_ASCII)
    return dcpl, lcpl


def _new_group(f: h5py.File, path: str):
    """``f.create_group(path)`` in one HDF5 call; its low-level identifier."""
    return h5py.h5g.create(f.id, path.encode(), lcpl=_plists()[1])


def _new_dataset(parent, name: str, data):
    """``parent.create_dataset(name, data=data)`` as h5py makes it (a contiguous dataset of
    the array's own type), in three HDF5 calls: h5py's ``create_dataset`` validates and
    builds a property list each time, ~100 us a dataset, and a small trajectory has 7-9.
    ``parent``: an h5py group or a group's low-level identifier. Returns the dataset's
    low-level identifier."""
    data = np.ascontiguousarray(data)
    dcpl, lcpl = _plists()
    space = h5py.h5s.create_simple(data.shape)
    kind = h5py.h5t.py_create(data.dtype, logical=1)
    loc = parent if isinstance(parent, h5py.h5g.GroupID) else parent.id
    dataset = h5py.h5d.create(loc, name.encode(), kind, space, dcpl=dcpl, lcpl=lcpl)
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
    return dataset


def _write_parameters(f: h5py.File, parameters: dict) -> None:
    group = f["parameters"]
    for key, value in parameters.items():
        if isinstance(value, dict | list | tuple):
            value = json.dumps(value, sort_keys=True)
        elif value is None:
            value = ""
        _set_attribute(group, key, value)


class TrajectoryWriter:
    """Collects frames of one relaxation; :meth:`close` writes and renames atomically.

    ``numbers`` (N,), ``pbc`` (3,), ``variable_cell`` whether stress/volume are recorded;
    ``template`` a file from :func:`write_template` to start from (its parameters are kept,
    :meth:`close` adds this relaxation's own); ``masses`` (N,) u and ``charges`` (N,) e are
    stored as H5MD's time-independent ``mass`` and ``charge`` when given.
    """

    def __init__(
        self,
        path: Path,
        numbers,
        pbc,
        variable_cell: bool,
        author: str = "molopt",
        template: Path | None = None,
        masses=None,
        charges=None,
    ):
        self.path = Path(path)
        self.masses = None if masses is None else np.asarray(masses, np.float64)
        self.charges = None if charges is None else np.asarray(charges, np.float64)
        self.template = template
        self.tmp = temporary_path(self.path)
        self.numbers = np.asarray(numbers)
        self.pbc = np.asarray(pbc, bool)
        self.variable_cell = variable_cell
        self.author = author
        self.blocks: list[dict] = []
        self.buffered = 0
        self.file: h5py.File | None = None
        self.n_frames = 0

    # -- frames ------------------------------------------------------------------------------
    def append(self, block: dict, stream: bool = True) -> None:
        """``block``: step (T,), positions/forces (T, N, 3), energy/fmax (T,), and cell
        (T, 3, 3) when periodic, stress (T, 3, 3) with a variable cell. Past
        ``BUFFER_BYTES`` the buffered frames are written to the file now, unless ``stream``
        is False (the caller then takes them with :meth:`detach` when :attr:`full`)."""
        self.blocks.append({k: np.asarray(v) for k, v in block.items()})
        self.buffered += sum(v.nbytes for v in self.blocks[-1].values())
        if stream and self.full:
            self._flush()

    @property
    def full(self) -> bool:
        """Whether more than ``BUFFER_BYTES`` of frames wait in memory."""
        return self.buffered > BUFFER_BYTES

    def detach(self) -> list[dict]:
        """The buffered frames, taken out of the buffer (for :meth:`write_blocks` elsewhere,
        e.g. on a writer thread, while new frames are appended)."""
        blocks, self.blocks, self.buffered = self.blocks, [], 0
        return blocks

    def write_blocks(self, blocks: list[dict]) -> None:
        """Append ``blocks`` (from :meth:`detach`, in order) to the temporary file."""
        if not blocks:
            return
        if self.file is None:
            self._open()
        self._append(self._joined(blocks))

    def _joined(self, blocks: list[dict] | None = None) -> dict:
        blocks = self.blocks if blocks is None else blocks
        if len(blocks) == 1:
            return blocks[0]
        keys = blocks[0].keys()
        return {k: np.concatenate([b[k] for b in blocks]) for k in keys}

    def _open(self):
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        if self.template is not None:
            shutil.copyfile(self.template, self.tmp)
            self.file = h5py.File(self.tmp, "r+")
        else:
            self.file = h5py.File(self.tmp, "w", libver="latest")
            _write_layout(self.file, self.author)
        self._write_system(self.file)

    def _flush(self) -> None:
        """Append buffered frames to the (resizable) datasets of the temporary file."""
        if not self.blocks:
            return
        if self.file is None:
            self._open()
        data = self._joined()
        self.blocks, self.buffered = [], 0
        self._append(data)

    def _append(self, data: dict) -> None:
        """Append frames (joined blocks) to the resizable datasets of the open file."""
        for element, values, step, time in self._series(data):
            group = self.file.require_group(element)
            if "value" not in group:
                value = group.create_dataset(
                    "value",
                    data=values,
                    maxshape=(None,) + values.shape[1:],
                    chunks=(max(1, min(64, len(values))),) + values.shape[1:],
                )
                _set_attribute(value, "unit", UNITS[element])
                group.create_dataset("step", data=step, maxshape=(None,), chunks=(256,))
                times = group.create_dataset("time", data=time, maxshape=(None,), chunks=(256,))
                _set_attribute(times, "unit", "fs")
            else:
                for name, array in (("value", values), ("step", step), ("time", time)):
                    ds = group[name]
                    ds.resize(ds.shape[0] + len(array), axis=0)
                    ds[-len(array) :] = array
        self.n_frames += len(data["step"])

    def _write_all(self, f: h5py.File) -> None:
        """One-shot write of everything buffered (the common case: small trajectories).
        ``step``/``time`` are written once and hard-linked into every element."""
        data = self._joined()
        self.blocks, self.buffered = [], 0
        shared = None
        _, lcpl = _plists()
        for element, values, step, time in self._series(data):
            group = _new_group(f, element)
            _set_attribute(_new_dataset(group, "value", values), "unit", UNITS[element])
            if shared is None:
                shared = (_new_dataset(group, "step", step), _new_dataset(group, "time", time))
                _set_attribute(shared[1], "unit", "fs")
            else:  # hard links to the first element's
                h5py.h5o.link(shared[0], group, b"step", lcpl=lcpl)
                h5py.h5o.link(shared[1], group, b"time", lcpl=lcpl)
        self.n_frames += len(data["step"])

    # -- layout ------------------------------------------------------------------------------
    def _series(self, data: dict):
        """(element path, values, step, time) of every time series."""
        step = data["step"].astype(np.int64)
        time = step.astype(np.float64)
        elements = {
            "particles/trajectory/position": data["positions"],
            "particles/trajectory/force": (  # (single precision: see SINGLE)
                np.asarray(data["forces"], np.float32) * np.float32(EV_TO_KJ_PER_MOL)
            ),
            "particles/trajectory/force_ev": data["forces"],
            "observables/potential_energy": data["energy"],
            "observables/fmax": data["fmax"],
        }
        if self.pbc.any():
            elements["particles/trajectory/box/edges"] = data["cell"]
        if self.variable_cell:
            elements["observables/stress"] = data["stress"]
            elements["observables/volume"] = np.abs(np.linalg.det(data["cell"]))
        for element, values in elements.items():
            kind = np.float32 if element in SINGLE else np.float64
            yield element, np.asarray(values, kind), step, time

    def _write_system(self, f: h5py.File) -> None:
        """What depends on the structure but not on the frames: boundaries and species."""
        traj = f["particles/trajectory"]
        boundary = np.array([b"periodic" if p else b"none" for p in self.pbc], dtype="S8")
        _set_attribute(traj["box"], "boundary", boundary)
        traj.create_dataset("species", data=self.numbers.astype(np.int32))
        if self.masses is not None:  # H5MD's time-independent particle properties
            _set_attribute(traj.create_dataset("mass", data=self.masses), "unit", "u")
        if self.charges is not None:
            _set_attribute(traj.create_dataset("charge", data=self.charges), "unit", "e")

    # -- finish ------------------------------------------------------------------------------
    def close(self, parameters: dict) -> Path:
        """Write everything, the ``parameters`` (JSON-able values), then rename into place."""
        if self.file is None:
            self._open()
            if self.blocks:
                self._write_all(self.file)
        self._flush()
        _write_parameters(self.file, parameters)
        self.file.close()
        self.file = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything; no file is left behind."""
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # pragma: no cover - closing a broken file
                pass
            self.file = None
        self.blocks = []
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


# --- reading --------------------------------------------------------------------------------


def read_parameters(path: Path, keys=None) -> dict:
    """The ``/parameters`` attributes of a molopt trajectory (JSON values decoded); only
    those named in ``keys`` (the ones present) when given: a trajectory holds about thirty,
    and reading them all took 3 ms a file against 0.4 ms for one (what a rerun over a
    directory of outputs pays per structure)."""
    with h5py.File(path, "r") as f:
        out = {}
        attrs = f["parameters"].attrs
        chosen = attrs.items() if keys is None else ((k, attrs[k]) for k in keys if k in attrs)
        for key, value in chosen:
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and value[:1] in "{[":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out


def read(path: Path) -> dict:
    """Every array of a molopt trajectory, in ASE units: ``numbers`` (N,), ``pbc`` (3,),
    ``step`` (T,), ``positions``/``forces`` (T, N, 3), ``energy``/``fmax`` (T,), ``cell``
    (T, 3, 3) (zeros when not periodic), ``stress`` (T, 3, 3) when recorded, ``parameters``."""
    with h5py.File(path, "r") as f:
        traj = f["particles/trajectory"]
        boundary = [
            b.decode() if isinstance(b, bytes) else str(b) for b in traj["box"].attrs["boundary"]
        ]
        pbc = np.array([b == "periodic" for b in boundary])
        out = {
            "numbers": traj["species"][()],
            "pbc": pbc,
            "step": traj["position/step"][()],
            "positions": traj["position/value"][()],
            "forces": traj["force_ev/value"][()],
            "energy": f["observables/potential_energy/value"][()],
            "fmax": f["observables/fmax/value"][()],
        }
        n_frames = len(out["step"])
        if "edges" in traj["box"]:
            out["cell"] = traj["box/edges/value"][()]
        else:
            out["cell"] = np.zeros((n_frames, 3, 3))
        if "stress" in f["observables"]:
            out["stress"] = f["observables/stress/value"][()]
    out["parameters"] = read_parameters(path)
    return out


def summary(path: Path) -> dict:
    """What a molopt trajectory holds, without reading the frames: formula, atoms, frames,
    potential, optimizer, status, first/last energy, last fmax, steps."""
    from molopt.elements import formula

    with h5py.File(path, "r") as f:
        traj = f["particles/trajectory"]
        energy = f["observables/potential_energy/value"]
        fmax = f["observables/fmax/value"]
        steps = traj["position/step"]
        n_frames = energy.shape[0]
        params = read_parameters(path)
        numbers = traj["species"][()]
        return {
            "file": str(path),
            "formula": formula(numbers),
            "n_atoms": int(len(numbers)),
            "n_frames": int(n_frames),
            "potential": params.get("potential_name"),
            "optimizer": params.get("optimizer"),
            "status": params.get("status"),
            "steps": int(steps[-1]) if n_frames else 0,
            "initial_energy": float(energy[0]) if n_frames else None,
            "final_energy": float(energy[-1]) if n_frames else None,
            "final_fmax": float(fmax[-1]) if n_frames else None,
            "input": params.get("input"),
            "relax_cell": bool(params.get("relax_cell", False)),
        }


#: What :func:`read` and :func:`summary` need of a molopt trajectory.
REQUIRED = (
    "h5md",
    "parameters",
    "particles/trajectory/species",
    "particles/trajectory/position/value",
    "particles/trajectory/position/step",
    "observables/potential_energy/value",
    "observables/fmax/value",
)


def not_a_trajectory(path: Path) -> str | None:
    """Why ``path`` is not a molopt trajectory that :func:`read` can read (missing, a
    directory, not HDF5, HDF5 without molopt's H5MD layout, unreadable), or None."""
    path = Path(path)
    if path.is_dir():
        return "is a directory, not a trajectory file"
    if not path.exists():
        return "no such file"
    try:
        if not h5py.is_hdf5(path):
            return "not an HDF5 file (molopt trajectories are .h5md files written by molopt relax)"
        with h5py.File(path, "r") as f:
            missing = [name for name in REQUIRED if name not in f]
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if missing:
        return f"an HDF5 file, but not a molopt trajectory (no /{missing[0]})"
    return None
