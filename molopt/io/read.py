"""Structure input: the only module that reads structure files (through ASE).

Inputs are files, directories (their structure files, not recursive unless asked) or glob
patterns. Files ASE cannot identify as structures are not inputs when found in a directory;
named explicitly, they fail with a reason. Each frame becomes a validated
:class:`~molopt.structure.Structure`, or an :class:`~molopt.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molopt.config import parse_index
from molopt.errors import ConfigError, InputError
from molopt.io.ase_import import ase_io
from molopt.structure import Structure, make_structure

#: Extensions that ASE maps to a format by name but that are never structures in practice
#: (README.md is not a CASTEP MD file) or are molopt's own outputs.
NOT_STRUCTURES = {
    ".md",
    ".txt",
    ".rst",
    ".log",
    ".toml",
    ".yaml",
    ".yml",
    ".ini",
    ".cfg",
    ".py",
    ".sh",
    ".csv",
    ".pdf",
    ".png",
    ".jpg",
    ".jpeg",
    ".svg",
    ".ipynb",
    ".h5md",
    ".h5",
    ".hdf5",
    ".gz",
    ".zip",
    ".tar",
    ".npz",
    ".npy",
    ".html",
    ".tmp",
}

#: Marker written into molopt's own extxyz outputs so directory scans skip them.
OUTPUT_MARKER = "molopt_run"


@dataclass(frozen=True)
class Frame:
    """One input frame: the structure, or why it cannot be relaxed."""

    path: Path
    index: int | None  # frame number in a multi-frame file, None for single-frame files
    stem: str  # output stem: <file stem> or <file stem>-<index>
    structure: Structure | None
    error: str | None = None
    sha256: str = ""

    @property
    def where(self) -> str:
        """The file, and the frame in a multi-frame file, as messages name them."""
        return f"{self.path}{'' if self.index is None else f' (frame {self.index})'}"


def _extension_formats() -> dict:
    """Extension -> the ASE formats named for it (computed once, from ASE's tables only)."""
    global _EXTENSIONS
    if _EXTENSIONS is None:
        ase_io()
        from ase.io.formats import extension2format, ioformats

        table: dict[str, list] = {}
        for fmt in ioformats.values():
            for ext in fmt.extensions:
                table.setdefault("." + ext.lower(), []).append(fmt)
        for ext, fmt in extension2format.items():
            table.setdefault("." + ext.lower(), []).append(fmt)
        _EXTENSIONS = table
    return _EXTENSIONS


_EXTENSIONS = None


def _has_readable_extension(path: Path) -> bool:
    """Whether ASE names a format it can read for this file's extension. ``can_read`` imports
    the format's module, so only the formats of extensions actually met are asked (asking all
    of them would import about 90 ASE modules to scan one directory)."""
    return any(
        getattr(fmt, "can_read", False) for fmt in _extension_formats().get(path.suffix.lower(), ())
    )


def _is_structure_file(path: Path) -> bool:
    ase_io()
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    if path.name.startswith(".") or path.suffix.lower() in NOT_STRUCTURES:
        return False
    if _has_readable_extension(path):
        return not _is_molopt_output(path)
    try:
        fmt = filetype(str(path), read=False)
    except UnknownFileTypeError:
        fmt = None
    if fmt in ioformats and ioformats[fmt].can_read:
        return not _is_molopt_output(path)
    try:  # no telling extension: look at the content (POSCAR, OUTCAR, ...)
        fmt = filetype(str(path), read=True, guess=False)
    except (UnknownFileTypeError, OSError, ValueError, IndexError):
        return False
    return fmt in ioformats and ioformats[fmt].can_read and not _is_molopt_output(path)


def _is_molopt_output(path: Path) -> bool:
    if path.suffix.lower() not in (".extxyz", ".xyz"):
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return OUTPUT_MARKER.encode() in head


def discover(inputs: list[str], recursive: bool = False) -> list[Path]:
    """Expand INPUT arguments into an ordered, de-duplicated list of files.

    Raises :class:`ConfigError` for a path that does not exist or a pattern matching nothing.
    """
    return [path for path, _ in discover_with_places(inputs, recursive)]


def discover_with_places(inputs: list[str], recursive: bool = False) -> list[tuple[Path, Path]]:
    """Like :func:`discover`, each file with the folder its outputs go to, relative to the
    output directory: ``Path(".")``, except for files found by a recursive search of a
    directory, whose outputs mirror the input tree (``DIR/a/POSCAR`` -> ``a/POSCAR.h5md``),
    so that files with the same name in different folders never collide."""
    found: list[tuple[Path, Path]] = []
    here = Path(".")
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found.extend(
                (p, p.parent.relative_to(path) if recursive else here)
                for p in sorted(path.glob(pattern))
                if p.is_file() and _is_structure_file(p)
            )
        elif path.exists():
            found.append((path, here))
        elif glob.has_magic(text):
            everything = sorted(Path(m) for m in glob.glob(text, recursive=recursive))
            matches = [m for m in everything if m.is_file() and _is_structure_file(m)]
            if not matches:
                folders = sum(m.is_dir() for m in everything)
                hint = (
                    f" (it matches {folders} director{'y' if folders == 1 else 'ies'}: name "
                    "them as inputs, with --recursive to search their sub-directories)"
                    if folders
                    else ""
                )
                raise ConfigError(f"{text}: no structure files match this pattern{hint}")
            found.extend((m, here) for m in matches)
        else:
            raise ConfigError(f"{text}: no such file or directory")
    if not found:
        raise ConfigError(_nothing_found(inputs, recursive))
    unique: dict[str, tuple[Path, Path]] = {}
    for p, place in found:
        unique.setdefault(os.path.realpath(p), (p, place))
    return list(unique.values())


def _nothing_found(inputs: list[str], recursive: bool) -> str:
    """What was searched when no input is a structure file, directory by directory, with
    the hint that applies (``--recursive`` for a directory of sub-directories)."""
    searched = []
    for text in inputs:
        path = Path(text)
        entries = sorted(path.iterdir()) if path.is_dir() else []
        folders = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file()]
        if not entries:
            what = "empty directory"
        elif recursive:
            what = "no structure files in it or its sub-directories"
        else:
            parts = []
            if files:
                parts.append(f"{len(files)} file(s), none a structure file (e.g. {files[0].name})")
            if folders:
                n = len(folders)
                parts.append(f"{n} sub-director{'y' if n == 1 else 'ies'}, not searched")
            what = "; ".join(parts)
            if folders:
                what += ": use --recursive to search sub-directories"
        searched.append(f"{text} ({what})")
    return "no structure files to relax; searched " + "; ".join(searched)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_COMPRESSED = (".gz", ".bz2", ".xz")

