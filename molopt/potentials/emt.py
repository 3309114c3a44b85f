"""Effective medium theory (EMT) with the parameters and conventions of ASE's
``ase.calculators.emt.EMT``: K. W. Jacobsen, P. Stoltze, J. K. Norskov, Surf. Sci. 366, 394
(1996).

The energy of atom i is a cohesive function of the neutral-sphere radius s_i that makes its
neighbours' density match, plus an atomic-sphere correction from pair terms:

    sigma1_i = sum_j chi_ij exp(-eta2_j (r_ij - beta s0_j)) w(r_ij)
    s_i      = s0_i - log(sigma1_i / (12 gamma1_i)) / (beta eta2_i)
    E_i      = E0_i (1 + lambda_i ds_i) exp(-lambda_i ds_i) + 6 V0_i exp(-kappa_i ds_i)
               - (V0_i / 4 gamma2_i) sum_j chi_ij exp(-kappa_j (r_ij / beta - s0_j)) w(r_ij)
               - (1/4) sum_j (V0_j / gamma2_j) / chi_ij exp(-kappa_i (r_ij / beta - s0_i)) w(r_ij)
               - E0_i

with ds_i = s_i - s0_i, chi_ij = n0_j / n0_i, and w(r) = 1 / (1 + exp(acut (r - rc))) a Fermi
cutoff. As in ASE, pairs count only below rc_list (rc + 0.5 A; a hard edge where w is about
7e-6), an atom without neighbours has energy -E0, and the energy is referred to each
element's own fcc crystal at equilibrium (E0 subtracted). Forces and dE/dstrain are in
closed form (:meth:`EMT.evaluate`); the energy alone is differentiable in everything,
parameters included.

The cutoff rule (``rc``, ``acut``, ``rc_list``) follows ASE's ``asap_cutoff`` option: by
default (False, as ASE's default) rc comes from the largest s0 in ASE's whole parameter
table, the same for every structure; with ``asap_cutoff`` it comes from the largest s0
among the elements present in each structure (so each system of a batch has its own rc,
acut, rc_list and gammas) and rc_list = 1.045 rc. The neighbour list is built at
``cutoff``, the largest rc_list any structure can have; listed pairs beyond a structure's own
rc_list contribute nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from molopt import elements as el
from molopt._jax import jax
from molopt.batch import system_max, system_sum
from molopt.neighbors import pair_vectors
from molopt.potentials.base import Evaluation, PotentialMethods, static_pytree

#: Angstrom per bohr, as ``ase.units.Bohr`` (CODATA 2014), so that the parameters in A come
#: out bit for bit as ASE's.
BOHR = 0.5291772105638411
#: (16 pi / 3)^(1/3) / sqrt(2) with ASE's historical rounding: the fcc nearest-neighbour
#: distance is beta s0.
BETA = 1.809
#: w(r4nn) for the nearest-neighbour distances of fcc: sets the slope ``acut``.
CUTOFF_TAIL = 1e-4

#: ASE's EMT parameters (ase.calculators.emt.parameters): E0 eV, s0 bohr, V0 eV, eta2 1/bohr,
#: kappa 1/bohr, lambda 1/bohr, n0 1/bohr^3. The metals from Jacobsen et al. (1996); H, C, N
#: and O are ASE's own rough additions, not for serious use.
PARAMETERS: dict[str, tuple[float, ...]] = {
    "Al": (-3.28, 3.00, 1.493, 1.240, 2.000, 1.169, 0.00700),
    "Cu": (-3.51, 2.67, 2.476, 1.652, 2.740, 1.906, 0.00910),
    "Ag": (-2.96, 3.01, 2.132, 1.652, 2.790, 1.892, 0.00547),
    "Au": (-3.80, 3.00, 2.321, 1.674, 2.873, 2.182, 0.00703),
    "Ni": (-4.44, 2.60, 3.673, 1.669, 2.757, 1.948, 0.01030),
    "Pd": (-3.90, 2.87, 2.773, 1.818, 3.107, 2.155, 0.00688),
    "Pt": (-5.85, 2.90, 4.067, 1.812, 3.145, 2.192, 0.00802),
    "H": (-3.21, 1.31, 0.132, 2.652, 2.790, 3.892, 0.00547),
    "C": (-3.50, 1.81, 0.332, 1.652, 2.790, 1.892, 0.01322),
    "N": (-5.10, 1.88, 0.132, 1.652, 2.790, 1.892, 0.01222),
    "O": (-4.60, 1.95, 0.332, 1.652, 2.790, 1.892, 0.00850),
}

#: Atomic numbers EMT has parameters for.
ELEMENTS: tuple[int, ...] = tuple(el.number(s) for s in PARAMETERS)


def _static(**kwargs):
    return field(metadata={"static": True}, **kwargs)


def cutoff_shape(s0_max):
    """(rc, acut) in A and 1/A from the largest s0 (A) that counts: rc midway between the
    third and fourth fcc neighbour shells, acut such that w = 1e-4 at the fourth. Works on
    Python floats (the static rule) and on arrays (one value per system)."""
    log = math.log if isinstance(s0_max, float) else jnp.log
    first = BETA * s0_max
    rc = first * 0.5 * (math.sqrt(3.0) + 2.0)
    return rc, log(1.0 / CUTOFF_TAIL - 1.0) / (2.0 * first - rc)


def list_cutoff(rc, asap_cutoff: bool):
    """rc_list (A): the pair distance below which pairs count."""
    return rc * 1.045 if asap_cutoff else rc + 0.5


def fermi(r, rc, acut):
    """The smooth cutoff w(r) = 1 / (1 + exp(acut (r - rc)))."""
    return 1.0 / (1.0 + jnp.exp(acut * (r - rc)))


def gammas(s0, eta2, kappa, rc, acut):
    """gamma1, gamma2: the sums over the first three fcc shells (12, 6, 24 neighbours at
    beta s0 sqrt(1, 2, 3)) weighted by the cutoff, that normalise sigma1 and the pair term to
    the element's own crystal. Arrays broadcast together."""
    gamma1 = gamma2 = 0.0
    for count, k in ((12, 1.0), (6, 2.0), (24, 3.0)):
        r = BETA * s0 * math.sqrt(k)
        x = count * fermi(r, rc, acut) / 12.0
        gamma1 = gamma1 + x * jnp.exp(-eta2 * (r - BETA * s0))
        gamma2 = gamma2 + x * jnp.exp(-kappa / BETA * (r - BETA * s0))
    return gamma1, gamma2


