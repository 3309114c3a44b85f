"""Lennard-Jones 12-6 pair potential, E = sum_{i<j} 4 eps [(sig/r)^12 - (sig/r)^6] - e_shift.

With ``shift`` (the default, as ASE's ``LennardJones(smooth=False)``) each pair energy is
shifted by its value at the cutoff so that it goes to zero there. Per-element parameters are
combined by the Lorentz-Berthelot rule (sigma arithmetic, epsilon geometric mean) unless a
pair is given explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from molopt._jax import jax
from molopt.batch import system_sum
from molopt.neighbors import (
    SLOT_GROUP_MIN,
    extended_positions,
    pair_vectors,
    slot_group,
    sum_over_groups,
    sum_over_slots,
)
from molopt.potentials.base import Evaluation, PotentialMethods, static_pytree


def _nested_tuple(table) -> tuple:
    """Static tables must be hashable (they are part of the jit cache key)."""
    return tuple(tuple(row) for row in np.asarray(table).tolist())


def _static(**kwargs):
    return field(metadata={"static": True}, **kwargs)


@static_pytree
@dataclass(frozen=True, eq=False)
class LennardJones(PotentialMethods):
    """Parameters per element: ``epsilon`` (n,) eV, ``sigma`` (n,) A; pair overrides where
    ``override`` (n, n) is True: ``pair_epsilon``/``pair_sigma`` (n, n). ``pair_cutoff`` (n, n) A
    (static numpy), ``shift`` static. A pytree (parameters are leaves; fields marked static
    are part of its structure); frozen, compared by identity."""

    elements: tuple = _static()
    cutoff: float = _static()
    epsilon: jax.Array
    sigma: jax.Array
    pair_epsilon: jax.Array
    pair_sigma: jax.Array
    override: tuple = _static()
    pair_cutoff: tuple = _static()
    shift: bool = _static(default=True)

    uses_ghosts = True  # (a class constant, not a field)
    #: XLA temporaries per neighbour slot of a force+stress call in float64, measured
    #: (:mod:`molopt.engine.memory`)
    slot_bytes = 128

    def __post_init__(self):
        object.__setattr__(self, "elements", tuple(int(z) for z in self.elements))
        object.__setattr__(self, "cutoff", float(self.cutoff))
        object.__setattr__(self, "override", _nested_tuple(self.override))
        object.__setattr__(self, "pair_cutoff", _nested_tuple(self.pair_cutoff))
        n = len(self.elements) or 1
        if np.shape(self.epsilon) != (n,) or np.shape(self.pair_cutoff) != (n, n):
            raise ValueError("parameter tables do not match the number of elements")

    @classmethod
    def single(cls, epsilon: float, sigma: float, cutoff: float, shift: bool = True, elements=()):
        """One parameter set for every element (or the given ones)."""
        n = len(elements) or 1
        return cls(
            elements=tuple(elements),
            cutoff=float(cutoff),
            epsilon=jnp.full((n,), float(epsilon)),
            sigma=jnp.full((n,), float(sigma)),
            pair_epsilon=jnp.zeros((n, n)),
            pair_sigma=jnp.zeros((n, n)),
            override=np.zeros((n, n), bool),
            pair_cutoff=np.full((n, n), float(cutoff)),
            shift=shift,
        )

    # -- parameter tables ------------------------------------------------------------------
    def tables(self):
        """(n, n) epsilon, sigma after mixing and overrides."""
        eps = jnp.sqrt(self.epsilon[:, None] * self.epsilon[None, :])
        sig = 0.5 * (self.sigma[:, None] + self.sigma[None, :])
        override = np.asarray(self.override, bool)
        eps = jnp.where(override, self.pair_epsilon, eps)
        sig = jnp.where(override, self.pair_sigma, sig)
        return eps, sig

    def tables_as(self, dtype):
        """Epsilon, sigma and cutoff tables (n, n) in ``dtype``; scalars for one parameter
        set (then the pair terms need no gathers)."""
        eps, sig = self.tables()
        eps, sig, rc = eps.astype(dtype), sig.astype(dtype), jnp.asarray(self.pair_cutoff, dtype)
        if eps.shape == (1, 1):
            return eps[0, 0], sig[0, 0], rc[0, 0]
        return eps, sig, rc

    def _pair_parameters(self, species, neighbour_species, index, dtype):
        """Epsilon, sigma and cutoff of each (slot, atom) pair: atom i's species against that
        of ``neighbour_species[index]``; scalars for one parameter set."""
        eps, sig, rc = self.tables_as(dtype)
        if eps.shape == ():
            return eps, sig, rc
        s_i, s_j = species[None, :], neighbour_species[index]
        return eps[s_i, s_j], sig[s_i, s_j], rc[s_i, s_j]

    def _pair_terms(self, r2, within, eps, sig, rc):
        """Pair energy and its derivative with respect to r^2 (zero outside ``within``)."""
        r2_safe = jnp.where(within, r2, 1.0)  # no inf/NaN from padded or far pairs
        c6 = (sig * sig / r2_safe) ** 3
        c12 = c6 * c6
        energy = 4.0 * eps * (c12 - c6)
        if self.shift:
            c6_rc = (sig * sig / (rc * rc)) ** 3
            energy = energy - 4.0 * eps * (c6_rc * c6_rc - c6_rc)
        d_energy_d_r2 = -12.0 * eps * (2.0 * c12 - c6) / r2_safe
        return jnp.where(within, energy, 0.0), jnp.where(within, d_energy_d_r2, 0.0)

    # -- energy (differentiable in everything) --------------------------------------------
    def energy(self, positions, cell, batch, nbrs):
        dx, dy, dz = pair_vectors(positions, cell, batch.system_idx, nbrs)
        r2 = dx * dx + dy * dy + dz * dz
        eps, sig, rc = self._pair_parameters(
            batch.species, batch.species, nbrs.index, positions.dtype
        )
        within = nbrs.mask & (r2 < rc * rc)
        pair_energy, _ = self._pair_terms(r2, within, eps, sig, rc)
        atom_energy = 0.5 * jnp.sum(pair_energy, axis=0)
        return system_sum(atom_energy, batch.system_idx, cell.shape[0])

    # -- fused energy + forces (+ strain derivative): reductions over K only ---------------
    def _slot_sums(self, vectors, within, eps, sig, rc, stress: bool):
        """Per-atom sums over the given slots: half pair energies, forces and (with
        ``stress``) the strain derivative."""
        dx, dy, dz = vectors
        r2 = dx * dx + dy * dy + dz * dz
        within = within & (r2 < rc * rc)
        pair_energy, d_energy_d_r2 = self._pair_terms(r2, within, eps, sig, rc)
        # the gradient of the pair energy with respect to r_j - r_i is 2 dE/dr2 (r_j - r_i);
        # F_i is its sum over the neighbours j (full list)
        scale = 2.0 * d_energy_d_r2
        forces = jnp.stack([jnp.sum(scale * d, axis=0) for d in vectors], axis=1)
        atom_energy = 0.5 * jnp.sum(pair_energy, axis=0)
        if not stress:
            return atom_energy, forces, None
        half = 0.5 * scale
        atom_strain = jnp.stack(
            [jnp.stack([jnp.sum(half * a * b, axis=0) for b in vectors], axis=1) for a in vectors],
            axis=1,
        )  # (A, 3, 3)
        return atom_energy, forces, atom_strain

    def evaluate(self, positions, cell, batch, nbrs, stress: bool) -> Evaluation:
        if nbrs.ext_index is not None:
            sums = self._ghost_sums(positions, cell, batch, nbrs, stress)
        else:

            def slot_sums(part):
                vectors = pair_vectors(positions, cell, batch.system_idx, part)
                species = batch.species
                eps, sig, rc = self._pair_parameters(species, species, part.index, positions.dtype)
                return self._slot_sums(vectors, part.mask, eps, sig, rc, stress)

            sums = sum_over_slots(slot_sums, nbrs, positions.dtype)
        atom_energy, forces, atom_strain = sums
        n_systems = cell.shape[0]
        energy = system_sum(atom_energy, batch.system_idx, n_systems)
        if stress:
            dE_dstrain = system_sum(atom_strain, batch.system_idx, n_systems)
        else:
            dE_dstrain = jnp.zeros((n_systems, 3, 3), positions.dtype)
        return Evaluation(energy=energy, forces=forces, dE_dstrain=dE_dstrain)

    def _ghost_sums(self, positions, cell, batch, nbrs, stress: bool):
        """The slot sums through the ghost form of the list (:mod:`molopt.neighbors`): one
        gather per component and pair from the extended positions, no image arithmetic."""
        extended = extended_positions(positions, cell, batch.system_idx, nbrs)
        columns = [extended[:, c] for c in range(3)]
        own = [positions[None, :, c] for c in range(3)]
        species = batch.species
        ext_species = jnp.concatenate([species, species[nbrs.ghost_source]])

        def slot_sums(index, mask):
            vectors = tuple(columns[c][index] - own[c] for c in range(3))
            pair = self._pair_parameters(species, ext_species, index, positions.dtype)
            return self._slot_sums(vectors, mask, *pair, stress)

        K, A = nbrs.ext_index.shape
        group = slot_group(K, A, np.dtype(positions.dtype).itemsize, minimum=SLOT_GROUP_MIN)
        return sum_over_groups(slot_sums, (nbrs.ext_index, nbrs.mask), group)
