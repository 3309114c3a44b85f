"""ASE's constraints in molopt's batches: host-side descriptions and pure JAX adjustments.

A structure's constraints are kept as ASE's own ``todict()`` descriptions (``{"name": ...,
"kwargs": {...}}``, JSON-able), in ASE's order, so that they travel into every output and back
(``ase.constraints.dict2constraint``) without this module importing ASE. Supported, with ASE's
semantics (``ase/constraints/``):

- linear per-atom constraints: ``FixAtoms``, ``FixCartesian`` (mask True = fixed component),
  ``FixScaled`` (mask in the cell's fractional coordinates), ``FixedLine``, ``FixedPlane``.
  Each is a (3, 3) map on an atom's row vector: forces ``f @ M_force``, steps
  ``d @ M_step`` (the same map but for ``FixScaled``, whose force map is ``C D C^-1`` and
  step map ``C^-1 D C``, C the cell rows, D the diagonal of free fractional components);
- ``Hookean`` springs (atom-atom and atom-point with the minimum image, atom-plane): a force
  added to the constrained forces and ``adjust_potential_energy`` added to the energy, as
  ``Atoms.get_potential_energy()`` reports it;
- ``FixCom`` and ``FixSubsetCom``: forces lose their mass-weighted component
  ``m_i (sum_j m_j f_j) / sum_j m_j^2``; steps are shifted so the centre of mass stays.

ASE applies constraints one after the other in list order (``Atoms.get_forces``,
``Atoms.set_positions``). Here linear maps are composed per atom; an atom's maps listed after
a spring on that atom act after the spring force is added (``force_after``), the others
before it (``force_before``). ``FixCom`` acts last, so it must be listed last. Orders that
cannot be written this way are refused with the reason.

Device arrays (:class:`Constraints`, carried in :class:`molopt.batch.Batch`) hold the maps
per padded atom, the FixCom masses, and the springs padded to a power of two.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from molopt.batch import system_sum
from molopt.errors import InputError
from molopt.linalg3 import inv3

#: Linear per-atom constraints (composed into per-atom maps).
LINEAR = ("FixAtoms", "FixCartesian", "FixScaled", "FixedLine", "FixedPlane")
#: Every constraint molopt honours (anything else fails the structure with its name).
SUPPORTED = LINEAR + ("Hookean", "FixCom", "FixSubsetCom")

SPRING_PAIR, SPRING_POINT, SPRING_PLANE = 0, 1, 2


class ConstraintError(ValueError):
    """A constraint molopt cannot honour, or an invalid one (the reason is the message)."""


# --- host side: descriptions ----------------------------------------------------------------


def _indices(kwargs: dict, n_atoms: int, name: str) -> np.ndarray:
    for key in ("indices", "a", "index"):
        if key in kwargs:
            raw = np.asarray(kwargs[key])
            break
    else:
        raise ConstraintError(f"{name} names no atoms")
    if raw.dtype == bool:
        raw = np.nonzero(raw)[0]
    idx = np.atleast_1d(raw).astype(np.int64)
    if idx.size and (idx.min() < -n_atoms or idx.max() >= n_atoms):
        raise ConstraintError(f"{name} names atom {int(idx.max())} of a {n_atoms}-atom structure")
    return np.mod(idx, n_atoms)


def _plain(value):
    """JSON-able copy of a constraint's keyword value (numpy -> lists and Python numbers)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def describe(name: str, kwargs: dict, masses: Sequence[float] | None = None) -> dict:
    """One constraint as molopt keeps it: ASE's ``todict()`` form with plain values, plus the
    atoms' ``masses`` for FixCom (ASE reads them from the Atoms; the description carries them
    so that a structure is complete on its own)."""
    out = {"name": name, "kwargs": {k: _plain(v) for k, v in kwargs.items()}}
    if masses is not None:
        out["masses"] = [float(m) for m in masses]
    return out


def fix_atoms(indices) -> dict:
    return describe("FixAtoms", {"indices": [int(i) for i in indices]})