@static_pytree
@dataclass(frozen=True, eq=False)
class EMT(PotentialMethods):
    """EMT for ``elements`` (atomic numbers, species order) with per-element parameters in
    A-based units, each (n,): ``e0`` eV, ``s0`` A, ``v0`` eV, ``eta2``, ``kappa``, ``lam``
    1/A, ``n0`` 1/A^3 (leaves: differentiable). Static: ``asap_cutoff`` (module docstring),
    ``s0_max`` (A, the largest s0 of ASE's table: the default cutoff rule) and ``cutoff``
    (A, the neighbour-list radius: the largest rc_list possible). Build it with
    :meth:`from_table`."""

    elements: tuple = _static()
    cutoff: float = _static()
    e0: jax.Array
    s0: jax.Array
    v0: jax.Array
    eta2: jax.Array
    kappa: jax.Array
    lam: jax.Array
    n0: jax.Array
    s0_max: float = _static()
    asap_cutoff: bool = _static(default=False)
    #: XLA temporaries per neighbour slot of a force+stress call in float64, measured
    #: (:mod:`molopt.engine.memory`)
    slot_bytes = 256

    @classmethod
    def from_table(cls, elements=None, asap_cutoff: bool = False) -> EMT:
        """ASE's parameters for ``elements`` (atomic numbers; default all of
        :data:`ELEMENTS`). Raises ValueError for an element EMT has no parameters for."""
        numbers = ELEMENTS if elements is None else tuple(int(z) for z in elements)
        missing = [el.symbol(z) for z in numbers if z not in ELEMENTS]
        if missing or not numbers:
            raise ValueError(f"EMT has no parameters for {', '.join(missing) or 'no elements'}")
        rows = np.array([PARAMETERS[el.symbol(z)] for z in numbers], np.float64)
        table_s0_max = max(p[1] for p in PARAMETERS.values()) * BOHR
        own_s0_max = float(rows[:, 1].max()) * BOHR
        rc_static, _ = cutoff_shape(table_s0_max)
        rc_largest, _ = cutoff_shape(own_s0_max if asap_cutoff else table_s0_max)
        return cls(
            elements=numbers,
            cutoff=float(list_cutoff(rc_largest, asap_cutoff)),
            e0=jnp.asarray(rows[:, 0]),
            s0=jnp.asarray(rows[:, 1] * BOHR),
            v0=jnp.asarray(rows[:, 2]),
            eta2=jnp.asarray(rows[:, 3] / BOHR),
            kappa=jnp.asarray(rows[:, 4] / BOHR),
            lam=jnp.asarray(rows[:, 5] / BOHR),
            n0=jnp.asarray(rows[:, 6] / BOHR**3),
            s0_max=float(table_s0_max),
            asap_cutoff=bool(asap_cutoff),
        )

    # -- the cutoff rule -------------------------------------------------------------------
    def _atom_cutoffs(self, batch, n_systems: int, dtype):
        """(rc, acut, rc_list): Python floats by the static rule, or (A,) arrays of each
        atom's system (asap_cutoff: from the largest s0 among the system's elements)."""
        if not self.asap_cutoff:
            rc, acut = cutoff_shape(self.s0_max)
            return rc, acut, list_cutoff(rc, False)
        s0_atom = jnp.where(batch.atom_mask, self.s0.astype(dtype)[batch.species], 0.0)
        s0_max = system_max(s0_atom, batch.system_idx, n_systems)
        rc, acut = cutoff_shape(s0_max)
        system_of_atom = jnp.minimum(batch.system_idx, n_systems - 1)
        rc, acut = rc[system_of_atom], acut[system_of_atom]
        return rc, acut, list_cutoff(rc, True)

    # -- the terms of every atom and listed pair ------------------------------------------
    def _terms(self, positions, cell, batch, nbrs) -> dict:
        """Everything the energy and its derivatives need: per atom (A,) and per listed pair
        (K, A) (slot k of atom i: neighbour j = ``nbrs.index[k, i]``); pairs outside
        ``within`` carry finite values that every sum masks out."""
        dtype = positions.dtype
        n_systems = cell.shape[0]
        e0, s0, v0, eta2, kappa, lam, n0 = (
            a.astype(dtype)
            for a in (self.e0, self.s0, self.v0, self.eta2, self.kappa, self.lam, self.n0)
        )
        rc, acut, rc_list = self._atom_cutoffs(batch, n_systems, dtype)
        species = batch.species
        other = species[nbrs.index]  # (K, A) species of each listed neighbour

        # per atom (with asap_cutoff they depend on the atom's system too)
        gamma1, gamma2 = gammas(s0[species], eta2[species], kappa[species], rc, acut)
        pair_v0 = -0.5 * v0[species] / gamma2

        vectors = pair_vectors(positions, cell, batch.system_idx, nbrs)
        dx, dy, dz = vectors
        r2 = dx * dx + dy * dy + dz * dz
        r = jnp.sqrt(jnp.where(nbrs.mask, r2, 1.0))
        within = nbrs.mask & (r < rc_list)
        # outside the list every pair term is evaluated at rc: finite values and derivatives,
        # so the masked branch cannot put NaN into the gradient (w overflows far out in f32)
        r = jnp.where(within, r, rc)

        w = fermi(r, rc, acut)
        chi = n0[other] / n0[species][None, :]
        # j's density at i (sigma1 of i), i's at j (sigma1 of j), and the pair terms
        density_here = jnp.exp(-eta2[other] * (r - BETA * s0[other])) * chi * w
        density_there = jnp.exp(-eta2[species] * (r - BETA * s0[species])) / chi * w
        sigma1 = jnp.sum(jnp.where(within, density_here, 0.0), axis=0)
        sphere_here = pair_v0 * jnp.exp(-kappa[other] * (r / BETA - s0[other])) * chi * w
        sphere_there = pair_v0[nbrs.index] * (
            jnp.exp(-kappa[species] * (r / BETA - s0[species])) / chi * w
        )

        bonded = sigma1 > 0.0
        sigma1_safe = jnp.where(bonded, sigma1, 1.0)
        ds = -jnp.log(sigma1_safe / (12.0 * gamma1)) / (BETA * eta2[species])
        lam_ds = lam[species] * ds
        decay = jnp.exp(-lam_ds)
        repulsion = 6.0 * v0[species] * jnp.exp(-kappa[species] * ds)
        cohesive = e0[species] * (1.0 + lam_ds) * decay + repulsion
        # dE_c/d sigma1 = dE_c/d ds * d ds/d sigma1, zero without neighbours (no pair uses it)
        d_cohesive = -e0[species] * lam[species] * lam_ds * decay - kappa[species] * repulsion
        d_cohesive = jnp.where(bonded, d_cohesive / (-BETA * eta2[species] * sigma1_safe), 0.0)
        return dict(
            vectors=vectors,
            r=r,
            within=within,
            slope=acut * (w - 1.0),  # (dw/dr) / w
            other=other,
            density_here=density_here,
            density_there=density_there,
            sphere_here=sphere_here,
            sphere_there=sphere_there,
            cohesive=jnp.where(bonded, cohesive, 0.0),
            d_cohesive=d_cohesive,
            e0=e0[species],
            eta2=eta2,
            kappa=kappa,
        )

    # -- energy (differentiable in everything) ---------------------------------------------
    def atom_energies(self, positions, cell, batch, nbrs) -> jax.Array:
        """Energy of each atom, (A,) eV (zero on padding), as ASE's ``energies``."""
        t = self._terms(positions, cell, batch, nbrs)
        return self._atom_energies(t, batch)

    @staticmethod
    def _atom_energies(t: dict, batch) -> jax.Array:
        sphere = t["sphere_here"] + t["sphere_there"]
        sphere = 0.5 * jnp.sum(jnp.where(t["within"], sphere, 0.0), axis=0)
        energy = t["cohesive"] + sphere - t["e0"]
        return jnp.where(batch.atom_mask, energy, 0.0)

    def energy(self, positions, cell, batch, nbrs) -> jax.Array:
        atom_energy = self.atom_energies(positions, cell, batch, nbrs)
        return system_sum(atom_energy, batch.system_idx, cell.shape[0])

    # -- energy, forces and dE/dstrain in one pass over the pairs --------------------------
    def evaluate(self, positions, cell, batch, nbrs, stress: bool) -> Evaluation:
        """The derivatives in closed form, as ASE's EMT computes them (the same numbers as
        :func:`~molopt.potentials.base.autodiff_evaluate`, without its backward pass). With a
        full list, dE/dr of the pair (i, j) is gathered from both ends: i's embedding
        through j's density at i, j's through i's density at j, and both pair terms; so
        F_i = sum_j dE/dr_ij (r_j - r_i) / r_ij needs no scatter."""
        t = self._terms(positions, cell, batch, nbrs)
        species, other, slope = batch.species, t["other"], t["slope"]
        eta2, kappa = t["eta2"], t["kappa"]
        d_energy_d_r = (
            t["d_cohesive"][None, :] * t["density_here"] * (slope - eta2[other])
            + t["d_cohesive"][nbrs.index] * t["density_there"] * (slope - eta2[species])
            + t["sphere_here"] * (slope - kappa[other] / BETA)
            + t["sphere_there"] * (slope - kappa[species] / BETA)
        )
        scale = jnp.where(t["within"], d_energy_d_r / t["r"], 0.0)
        vectors = t["vectors"]
        forces = jnp.stack([jnp.sum(scale * d, axis=0) for d in vectors], axis=1)
        forces = jnp.where(batch.atom_mask[:, None], forces, 0.0)
        n_systems = cell.shape[0]
        energy = system_sum(self._atom_energies(t, batch), batch.system_idx, n_systems)
        if stress:
            half = 0.5 * scale  # each pair is listed from both ends
            rows = [[jnp.sum(half * a * b, axis=0) for b in vectors] for a in vectors]
            atom_strain = jnp.stack([jnp.stack(row, axis=1) for row in rows], axis=1)  # (A, 3, 3)
            dE_dstrain = system_sum(atom_strain, batch.system_idx, n_systems)
        else:
            dE_dstrain = jnp.zeros((n_systems, 3, 3), positions.dtype)
        return Evaluation(energy=energy, forces=forces, dE_dstrain=dE_dstrain)