_XYZ_CHECKS = None


def _xyz_checks():
    """(one regular expression of ASE's file-name patterns, the formats whose content
    signature could match a file that starts with a line of digits), computed once."""
    global _XYZ_CHECKS
    if _XYZ_CHECKS is None:
        import fnmatch
        import re

        ase_io()
        from ase.io.formats import ioformats

        globs = [g for fmt in ioformats.values() for g in fmt.globs]
        names = re.compile("|".join(fnmatch.translate(g) for g in globs) or "(?!)")
        floating = []  # tests of data -> bool, one per signature
        for fmt in ioformats.values():
            if fmt.magic_regex:
                floating.append(fmt.match_magic)
                continue
            for m in fmt.magic:
                if m[:1] not in b"*?[ \t0123456789" and m:
                    continue  # anchored at a byte no line of digits starts with
                if m[:1] == b"*" and not any(c in m[1:] for c in b"*?["):
                    floating.append(lambda data, text=m[1:]: text in data)  # "*text*"
                else:
                    floating.append(fmt.match_magic)
        _XYZ_CHECKS = (names, floating)
    return _XYZ_CHECKS


def xyz_format(path: Path) -> str | None:
    """ "extxyz" for an .xyz/.extxyz file that ASE's detection would read as extxyz, found
    without running all of ASE's content checks (several times faster per small file):
    no ASE file-name pattern matches (POSCAR.xyz is VASP to ASE), the first line is an atom
    count, and no format whose signature may follow such a line claims it. None otherwise
    (ASE then detects the format as usual)."""
    if path.suffix.lower() not in (".xyz", ".extxyz"):
        return None
    names, floating = _xyz_checks()
    if names.match(path.name):
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read(2000)  # what ASE looks at (formats.PEEK_BYTES)
    except OSError:
        return None
    if not data.split(b"\n", 1)[0].strip().isdigit():
        return None
    if any(test(data) for test in floating):
        return None
    return "extxyz"