def parse_fix(text: str) -> list[tuple]:
    """``--fix``: comma-separated terms, each selecting atoms to fix: ``7`` or ``0-11``
    (0-based indices, ranges inclusive), ``element:Pt``, ``z<5.0`` (also ``x``, ``y`` and
    ``>``; Cartesian A). Returns the terms as tuples; ValueError naming a bad term."""
    from molopt import elements

    terms = []
    for raw in str(text).split(","):
        term = raw.strip().replace(" ", "")
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", term)
        if match:
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            if last < first:
                raise ValueError(f"range {term!r} runs backwards")
            terms.append(("indices", first, last))
            continue
        if term.startswith("element:"):
            try:
                terms.append(("element", elements.number(term.removeprefix("element:"))))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{term!r}: unknown element") from exc
            continue
        match = re.fullmatch(r"([xyz])([<>])(.+)", term)
        if match:
            try:
                value = float(match.group(3))
            except ValueError:
                raise ValueError(f"{term!r}: {match.group(3)!r} is not a number") from None
            terms.append(("height", "xyz".index(match.group(1)), match.group(2), value))
            continue
        raise ValueError(
            f"term {raw.strip()!r} is none of: an index or range (0-11), element:Pt, z<5.0"
        )
    return terms


def selected_by_fix(text: str, numbers, positions) -> np.ndarray:
    """(n,) bool: the atoms any term of ``text`` (:func:`parse_fix`) selects; ValueError
    for an index past the structure's atoms."""
    numbers = np.asarray(numbers)
    positions = np.asarray(positions)
    n = len(numbers)
    chosen = np.zeros(n, bool)
    for term in parse_fix(text):
        if term[0] == "indices":
            if term[2] >= n:
                raise ValueError(f"--fix names atom {term[2]} of a {n}-atom structure")
            chosen[term[1] : term[2] + 1] = True
        elif term[0] == "element":
            chosen |= numbers == term[1]
        else:
            _, axis, op, value = term
            chosen |= positions[:, axis] < value if op == "<" else positions[:, axis] > value
    return chosen


def with_fix(structure, text: str):
    """``structure`` with the atoms ``--fix`` selects fixed: a FixAtoms appended to its
    constraints (:class:`InputError` naming it for an index it does not have)."""
    try:
        chosen = selected_by_fix(text, structure.numbers, structure.positions)
    except ValueError as exc:
        raise InputError(structure.source, str(exc), structure.index) from exc
    if not chosen.any():
        return structure
    constraints = tuple(structure.constraints)
    if structure.fixed.any() and not constraints:
        constraints = (fix_atoms(np.nonzero(structure.fixed)[0]),)
    constraints = constraints + (fix_atoms(np.nonzero(chosen)[0]),)
    if any(c["name"] in ("FixCom", "FixSubsetCom") for c in structure.constraints):
        raise InputError(
            structure.source,
            "--fix adds a FixAtoms after the structure's FixCom, which must come last",
            structure.index,
        )
    return dataclasses.replace(
        structure,
        fixed=structure.fixed | chosen,
        constraints=constraints if needs_arrays(constraints) else (),
    )


def fixed_atoms(constraints: Sequence[dict], n_atoms: int) -> np.ndarray:
    """(n,) bool: the atoms some FixAtoms fixes."""
    fixed = np.zeros(n_atoms, bool)
    for c in constraints:
        if c["name"] == "FixAtoms":
            fixed[_indices(c["kwargs"], n_atoms, "FixAtoms")] = True
    return fixed


def check(constraints: Sequence[dict], n_atoms: int, cell: np.ndarray) -> None:
    """Raise :class:`ConstraintError` naming the first constraint molopt cannot honour."""
    _linear_maps(constraints, n_atoms, cell)


def needs_arrays(constraints: Sequence[dict]) -> bool:
    """Whether anything beyond FixAtoms (which the batch's ``fixed`` mask covers) is there."""
    return any(c["name"] != "FixAtoms" for c in constraints)


