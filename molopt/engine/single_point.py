"""Single-point evaluations: energy, forces and stress of structures packed into one batch
(final results, the ASE calculator, training metrics)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from molopt._jax import jax
from molopt.engine.kernel import cast_potential, evaluate_once
from molopt.engine.packing import neighbor_lists, pack_structures
from molopt.potentials.base import PotentialMethods as Potential
from molopt.structure import Structure


def evaluate_structures(
    structures: Sequence[Structure],
    potential: Potential,
    stress: bool = True,
    precision: str = "float64",
    skin: float = 0.0,
):
    """Energy (eV), forces (n, 3) eV/A and stress (3, 3) eV/A^3 (None unless periodic in all
    directions) of each structure, evaluated together in one padded batch."""
    dtype = np.float64 if precision == "float64" else np.float32
    potential = cast_potential(potential, dtype)
    batch, positions, cells, layout = pack_structures(structures, potential, dtype)
    host = neighbor_lists(positions, cells, batch.pbc, layout, potential, max(skin, 1e-9), dtype)
    ev = jax.device_get(
        evaluate_once(
            jax.device_put(positions),
            jax.device_put(cells),
            batch,
            host.to_device(),
            potential,
            stress,
        )
    )
    out = []
    for k, st in enumerate(structures):
        rows = layout.atoms_of(k)
        s = None
        if stress and st.pbc.all():
            s = np.asarray(ev.dE_dstrain[k], np.float64) / st.volume
        out.append((float(ev.energy[k]), np.asarray(ev.forces[rows], np.float64), s))
    return out