def ase_read(path, index=":", fmt: str | None = None):
    """``ase.io.read``, except that a compressed file (.gz, .bz2, .xz) is decompressed once
    into a temporary file first. ASE seeks back to each frame it has indexed, and every
    backward seek in a compressed stream decompresses again from the start, so reading a
    gzipped trajectory directly costs time quadratic in its number of frames."""
    aseio = ase_io()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _COMPRESSED:
        return aseio.read(str(path), index=index, format=fmt or xyz_format(path))
    import shutil
    import tempfile

    if suffix == ".gz":
        import gzip as codec
    elif suffix == ".bz2":
        import bz2 as codec
    else:
        import lzma as codec
    with tempfile.TemporaryDirectory(prefix="molopt-read-") as tmp:
        inner = Path(tmp) / path.stem  # keeps the inner name (x.extxyz) for format detection
        with codec.open(path, "rb") as source, open(inner, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        return aseio.read(str(inner), index=index, format=fmt)


def _reason(exc: Exception) -> str:
    return f"cannot be read as a structure ({_exception_text(exc)})"


def _exception_text(exc: Exception) -> str:
    """``Type: first line of the message`` of an exception ASE raised."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def read_frames(path: Path, index: str | None = None, fmt: str | None = None) -> list[Frame]:
    """All frames of ``path`` selected by ``index`` (ASE index syntax; default every frame).

    Never raises for a bad file: the error is carried in a single failed :class:`Frame`. A
    multi-frame file cut short or damaged in frame k still gives its frames before k; frame
    k, when selected, is a failed frame with the reason. An ``index`` past the end of the
    file fails with the number of frames the file has.
    """

    path = Path(path)
    stem = path.stem if path.suffix else path.name
    try:
        if path.stat().st_size == 0:
            return [Frame(path, None, stem, None, "file is empty")]
        sha = file_sha256(path)
    except OSError as exc:
        return [Frame(path, None, stem, None, f"cannot be read ({exc.strerror})")]
    selection = index if index is not None else ":"
    try:
        images = ase_read(path, selection, fmt)
    except Exception as exc:  # ASE raises many kinds; each is this file's problem only
        return _read_damaged(path, stem, index, fmt, sha, exc)
    if not isinstance(images, list):
        images = [images]
    if not images:
        if index is not None:
            count = _count_frames(path)
            return [Frame(path, None, stem, None, _out_of_range(index, count), sha)]
        return [Frame(path, None, stem, None, "contains no structures", sha)]
    numbers = _frame_numbers(path, selection, len(images))
    multi = len(images) > 1 or (index is not None and _selects_many(index))
    return [
        _frame(path, stem, k, atoms, multi, sha) for k, atoms in zip(numbers, images, strict=True)
    ]


def _frame(path: Path, stem: str, k: int, atoms, multi: bool, sha: str) -> Frame:
    """Frame ``k`` of ``path`` from its ASE ``atoms``, validated (a failed frame if not)."""
    frame_index = k if multi else None
    frame_stem = f"{stem}-{k}" if multi else stem
    try:
        structure = from_atoms(atoms, str(path), frame_index)
        return Frame(path, frame_index, frame_stem, structure, None, sha)
    except InputError as exc:
        return Frame(path, frame_index, frame_stem, None, exc.reason, sha)


def _read_damaged(path: Path, stem, index: str | None, fmt, sha: str, exc: Exception):
    """The frames of a file whose selected frames ASE could not read at once (``exc``): read
    one by one, the frames before the first one that fails are kept, and that frame, when
    ``index`` selects it, fails with the reason. A file whose first frame fails, and an
    ``index`` past the frames the file has, fail as a whole with the reason."""
    complete: list = []
    error: Exception = exc
    try:
        for atoms in _iread(path, fmt):
            complete.append(atoms)
        error = None
    except Exception as later:  # the frame after the complete ones is damaged
        error = later
    if not complete:
        return [Frame(path, None, stem, None, _reason(exc), sha)]
    broken = len(complete) if error is not None else None  # its frame number
    count = len(complete) + (error is not None)
    try:
        selection = parse_index(index) if index is not None else slice(None)
    except ValueError as bad:
        return [Frame(path, None, stem, None, f"--index {bad}", sha)]
    if isinstance(selection, int):
        numbers = [selection + count if selection < 0 else selection]
        if not 0 <= numbers[0] < count:
            return [Frame(path, None, stem, None, _out_of_range(index, count, broken), sha)]
    else:
        numbers = list(range(count))[selection]
        if not numbers:
            return [Frame(path, None, stem, None, _out_of_range(index, count, broken), sha)]
    multi = count > 1 and (index is None or _selects_many(index))
    frames = []
    for k in numbers:
        if k == broken:
            before = "frame 0 before it is" if k == 1 else f"frames 0 to {k - 1} before it are"
            reason = f"frame {k} is cut short or damaged ({_exception_text(error)}); {before} read"
            frames.append(
                Frame(
                    path, k if multi else None, f"{stem}-{k}" if multi else stem, None, reason, sha
                )
            )
        else:
            frames.append(_frame(path, stem, k, complete[k], multi, sha))
    return frames


def _iread(path: Path, fmt: str | None):
    """ASE's frame-by-frame reader of ``path`` (compressed files too)."""
    return ase_io().iread(str(path), index=":", format=fmt or xyz_format(path))


def _out_of_range(index: str, count: int | None, broken: int | None = None) -> str:
    """Why ``--index`` selects nothing in a file of ``count`` frames."""
    if count is None:
        return f"--index {index} selects no frame of this file"
    has = f"the file has {count} frame{'s' if count != 1 else ''}"
    if broken is not None:
        has += f", the last (frame {broken}) cut short or damaged"
    return f"--index {index} selects no frame: {has}"


def _selects_many(index: str) -> bool:
    return ":" in str(index)


def _frame_numbers(path: Path, selection: str, count: int) -> list[int]:
    """Frame numbers in the file for an ASE index expression (for output names)."""
    text = str(selection).strip()
    if ":" not in text:
        try:
            k = int(text)
        except ValueError:
            return list(range(count))
        if k < 0:
            total = _count_frames(path)
            return [total + k] if total is not None else [k]
        return [k]
    parts = [p.strip() for p in text.split(":")]
    start, stop, step = (parts + ["", ""])[:3]
    if not start and not stop and not step:
        return list(range(count))
    total = _count_frames(path)
    if total is None:
        return list(range(count))
    return list(range(total))[slice(*(int(p) if p else None for p in (start, stop, step)))]


def _count_frames(path: Path) -> int | None:
    try:
        return len(ase_read(path, ":"))
    except Exception:
        return None


#: Occupancies this close to 1 count as full (CIFs round them, e.g. 0.9999).
FULL_OCCUPANCY_TOLERANCE = 1e-3


def partial_occupancy(atoms) -> str | None:
    """Why ``atoms`` is not an ordered structure, or None: the sites that ASE's CIF reader
    (``atoms.info["occupancy"]``: site -> {element: occupancy}) found shared by several
    elements or not fully occupied. ASE keeps one element per such site, so relaxing it
    would relax a structure the file does not describe."""
    occupancy = atoms.info.get("occupancy")
    if not isinstance(occupancy, dict):
        return None
    partial = []
    for site, shares in occupancy.items():
        if not isinstance(shares, dict):
            continue
        if len(shares) > 1 or any(
            abs(float(v) - 1.0) > FULL_OCCUPANCY_TOLERANCE for v in shares.values()
        ):
            partial.append(f"site {site}: " + " + ".join(f"{e} {v:g}" for e, v in shares.items()))
    if not partial:
        return None
    shown = "; ".join(partial[:3]) + (f"; and {len(partial) - 3} more" if len(partial) > 3 else "")
    return (
        f"partially occupied sites ({shown}): molopt relaxes ordered structures only; "
        "make an ordered model of the disorder (e.g. a supercell) first"
    )


def from_atoms(atoms, source: str = "<memory>", index: int | None = None) -> Structure:
    """An ASE ``Atoms`` as a validated :class:`Structure` (its constraints carried over)."""
    from molopt import constraints as cons  # with JAX: not needed to list or hash inputs

    disorder = partial_occupancy(atoms)
    if disorder:
        raise InputError(source, disorder, index)
    constraints = _constraints(atoms, source, index)
    info = {
        k: v
        for k, v in atoms.info.items()
        if isinstance(v, str | int | float | bool) and k != CONSTRAINTS_KEY
    }
    arrays = {k: v for k, v in atoms.arrays.items() if k not in _OWN_ARRAYS}
    structure = make_structure(
        atoms.numbers,
        atoms.positions,
        atoms.cell.array,
        atoms.pbc,
        cons.fixed_atoms(constraints, len(atoms)),
        source=source,
        index=index,
        info=info,
        arrays=arrays,
    )
    if cons.needs_arrays(constraints):
        structure = dataclasses.replace(structure, constraints=constraints)
    return structure


#: the extxyz comment-line key where molopt keeps the constraints extxyz has no column for
CONSTRAINTS_KEY = "molopt_constraints"


def _constraints(atoms, source: str, index: int | None) -> tuple:
    """The constraints of ``atoms`` as :mod:`molopt.constraints` describes them, checked; a
    molopt extxyz's ``molopt_constraints`` (the constraints its columns cannot hold) when
    ``atoms`` came from one. An unsupported constraint is an :class:`InputError` naming it."""
    from molopt import constraints as cons

    saved = atoms.info.get(CONSTRAINTS_KEY)
    if isinstance(saved, str):
        try:
            described = [dict(c) for c in json.loads(saved)]
        except (ValueError, TypeError) as exc:
            raise InputError(source, f"unreadable {CONSTRAINTS_KEY} ({exc})", index) from exc
        return cons.validated(described, len(atoms), atoms.cell.array, source, index)
    described = []
    for constraint in atoms.constraints:
        name = type(constraint).__name__
        if name not in cons.SUPPORTED:
            hint = "; use --fix-symmetry instead" if name == "FixSymmetry" else ""
            raise InputError(
                source,
                f"constraint {name} is not supported by molopt (supported: "
                f"{', '.join(cons.SUPPORTED)}){hint}",
                index,
            )
        d = constraint.todict()
        masses = atoms.get_masses() if name in ("FixCom", "FixSubsetCom") else None
        described.append(cons.describe(d["name"], d.get("kwargs", {}), masses))
    return cons.validated(described, len(atoms), atoms.cell.array, source, index)


#: per-atom arrays of ASE ``Atoms`` that molopt sets itself (the rest are kept as they are)
_OWN_ARRAYS = ("numbers", "positions", "forces")


def described_constraints(structure: Structure) -> list:
    """Every constraint of ``structure`` as ASE's ``todict()`` descriptions (FixAtoms from
    its ``fixed`` mask when that is all it has)."""
    if structure.constraints:
        return [dict(c) for c in structure.constraints]
    if structure.fixed.any():
        return [
            {"name": "FixAtoms", "kwargs": {"indices": np.nonzero(structure.fixed)[0].tolist()}}
        ]
    return []


def ase_constraints(described) -> list:
    """ASE constraint objects from :func:`described_constraints`' descriptions."""
    from ase.constraints import dict2constraint

    return [dict2constraint({"name": c["name"], "kwargs": c["kwargs"]}) for c in described]


def to_atoms(structure: Structure):
    """A :class:`Structure` as ASE ``Atoms`` (FixAtoms restored)."""
    from ase import Atoms

    atoms = Atoms(
        numbers=structure.numbers,
        positions=structure.positions,
        cell=structure.cell,
        pbc=structure.pbc,
    )
    if structure.constraints or structure.fixed.any():
        atoms.set_constraint(ase_constraints(described_constraints(structure)))
    atoms.info.update(structure.info)
    for name, values in structure.arrays.items():
        atoms.arrays[name] = np.array(values)
    return atoms
