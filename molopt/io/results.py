"""Per-structure outputs beside the trajectory: the relaxed extxyz, JSON records, and the
bookkeeping that makes reruns skip finished work and refuse to overwrite other runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from molopt.io.atomic import write_atomically
from molopt.io.read import CONSTRAINTS_KEY, OUTPUT_MARKER, to_atoms


def run_hash(input_sha256: str, index, settings: dict, potential_sha256: str) -> str:
    """Identity of one structure's relaxation: input bytes + frame + result-affecting
    settings + potential file(s). Equal hashes mean a rerun would redo identical work."""
    payload = json.dumps(
        {
            "input": input_sha256,
            "index": index,
            "settings": settings,
            "potential": potential_sha256,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def output_paths(out_dir: Path, stem: str) -> tuple[Path, Path]:
    return out_dir / f"{stem}.h5md", out_dir / f"{stem}.extxyz"


def write_extxyz(path: Path, result, info: dict) -> Path:
    """The relaxed structure with energy, forces and (periodic) stress, written as ASE writes
    a calculator's results; ``info`` goes into the comment line. Atomic (temp + rename)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    from molopt.io.ase_import import ase_io

    aseio = ase_io()
    atoms = to_atoms(result.structure)
    # the calculator's energy is the potential's: ASE adds the springs (Hookean) itself when
    # the file is read back and asked for its potential energy, as molopt's energy includes
    springs = sum(
        c.adjust_potential_energy(atoms)
        for c in atoms.constraints
        if hasattr(c, "adjust_potential_energy")
    )
    results = {"energy": float(result.energy) - springs, "forces": np.asarray(result.forces)}
    if result.stress is not None:
        results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(result.stress))
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info = {k: v for k, v in atoms.info.items() if k not in ("energy", "stress")}
    atoms.info.update(info)
    if result.structure.constraints:  # extxyz's move_mask holds FixAtoms/FixCartesian only
        atoms.info[CONSTRAINTS_KEY] = json.dumps(list(result.structure.constraints))
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: aseio.write(str(tmp), atoms, format="extxyz"))


def combine_extxyz(target: Path, sources: list, indices: list) -> Path:
    """One extxyz of the frames in ``sources`` (relaxed extxyz outputs), each with its input
    frame number as ``molopt_index``. Atomic (temp + rename)."""
    from molopt.io.ase_import import ase_io

    aseio = ase_io()
    images = []
    for source, index in zip(sources, indices, strict=True):
        atoms = aseio.read(str(source), format="extxyz")
        atoms.info["molopt_index"] = index
        images.append(atoms)
    return write_atomically(target, lambda tmp: aseio.write(str(tmp), images, format="extxyz"))


def read_marker(path: Path) -> str | None:
    """The run hash stored in a molopt extxyz output (None if absent or unreadable)."""
    try:
        with open(path) as handle:
            handle.readline()
            comment = handle.readline()
    except (OSError, UnicodeDecodeError):
        return None
    key = f"{OUTPUT_MARKER}="
    if key not in comment:
        return None
    return comment.split(key, 1)[1].split()[0].strip('"')


#: the parameters of an earlier run that deciding what to do with a structure needs: its
#: identity, and what a ``skipped`` record repeats
PREVIOUS_KEYS = ("run_hash", "status", "energy_final", "fmax_final", "steps", "potential_name")


def previous_run(out_dir: Path, stem: str) -> tuple[str, dict | None]:
    """The state of a structure's outputs and the parameters of the run that wrote them:

    * ``absent``: nothing (None);
    * ``complete``: the trajectory and the extxyz of one run (the trajectory is renamed into
      place last, and the extxyz carries the same run hash);
    * ``incomplete``: the trajectory without its extxyz (deleted, or replaced by another
      file): the structure is not done; its parameters say which run it was;
    * ``partial``: an extxyz alone (a run stopped between the two renames), ``run_hash``
      read from it.

    An unreadable trajectory counts as a complete run of unknown identity, so that it is
    never overwritten silently. Of the parameters, only :data:`PREVIOUS_KEYS` are read."""
    from molopt.io.h5md import read_parameters

    h5md_path, xyz_path = output_paths(out_dir, stem)
    if h5md_path.exists():
        try:
            parameters = read_parameters(h5md_path, PREVIOUS_KEYS)
        except Exception:
            return "complete", {"run_hash": "<unreadable>"}
        marker = read_marker(xyz_path) if xyz_path.exists() else None
        if marker is None or marker != parameters.get("run_hash"):
            return "incomplete", parameters
        return "complete", parameters
    if xyz_path.exists():
        return "partial", {"run_hash": read_marker(xyz_path)}
    return "absent", None


def failed_record(frame, reason: str, **extra) -> dict:
    """The record of input ``frame`` (a :class:`~molopt.io.read.Frame`) that failed for
    ``reason``; the message names the file and the frame."""
    return record(
        input=frame.path,
        index=frame.index,
        output=None,
        status="failed",
        error=f"{frame.where}: {reason}",
        **extra,
    )


def record(
    *, input, index, output, status, energy=None, fmax=None, steps=None, error=None, **extra
) -> dict:
    """One JSON record (SPEC keys first)."""

    def clean(x):
        if x is None:
            return None
        x = float(x)
        return x if np.isfinite(x) else None

    out = {
        "input": str(input),
        "index": index,
        "output": None if output is None else str(output),
        "status": status,
        "energy": clean(energy),
        "fmax": clean(fmax),
        "steps": None if steps is None else int(steps),
        "error": error,
    }
    out.update(extra)
    return out
