"""PaiNN: polarizable atom interaction neural network (Schuett, Unke, Gastegger, ICML 2021).

Scalar features s (A, F) and vector features v (A, F, 3) per atom, updated by message and
update blocks over the neighbour list (the (K, A) layout of :mod:`molopt.neighbors`); sine
radial basis with a cosine cutoff, so energies and forces are smooth at the cutoff. The atomic
energy is ``scale * readout(s) + reference[Z]`` (eV). Forces and stress are exact derivatives
of the energy (automatic differentiation). Padded atoms and padded neighbour slots contribute
exactly nothing.

Layers are Equinox ``Linear``/``Embedding`` modules (weights are pytree leaves); ``dense``
applies a ``Linear`` to arrays with any leading shape.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from molopt._jax import jax as _configured  # noqa: F401  (x64 available)
from molopt.batch import system_sum
from molopt.neighbors import pair_vectors, slot_group, sum_over_groups
from molopt.potentials.base import Potential


def dense(layer: eqx.nn.Linear, x):
    y = x @ layer.weight.T
    return y + layer.bias if layer.bias is not None else y


class MessageBlock(eqx.Module):
    phi_in: eqx.nn.Linear
    phi_out: eqx.nn.Linear
    filter: eqx.nn.Linear

    def __init__(self, n_features: int, n_radial: int, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.phi_in = eqx.nn.Linear(n_features, n_features, key=k1)
        self.phi_out = eqx.nn.Linear(n_features, 3 * n_features, key=k2)
        self.filter = eqx.nn.Linear(n_radial, 3 * n_features, key=k3)

    def __call__(self, s, v, index, radial, unit, weight, group: int):
        """s (A, F), v (A, F, 3); index (K, A); radial (K, A, R); unit (K, A, 3) r_ij/|r_ij|;
        weight (K, A) cutoff x mask. ``group`` (static, a divisor of K): neighbour slots
        summed at once; below K the slots are summed group by group in a ``lax.scan`` whose
        body is recomputed in the backward pass (``jax.checkpoint``), so the (g, A, 3F)
        messages stay in cache instead of K of them going through memory."""
        x = dense(self.phi_out, jax.nn.silu(dense(self.phi_in, s)))  # (A, 3F)

        def slots(idx, rad, un, wt):
            """Sums over a group of g neighbour slots: (A, F), (A, F, 3)."""
            w = dense(self.filter, rad) * wt[..., None]  # (g, A, 3F)
            ds, dv_v, dv_r = jnp.split(x[idx] * w, 3, axis=-1)
            dv = v[idx] * dv_v[..., None] + dv_r[..., None] * un[:, :, None, :]
            return jnp.sum(ds, axis=0), jnp.sum(dv, axis=0)

        ds, dv = sum_over_groups(slots, (index, radial, unit, weight), group, recompute=True)
        return s + ds, v + dv


class UpdateBlock(eqx.Module):
    u: eqx.nn.Linear
    v: eqx.nn.Linear
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear

    def __init__(self, n_features: int, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.u = eqx.nn.Linear(n_features, n_features, use_bias=False, key=k1)
        self.v = eqx.nn.Linear(n_features, n_features, use_bias=False, key=k2)
        self.mlp_in = eqx.nn.Linear(2 * n_features, n_features, key=k3)
        self.mlp_out = eqx.nn.Linear(n_features, 3 * n_features, key=k4)

    def __call__(self, s, v):
        # linear maps act on the feature axis of each Cartesian component
        uv = jnp.einsum("gf,afc->agc", self.u.weight, v)
        vv = jnp.einsum("gf,afc->agc", self.v.weight, v)
        norm = jnp.sqrt(jnp.sum(vv * vv, axis=-1) + 1e-8)
        a = dense(self.mlp_out, jax.nn.silu(dense(self.mlp_in, jnp.concatenate([s, norm], -1))))
        a_vv, a_sv, a_ss = jnp.split(a, 3, axis=-1)
        v = v + a_vv[..., None] * uv
        s = s + a_sv * jnp.sum(uv * vv, axis=-1) + a_ss
        return s, v


class PaiNN(Potential):
    """``elements`` in species order; hyper-parameters static; weights are leaves."""

    n_features: int = eqx.field(static=True)
    n_radial: int = eqx.field(static=True)
    n_layers: int = eqx.field(static=True)
    embedding: eqx.nn.Embedding
    messages: tuple
    updates: tuple
    readout_in: eqx.nn.Linear
    readout_out: eqx.nn.Linear
    reference: jax.Array  # (n_species,) eV per atom
    scale: jax.Array  # () eV

    @property
    def slot_bytes(self) -> int:
        """XLA temporaries per neighbour slot of a force call in float64, measured: about 24
        bytes per feature (:mod:`molopt.engine.memory`)."""
        return 24 * self.n_features

    def __init__(
        self,
        elements,
        cutoff=5.0,
        n_features=64,
        n_radial=20,
        n_layers=3,
        *,
        key,
        reference=None,
        scale=1.0,
    ):
        self.elements = tuple(int(z) for z in elements)
        self.cutoff = float(cutoff)
        self.n_features = int(n_features)
        self.n_radial = int(n_radial)
        self.n_layers = int(n_layers)
        keys = jax.random.split(key, 2 * n_layers + 3)
        self.embedding = eqx.nn.Embedding(len(self.elements), n_features, key=keys[0])
        self.messages = tuple(
            MessageBlock(n_features, n_radial, keys[1 + k]) for k in range(n_layers)
        )
        self.updates = tuple(
            UpdateBlock(n_features, keys[1 + n_layers + k]) for k in range(n_layers)
        )
        self.readout_in = eqx.nn.Linear(n_features, n_features // 2, key=keys[-2])
        self.readout_out = eqx.nn.Linear(n_features // 2, 1, key=keys[-1])
        n = len(self.elements)
        self.reference = jnp.zeros(n) if reference is None else jnp.asarray(reference, float)
        self.scale = jnp.asarray(scale, float)

    def with_energy_offsets(self, offsets):
        """This model with ``offsets`` (eV, one per element in species order) added to its
        per-element reference energies."""
        offsets = jnp.asarray(offsets, self.reference.dtype)
        return eqx.tree_at(lambda m: m.reference, self, self.reference + offsets)

    def atomic_energies(self, positions, cell, batch, nbrs):
        """(A,) eV; exactly zero on padding atoms."""
        dtype = positions.dtype
        dx, dy, dz = pair_vectors(positions, cell, batch.system_idx, nbrs)
        r2 = dx * dx + dy * dy + dz * dz
        within = nbrs.mask & (r2 < self.cutoff**2)
        r = jnp.sqrt(jnp.where(within, r2, 1.0))
        unit = jnp.stack([dx, dy, dz], axis=-1) / r[..., None]
        n = jnp.arange(1, self.n_radial + 1, dtype=dtype)
        radial = jnp.sin(n * jnp.pi * r[..., None] / self.cutoff) / r[..., None]
        envelope = 0.5 * (jnp.cos(jnp.pi * r / self.cutoff) + 1.0)
        weight = jnp.where(within, envelope, 0.0)
        K, A = nbrs.index.shape
        # (K, A, 3F) messages: summed in cache-sized groups of slots on CPU (neighbors.py)
        group = slot_group(K, A * 3 * self.n_features, np.dtype(dtype).itemsize)
        species = batch.species
        s = self.embedding.weight[species].astype(dtype)
        v = jnp.zeros(s.shape + (3,), dtype)
        for message, update in zip(self.messages, self.updates, strict=True):
            s, v = message(s, v, nbrs.index, radial, unit, weight, group)
            s, v = update(s, v)
        out = dense(self.readout_out, jax.nn.silu(dense(self.readout_in, s)))[:, 0]
        energy = self.scale * out + self.reference[species]
        return jnp.where(batch.atom_mask, energy, 0.0)

    def energy(self, positions, cell, batch, nbrs):
        return system_sum(
            self.atomic_energies(positions, cell, batch, nbrs), batch.system_idx, cell.shape[0]
        )


def count_parameters(model) -> int:
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return int(sum(np.prod(x.shape) for x in leaves))


def cast_floats(model, dtype):
    """``model`` with every floating-point leaf converted to ``dtype``."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if eqx.is_inexact_array(x) else x, model)