def _linear(name: str, kwargs: dict, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(force map, step map) of one linear constraint, row-vector convention."""
    if name == "FixAtoms":
        return np.zeros((3, 3)), np.zeros((3, 3))
    if name == "FixCartesian":
        free = np.diag((~np.asarray(kwargs.get("mask", (True,) * 3), bool)).astype(float))
        return free, free
    if name == "FixScaled":
        free = np.diag((~np.asarray(kwargs.get("mask", (True,) * 3), bool)).astype(float))
        if abs(np.linalg.det(cell)) < 1e-12:
            raise ConstraintError("FixScaled needs a cell with three non-zero vectors")
        inverse = np.linalg.inv(cell)
        return cell @ free @ inverse, inverse @ free @ cell
    direction = np.asarray(kwargs["direction"], float)
    norm = np.linalg.norm(direction)
    if not norm > 0:
        raise ConstraintError(f"{name} has a zero direction")
    u = direction / norm
    along = np.outer(u, u)
    m = along if name == "FixedLine" else np.eye(3) - along
    return m, m


def _spring_atoms(kwargs: dict, n_atoms: int) -> tuple[int, list[int]]:
    """(kind, atoms) of a Hookean description."""
    a2 = kwargs["a2"]
    a1 = int(kwargs["a1"])
    if isinstance(a2, int | np.integer):
        kind, atoms = SPRING_PAIR, [a1, int(a2)]
    elif len(a2) == 3:
        kind, atoms = SPRING_POINT, [a1]
    elif len(a2) == 4:
        kind, atoms = SPRING_PLANE, [a1]
    else:
        raise ConstraintError("Hookean a2 is neither an atom, a point nor a plane")
    if any(not -n_atoms <= a < n_atoms for a in atoms):
        raise ConstraintError(f"Hookean names an atom outside the {n_atoms}-atom structure")
    return kind, [a % n_atoms for a in atoms]


@dataclass(frozen=True)
class HostArrays:
    """One structure's constraint arrays (n atoms): maps (n, 3, 3), FixCom masses (n,) and
    whether the whole structure shifts with its centre of mass; springs as a list of
    (kind, atom1, atom2, k eV/A^2, rt A, target (4,)); ``scaled_free`` (n, 3) the free
    fractional components of atoms held by FixScaled alone (NaN elsewhere), whose force map
    follows the current cell; ``scaled_mixed``: an atom has FixScaled and another linear
    constraint or a spring (its maps are fixed to the starting cell)."""

    force_before: np.ndarray
    force_after: np.ndarray
    step: np.ndarray
    com_mass: np.ndarray
    com: bool
    springs: list
    scaled_free: np.ndarray
    scaled_mixed: bool


def _linear_maps(constraints: Sequence[dict], n_atoms: int, cell: np.ndarray) -> HostArrays:
    force_before = np.broadcast_to(np.eye(3), (n_atoms, 3, 3)).copy()
    force_after = force_before.copy()
    step = force_before.copy()
    sprung = np.zeros(n_atoms, bool)  # a spring force was added to this atom already
    after_set = np.zeros(n_atoms, bool)
    com_mass = np.zeros(n_atoms)
    com = False
    springs = []
    scaled_free = np.ones((n_atoms, 3))
    scaled = np.zeros(n_atoms, bool)  # held by FixScaled
    other = np.zeros(n_atoms, bool)  # held by another linear constraint or a spring
    for position, c in enumerate(constraints):
        name, kwargs = c["name"], c.get("kwargs", {})
        if name not in SUPPORTED:
            raise ConstraintError(
                f"constraint {name} is not supported by molopt (supported: {', '.join(SUPPORTED)})"
            )
        if com:
            raise ConstraintError(
                f"{name} is listed after FixCom; molopt applies FixCom last, so it must be the "
                "last constraint"
            )
        try:
            if name in LINEAR:
                idx = _indices(kwargs, n_atoms, name)
                m_force, m_step = _linear(name, kwargs, np.asarray(cell, float))
                if name == "FixScaled":
                    scaled[idx] = True
                    scaled_free[idx] *= ~np.asarray(kwargs.get("mask", (True,) * 3), bool)
                else:
                    other[idx] = True
                for i in idx:
                    if sprung[i]:
                        force_after[i] = force_after[i] @ m_force
                        after_set[i] = True
                    else:
                        force_before[i] = force_before[i] @ m_force
                    step[i] = step[i] @ m_step
            elif name == "Hookean":
                kind, atoms = _spring_atoms(kwargs, n_atoms)
                if after_set[atoms].any():
                    raise ConstraintError(
                        f"Hookean (constraint {position}) acts on an atom that an earlier "
                        "constraint already restricts after another spring; molopt cannot "
                        "keep that order"
                    )
                sprung[atoms] = True
                other[atoms] = True
                k = float(kwargs["k"])
                rt = kwargs.get("rt")
                rt = 0.0 if rt is None else float(rt)
                target = np.zeros(4)
                if kind != SPRING_PAIR:
                    a2 = np.asarray(kwargs["a2"], float)
                    target[: a2.size] = a2
                    if kind == SPRING_PLANE and not np.linalg.norm(a2[:3]) > 0:
                        raise ConstraintError("Hookean plane has a zero normal")
                springs.append((kind, atoms[0], atoms[-1], k, rt, target))
            else:  # FixCom, FixSubsetCom
                masses = c.get("masses")
                if masses is None or len(masses) != n_atoms:
                    raise ConstraintError(f"{name} carries no masses for the structure's atoms")
                idx = np.arange(n_atoms) if name == "FixCom" else _indices(kwargs, n_atoms, name)
                com_mass[idx] = np.asarray(masses, float)[idx]
                com = True
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConstraintError):
                raise
            raise ConstraintError(f"{name} cannot be read ({type(exc).__name__}: {exc})") from exc
    alone = scaled & ~other
    scaled_free[~alone] = np.nan
    mixed = bool((scaled & other).any())
    return HostArrays(force_before, force_after, step, com_mass, com, springs, scaled_free, mixed)


def cell_refusal(constraints: Sequence[dict], n_atoms: int, cell: np.ndarray) -> str | None:
    """Why these constraints cannot be kept while the cell relaxes, or None. Every supported
    constraint can, but for an atom held by FixScaled and by something else: its maps would
    have to follow the cell."""
    if not any(c["name"] == "FixScaled" for c in constraints):
        return None
    if host_arrays(constraints, n_atoms, cell).scaled_mixed:
        return (
            "--relax-cell cannot keep FixScaled on an atom that another constraint (or a "
            "Hookean spring) also holds"
        )
    return None


def host_arrays(constraints: Sequence[dict], n_atoms: int, cell: np.ndarray) -> HostArrays:
    """The arrays of one structure's constraints (raises :class:`ConstraintError`)."""
    return _linear_maps(constraints, n_atoms, cell)


def validated(constraints: Sequence[dict], n_atoms: int, cell, source: str, index=None) -> tuple:
    """``constraints`` as a tuple, checked; an :class:`InputError` naming the structure and the
    constraint otherwise."""
    try:
        check(constraints, n_atoms, np.asarray(cell, float))
    except ConstraintError as exc:
        raise InputError(source, str(exc), index) from exc
    return tuple(constraints)


# --- device side ----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Constraints:
    """A batch's constraints beyond FixAtoms. Per padded atom: ``force_before``,
    ``force_after``, ``step`` (A, 3, 3) row-vector maps (identity where unconstrained),
    ``com_mass`` (A,) amu (0 outside FixCom sets). Per system: ``com`` (S,) bool. Springs (K
    padded, padding has ``spring_system`` S and k 0): ``spring_atoms`` (K, 2) rows,
    ``spring_kind`` (K,), ``spring_k`` (K,) eV/A^2, ``spring_rt`` (K,) A, ``spring_target``
    (K, 4) point (A) or plane coefficients, ``spring_system`` (K,). ``scaled_free`` (A, 3):
    for atoms held by FixScaled alone, the free fractional components (their force map
    ``C D C^-1`` is built from the current cell C, and their step map is the same in the
    fractional frame of any cell); NaN for every other atom."""

    force_before: jax.Array
    force_after: jax.Array
    step: jax.Array
    com_mass: jax.Array
    com: jax.Array
    spring_atoms: jax.Array
    spring_kind: jax.Array
    spring_k: jax.Array
    spring_rt: jax.Array
    spring_target: jax.Array
    spring_system: jax.Array
    scaled_free: jax.Array


def pack(per_structure: Sequence[HostArrays], offsets, n_padded_atoms: int, n_systems: int, dtype):
    """The batch's :class:`Constraints` from each structure's :class:`HostArrays` (atom rows
    ``offsets[k]:offsets[k+1]``)."""
    A, S = n_padded_atoms, n_systems
    eye = np.broadcast_to(np.eye(3, dtype=dtype), (A, 3, 3))
    force_before, force_after, step = eye.copy(), eye.copy(), eye.copy()
    com_mass = np.zeros(A, dtype)
    com = np.zeros(S, bool)
    scaled_free = np.full((A, 3), np.nan, dtype)
    springs = []
    for k, h in enumerate(per_structure):
        rows = slice(int(offsets[k]), int(offsets[k + 1]))
        force_before[rows] = h.force_before
        force_after[rows] = h.force_after
        step[rows] = h.step
        com_mass[rows] = h.com_mass
        com[k] = h.com
        scaled_free[rows] = h.scaled_free
        for kind, a1, a2, spring, rt, target in h.springs:
            springs.append((kind, a1 + offsets[k], a2 + offsets[k], spring, rt, target, k))
    K = 1 if len(springs) <= 1 else 2 ** int(np.ceil(np.log2(len(springs))))
    atoms = np.zeros((K, 2), np.int32)
    kind = np.zeros(K, np.int32)
    spring_k = np.zeros(K, dtype)
    rt = np.zeros(K, dtype)
    target = np.zeros((K, 4), dtype)
    system = np.full(K, S, np.int32)
    for j, (kd, a1, a2, sk, r, t, sys) in enumerate(springs):
        atoms[j] = a1, a2
        kind[j], spring_k[j], rt[j], target[j], system[j] = kd, sk, r, t, sys
    put = jax.device_put
    return Constraints(
        put(force_before),
        put(force_after),
        put(step),
        put(com_mass),
        put(com),
        put(atoms),
        put(kind),
        put(spring_k),
        put(rt),
        put(target),
        put(system),
        put(scaled_free),
    )


def _minimum_image(v, cell, pbc):
    """(K, 3) displacements to their shortest periodic image (cells (K, 3, 3), pbc (K, 3));
    unchanged where nothing is periodic, as ASE's ``find_mic``."""
    safe = jnp.where(pbc[:, :, None], cell, jnp.eye(3, dtype=v.dtype))
    frac = jnp.linalg.solve(jnp.swapaxes(safe, 1, 2), v[:, :, None])[:, :, 0]
    frac = frac - jnp.where(pbc, jnp.round(frac), 0.0)
    shifts = jnp.asarray(np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3))
    shifts = shifts.astype(v.dtype)[None] * pbc[:, None, :]
    candidates = jnp.einsum("kni,kij->knj", frac[:, None, :] + shifts, safe)
    best = jnp.argmin(jnp.sum(candidates**2, axis=-1), axis=1)
    wrapped = jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]
    return jnp.where(jnp.any(pbc, axis=1, keepdims=True), wrapped, v)


