"""Reusable physics checks for any molopt potential (used by molopt's own tests; import them
in yours): finite-difference forces and stress, invariances, batch equals single.

Each check returns the largest deviation found, so callers choose their tolerance.
"""

from __future__ import annotations

import numpy as np

from molopt.structure import Structure


def _evaluate(structures, potential, stress=True):
    from molopt.engine import evaluate_structures

    return evaluate_structures(structures, potential, stress=stress)


def energy(structure: Structure, potential) -> float:
    return _evaluate([structure], potential, stress=False)[0][0]


def finite_difference_forces(
    structure: Structure, potential, delta: float = 1e-4, atoms=None
) -> float:
    """Max |F_analytic + dE/dx (central difference)| over the chosen atoms (default all)."""
    _, forces, _ = _evaluate([structure], potential, stress=False)[0]
    atoms = range(structure.n_atoms) if atoms is None else atoms
    displaced = []
    for i in atoms:
        for c in range(3):
            for sign in (+1, -1):
                pos = structure.positions.copy()
                pos[i, c] += sign * delta
                displaced.append(structure.with_positions(pos))
    energies = [e for e, _, _ in _evaluate(displaced, potential, stress=False)]
    worst = 0.0
    k = 0
    for i in atoms:
        for c in range(3):
            numeric = -(energies[k] - energies[k + 1]) / (2 * delta)
            worst = max(worst, abs(numeric - forces[i, c]))
            k += 2
    return worst


def finite_difference_stress(structure: Structure, potential, delta: float = 1e-5) -> float:
    """Max |stress - (1/V) dE/d(strain)| with central differences of symmetric strains."""
    _, _, stress = _evaluate([structure], potential)[0]
    strained = []
    for a in range(3):
        for b in range(3):
            for sign in (+1, -1):
                eps = np.zeros((3, 3))
                eps[a, b] += 0.5 * sign * delta
                eps[b, a] += 0.5 * sign * delta
                deform = np.eye(3) + eps
                strained.append(
                    structure.with_positions(structure.positions @ deform, structure.cell @ deform)
                )
    energies = [e for e, _, _ in _evaluate(strained, potential, stress=False)]
    numeric = (
        np.array([(energies[2 * k] - energies[2 * k + 1]) / (2 * delta) for k in range(9)]).reshape(
            3, 3
        )
        / structure.volume
    )
    return float(np.abs(numeric - stress).max())


def rotation_matrix(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def invariance(structure: Structure, potential, seed: int = 0) -> dict[str, float]:
    """Energy/force deviations under translation, rotation (cell rotated too) and
    permutation of atoms: {'translation': ..., 'rotation': ..., 'permutation': ...}."""
    rng = np.random.default_rng(seed)
    rot = rotation_matrix(seed)
    shift = rng.normal(size=3) * 3.0
    perm = rng.permutation(structure.n_atoms)
    variants = [
        structure,
        structure.with_positions(structure.positions + shift),
        structure.with_positions(structure.positions @ rot.T, structure.cell @ rot.T),
        Structure(
            structure.numbers[perm],
            structure.positions[perm],
            structure.cell,
            structure.pbc,
            structure.fixed[perm],
            structure.source,
        ),
    ]
    (e0, f0, _), (e1, f1, _), (e2, f2, _), (e3, f3, _) = _evaluate(variants, potential, False)
    return {
        "translation": max(abs(e1 - e0), float(np.abs(f1 - f0).max())),
        "rotation": max(abs(e2 - e0), float(np.abs(f2 - f0 @ rot.T).max())),
        "permutation": max(abs(e3 - e0), float(np.abs(f3 - f0[perm]).max())),
    }


def batch_versus_single(structures, potential) -> float:
    """Max deviation between evaluating structures together and one at a time."""
    together = _evaluate(structures, potential)
    worst = 0.0
    for s, (e, f, _) in zip(structures, together, strict=True):
        e1, f1, _ = _evaluate([s], potential)[0]
        worst = max(worst, abs(e - e1), float(np.abs(f - f1).max()))
    return worst
