"""The Python API: relax ASE ``Atoms`` in-process, read trajectories, load potentials.

import molopt
relaxed = molopt.relax(atoms, potential="argon", optimizer="fire", fmax=0.01)
relaxed.get_potential_energy(), relaxed.info["molopt_status"]
frames = molopt.read_trajectory("results/x.h5md")        # list of Atoms
arrays = molopt.read_trajectory("results/x.h5md", as_atoms=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from molopt.errors import InputError


def load_potential(name_or_path):
    """A molopt potential (JAX pytree) by shipped name or file path. Passing a potential
    object returns it unchanged."""
    if hasattr(name_or_path, "evaluate"):
        return name_or_path
    from molopt.potentials.registry import load

    return load(name_or_path).potential


def relax(
    atoms_or_list,
    potential="argon",
    optimizer: str = "fire",
    fmax: float = 0.05,
    steps: int = 10_000,
    relax_cell: bool = False,
    pressure: float = 0.0,
    precision: str = "float64",
    cell_mask: str | None = None,
    hydrostatic: bool = False,
    constant_volume: bool = False,
    stress: str | None = None,
    fix_symmetry: bool = False,
    symprec: float | None = None,
    **optimizer_options,
):
    """Relax one ASE ``Atoms`` (returns ``Atoms``) or a list (returns a list, same order), all
    in one batch. ``pressure`` in GPa (with ``relax_cell``), and the cell options of
    ``molopt relax`` (``cell_mask="xx,yy,xy"``, ``stress="sxx,syy,szz,syz,sxz,sxy"`` in GPa,
    positive = tensile, ``hydrostatic``, ``constant_volume``); ``fix_symmetry`` keeps each
    structure's space group (ASE's ``FixSymmetry``, ``symprec`` A). With a list of
    structures, each of ``pressure``, ``cell_mask``, ``hydrostatic``, ``constant_volume``,
    ``stress`` and ``fix_symmetry`` may be a list with one value per structure (each
    structure then relaxes with its own, in the same batch). Other keywords are optimizer
    options: ``maxstep``, and for ``fire``/``fire2`` ``dmax`` (each atom's move capped alone,
    LAMMPS's rule: the fast route for large crystals). The inputs are not modified;
    the outputs carry energy, forces and (periodic) stress in a SinglePointCalculator and
    ``info['molopt_status']``, ``info['molopt_steps']``, ``info['molopt_fmax']``. Raises
    :class:`~molopt.errors.ConfigError` for invalid settings (checked as ``molopt relax``
    checks them) and :class:`~molopt.errors.InputError` for an invalid structure."""
    import dataclasses

    from molopt import config, symmetry
    from molopt.engine import relax_structures
    from molopt.errors import ConfigError
    from molopt.io.read import from_atoms
    from molopt.optimizers.cell_options import CellOptions
    from molopt.run import engine_settings

    single = not isinstance(atoms_or_list, Sequence)
    images = [atoms_or_list] if single else list(atoms_or_list)
    given = dict(
        pressure=pressure,
        cell_mask=cell_mask,
        hydrostatic=hydrostatic,
        constant_volume=constant_volume,
        stress=stress,
        fix_symmetry=fix_symmetry,
    )
    varying = {k for k, v in given.items() if isinstance(v, list | tuple)}
    for name in varying:
        if len(given[name]) != len(images):
            raise ConfigError(
                f"molopt.relax: {name} has {len(given[name])} values for {len(images)} structures"
            )

    def validated(k):
        values = {n: (v[k] if n in varying else v) for n, v in given.items()}
        values.pop("fix_symmetry")
        run = {
            "optimizer": optimizer,
            "optimizer_options": dict(optimizer_options),
            "fmax": fmax,
            "steps": steps,
            "relax_cell": relax_cell,
            "precision": precision,
            "trajectory_interval": 0,
            **values,
        }
        if symprec is not None:
            run["symprec"] = symprec
        return engine_settings(config.validate(run, "molopt.relax"))

    settings = validated(0)
    pot = load_potential(potential)
    structures = [from_atoms(a, f"<atoms {k}>") for k, a in enumerate(images)]
    for k, s in enumerate(structures):
        if not pot.covers(s.numbers):
            raise InputError(f"<atoms {k}>", "elements not covered by the potential")
        keep = fix_symmetry[k] if "fix_symmetry" in varying else fix_symmetry
        if keep:
            s = symmetry.prepare(s, symmetry.DEFAULT_SYMPREC if symprec is None else symprec)
        if varying - {"fix_symmetry"}:
            s = dataclasses.replace(s, cell_options=CellOptions.of(validated(k)))
        structures[k] = s
    items = list(enumerate(structures))
    results = {r.key: r for r in relax_structures(items, pot, settings)}
    out = [_result_atoms(images[k], results[k]) for k in range(len(images))]
    return out[0] if single else out


def _result_atoms(original, result):
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    atoms = original.copy()
    atoms.positions = result.structure.positions
    atoms.cell = result.structure.cell
    values = {"energy": result.energy, "forces": result.forces}
    if result.stress is not None:
        values["stress"] = full_3x3_to_voigt_6_stress(result.stress)
    atoms.calc = SinglePointCalculator(atoms, **values)
    atoms.info.update(
        molopt_status=result.status, molopt_steps=result.steps, molopt_fmax=result.fmax
    )
    return atoms


def read_trajectory(path, frames=":", as_atoms: bool = True):
    """Frames of a molopt H5MD trajectory: a list of ASE ``Atoms`` with energy and forces
    (eV, eV/A; stress with a variable cell), or with ``as_atoms=False`` the arrays (see
    :func:`molopt.io.h5md.read`) for the selected frames."""
    from molopt.io.h5md import read

    data = read(Path(path))
    index = _frame_index(frames, len(data["step"]))
    if not as_atoms:
        out = dict(data)
        for key in ("step", "positions", "forces", "energy", "fmax", "cell", "stress"):
            if key in out:
                out[key] = out[key][index]
        return out
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    from molopt.io.read import ase_constraints

    constraints = data["parameters"].get("constraints")
    images = []
    for t in np.atleast_1d(np.arange(len(data["step"]))[index]):
        atoms = Atoms(
            numbers=data["numbers"],
            positions=data["positions"][t],
            cell=data["cell"][t],
            pbc=data["pbc"],
        )
        values = {"energy": float(data["energy"][t]), "forces": data["forces"][t]}
        if "stress" in data:
            values["stress"] = full_3x3_to_voigt_6_stress(data["stress"][t])
        atoms.calc = SinglePointCalculator(atoms, **values)
        atoms.info.update(step=int(data["step"][t]), fmax=float(data["fmax"][t]))
        if constraints:
            atoms.set_constraint(ase_constraints(constraints))
        images.append(atoms)
    return images


def _frame_index(frames, n: int):
    """ASE-style frame selection: an int, a slice, or a string such as '-1', '::10', ':'."""
    if isinstance(frames, int | slice):
        selection = frames
    else:
        from molopt.io.ase_import import ase_io

        ase_io()
        from ase.io.formats import string2index

        selection = string2index(str(frames))
    if isinstance(selection, int):
        if not -n <= selection < n:
            raise IndexError(f"frame {selection} out of range ({n} frames)")
        return [selection % n]
    return np.arange(n)[selection]