def spring_forces(c: Constraints, positions, cell, pbc, n_systems: int):
    """Hookean forces (A, 3) eV/A and energies (S,) eV, as ASE's ``adjust_forces`` and
    ``adjust_potential_energy``."""
    S = n_systems
    system = jnp.minimum(c.spring_system, S - 1)
    real = c.spring_system < S
    p1 = positions[c.spring_atoms[:, 0]]
    p2 = jnp.where((c.spring_kind == SPRING_PAIR)[:, None], positions[c.spring_atoms[:, 1]], 0.0)
    p2 = jnp.where((c.spring_kind == SPRING_POINT)[:, None], c.spring_target[:, :3], p2)
    displace = _minimum_image(p2 - p1, cell[system], pbc[system] & real[:, None])
    length = jnp.sqrt(jnp.sum(displace**2, axis=1))
    stretched = length > c.spring_rt
    safe_length = jnp.where(stretched, length, 1.0)
    magnitude = jnp.where(stretched, c.spring_k * (length - c.spring_rt), 0.0)
    force = displace / safe_length[:, None] * magnitude[:, None]
    energy = jnp.where(stretched, 0.5 * c.spring_k * (length - c.spring_rt) ** 2, 0.0)
    # atom-plane: A x + B y + C z + D = 0, pushed back when on the normal's side
    normal = c.spring_target[:, :3]
    norm = jnp.sqrt(jnp.sum(normal**2, axis=1))
    plane = c.spring_kind == SPRING_PLANE
    norm = jnp.where(plane, norm, 1.0)
    d = (jnp.sum(normal * p1, axis=1) + c.spring_target[:, 3]) / norm
    plane_force = -(normal / norm[:, None]) * jnp.where(d >= 0, c.spring_k * d, 0.0)[:, None]
    force = jnp.where(plane[:, None], plane_force, force)
    energy = jnp.where(plane, jnp.where(d > 0, 0.5 * c.spring_k * d**2, 0.0), energy)
    force = jnp.where(real[:, None], force, 0.0)
    energy = jnp.where(real, energy, 0.0)
    forces = jnp.zeros_like(positions).at[c.spring_atoms[:, 0]].add(force)
    on_second = jnp.where((c.spring_kind == SPRING_PAIR)[:, None], -force, 0.0)
    forces = forces.at[c.spring_atoms[:, 1]].add(on_second)
    energies = jax.ops.segment_sum(energy, c.spring_system, num_segments=S)
    return forces, energies


