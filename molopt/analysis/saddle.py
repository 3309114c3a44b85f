"""Leaving saddle points: after a structure converges, the lowest eigenvalue of its Hessian
(:func:`molopt.analysis.hessian.lowest_modes`) says whether it is a minimum; on negative
curvature the structure is displaced down that mode and relaxed again. Plugs into the engine
as its ``after_converged`` hook."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from molopt.engine import RelaxResult, evaluate_structures
from molopt.structure import Structure


@dataclass(frozen=True)
class SaddleEscape:
    """``threshold`` eV/A^2: a lowest eigenvalue below it is a saddle point; at most
    ``max_restarts`` new starts per structure. Records ``lowest_eigenvalue`` and ``restarts``
    in each converged result's ``extra``."""

    threshold: float = -1e-4
    max_restarts: int = 5

    def __call__(self, result: RelaxResult, restarts: int, potential) -> Structure | None:
        from molopt.analysis.hessian import lowest_modes

        values, vectors = lowest_modes(result.structure, potential, k=1)
        lowest = float(values[0])
        result.extra["lowest_eigenvalue"] = lowest
        result.extra["restarts"] = restarts
        if lowest >= self.threshold or restarts >= self.max_restarts:
            return None
        mode = vectors[:, 0].reshape(-1, 3)
        mode = mode / np.abs(np.linalg.norm(mode, axis=1)).max()  # largest atom move: 1 A
        mode[result.structure.fixed] = 0.0
        # a saddle can be very flat: step along the mode to the lowest of a few trial points
        # (largest atom move 0.05 to 1.6 A, both directions) so the relaxation has forces
        trials = [
            result.structure.with_positions(result.structure.positions + sign * d * mode)
            for d in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
            for sign in (1.0, -1.0)
        ]
        energies = [e for e, _, _ in evaluate_structures(trials, potential, stress=False)]
        return trials[int(np.argmin(energies))]
