"""Vibrational analysis of one structure file: the exact (autodiff) Hessian's eigenvalues and
the harmonic frequencies, as ``molopt hessian`` reports them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from molopt.errors import InputError, PotentialError
from molopt.structure import Structure

#: Frequencies below this (cm^-1) count as imaginary modes: the zero modes (translations,
#: rotations) come out as small numbers of either sign.
IMAGINARY_BELOW_CM1 = -10.0


def spectrum(structure: Structure, potential) -> dict:
    """``n_atoms``; ``eigenvalues_eV_per_A2``: the 3N eigenvalues of the (symmetrised) Hessian
    in ascending order; ``frequencies_cm1``: the 3N harmonic frequencies (negative numbers
    are imaginary); ``n_imaginary``: how many frequencies are below
    :data:`IMAGINARY_BELOW_CM1`. Plain Python numbers (JSON-ready)."""
    from molopt.analysis.hessian import frequencies_cm1, hessian

    h = hessian(structure, potential)
    eigenvalues = np.linalg.eigvalsh(0.5 * (h + h.T))
    frequencies = frequencies_cm1(structure, potential)
    return {
        "n_atoms": structure.n_atoms,
        "eigenvalues_eV_per_A2": eigenvalues.tolist(),
        "frequencies_cm1": frequencies.tolist(),
        "n_imaginary": int(np.sum(frequencies < IMAGINARY_BELOW_CM1)),
    }


def report(path: str | Path, potential: str | None = None, index: str = "0") -> dict:
    """:func:`spectrum` of frame ``index`` (ASE index syntax; the first selected frame) of
    the structure file ``path``, after ``file`` and ``potential`` (its name), followed by
    :func:`minimum_check`'s ``at_minimum`` and ``warning``: the potential
    ``potential`` (name or file), or the shipped one covering the structure. Raises
    InputError for an unreadable file or frame, PotentialError for an unknown potential or
    one that does not cover the structure."""
    from molopt.io.read import read_frames
    from molopt.potentials import registry

    text = str(path)
    path = Path(path)
    if path.is_dir():
        raise InputError(text, "is a directory, not a structure file")
    if not path.is_file():
        raise InputError(text, "no such file")
    frame = read_frames(path, index)[0]
    if frame.structure is None:
        raise InputError(text, frame.error)
    structure = frame.structure
    spec = registry.load(potential) if potential else registry.choose(structure.numbers)
    if not spec.covers(structure.numbers):
        raise PotentialError(f"{text}: elements not covered by potential '{spec.name}'")
    result = {"file": str(path), "potential": spec.name, **spectrum(structure, spec.potential)}
    return {**result, **minimum_check(result, text)}


def minimum_check(result: dict, where: str) -> dict:
    """``at_minimum``: whether the :func:`spectrum` ``result`` has no imaginary mode;
    ``warning``: for a structure that has some, a line saying it is not at a minimum (a
    saddle point or a structure not relaxed), how many modes and the lowest frequency
    (None at a minimum). Harmonic frequencies mean little away from a minimum."""
    n = result["n_imaginary"]
    if n == 0:
        return {"at_minimum": True, "warning": None}
    lowest = min(result["frequencies_cm1"])
    return {
        "at_minimum": False,
        "warning": (
            f"{where} is not at a minimum: {n} imaginary mode{'s' if n != 1 else ''} "
            f"(lowest {abs(lowest):.1f}i cm^-1); relax it (molopt relax) before reading "
            "frequencies"
        ),
    }