def _system_of_atoms(system_idx, n_systems: int):
    return jnp.minimum(system_idx, n_systems - 1)


def adjust_forces(c: Constraints, forces, positions, cell, pbc, system_idx, n_systems: int):
    """Forces (A, 3) as ASE's optimizers see them (``Atoms.get_forces()``) and the springs'
    energies (S,) to add to the potential energy."""
    before = c.force_before
    scaled = ~jnp.isnan(c.scaled_free[:, 0])
    # FixScaled alone: C D C^-1 with the current cell C, as ASE (the cell may relax)
    rows = cell[_system_of_atoms(system_idx, n_systems)]
    safe = jnp.where(scaled[:, None, None], rows, jnp.eye(3, dtype=forces.dtype))
    free = jnp.where(scaled[:, None], c.scaled_free, 1.0)
    current = jnp.einsum("aij,aj,ajk->aik", safe, free, inv3(safe))
    before = jnp.where(scaled[:, None, None], current, before)
    f = jnp.einsum("ai,aij->aj", forces, before)
    extra, energies = spring_forces(c, positions, cell, pbc, n_systems)
    f = jnp.einsum("ai,aij->aj", f + extra, c.force_after)
    m = c.com_mass[:, None]
    weighted = system_sum(m * f, system_idx, n_systems)
    squares = system_sum(c.com_mass**2, system_idx, n_systems)
    lam = weighted / jnp.where(squares > 0, squares, 1.0)[:, None]
    f = f - m * lam[_system_of_atoms(system_idx, n_systems)]
    return f, energies


def adjust_step(c: Constraints, step, system_idx, n_systems: int, deformation=None):
    """An optimizer's step (A, 3) as ``Atoms.set_positions`` applies it: each atom's map,
    then the whole system shifted back to its centre of mass where FixCom holds it. With a
    variable cell the step is in the reference cell's frame (Cartesian = step @ F^T) and
    ``deformation`` (S, 3, 3) is each system's F after the step: ASE's filter sets the new
    cell first, so the Cartesian maps act on the Cartesian step, ``F^T M F^-T`` in this
    frame; FixScaled's map is built in the starting (reference) cell, which is already this
    frame's; FixCom's shift is linear, the same in either frame."""
    atom_system = _system_of_atoms(system_idx, n_systems)
    maps = c.step
    if deformation is not None:
        forward = jnp.swapaxes(deformation, 1, 2)[atom_system]  # F^T per atom
        # FixScaled alone (and padding) need no conjugation: the starting cell's fractional
        # map is every deformed cell's, in this frame
        keep = ~jnp.isnan(c.scaled_free[:, 0]) | (system_idx >= n_systems)
        forward = jnp.where(keep[:, None, None], jnp.eye(3, dtype=step.dtype), forward)
        maps = forward @ maps @ inv3(forward)
    d = jnp.einsum("ai,aij->aj", step, maps)
    moved = system_sum(c.com_mass[:, None] * d, system_idx, n_systems)
    total = system_sum(c.com_mass, system_idx, n_systems)
    shift = -moved / jnp.where(total > 0, total, 1.0)[:, None]
    on = c.com[atom_system] & (system_idx < n_systems)
    return d + jnp.where(on[:, None], shift[atom_system], 0.0)
