"""The potential interface: a pure, differentiable energy of a padded batch.

A potential is a pytree: its parameters (epsilon, sigma, network weights) are leaves, so
``jax.grad`` with respect to them works; its configuration is static (part of the tree
structure, so a change of it is a new compilation).

:class:`Potential` is an Equinox module: the base of the neural potentials and of users' own
potentials (fields declared as class annotations, keyword construction). The shared methods
live in :class:`PotentialMethods`, which imports nothing heavy, so that Lennard-Jones (a
:func:`static_pytree` dataclass built on it) relaxes without importing Equinox, 0.12 s of
every `molopt relax` on a 2-core machine. ``Potential`` itself is made on first use (see
:mod:`molopt.startup`, section 6).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from molopt._jax import jax
from molopt.batch import Batch
from molopt.neighbors import Neighbors
from molopt.startup import build_on_first_use


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Evaluation:
    """Per-system ``energy`` (S,) eV; per-atom ``forces`` (A, 3) eV/A (exactly zero on padding);
    ``dE_dstrain`` (S, 3, 3) eV, the derivative of the energy with respect to a homogeneous
    strain of cell and positions (ASE stress = dE_dstrain / volume), zeros if not computed."""

    energy: jax.Array
    forces: jax.Array
    dE_dstrain: jax.Array


#: Atoms per batch unless the settings or the potential say otherwise.
BATCH_ATOMS = 32_768


def batch_atoms(potential) -> int:
    """Atoms per batch for ``potential`` on the default device: its ``cpu_batch_atoms`` on a
    CPU where it has one, else :data:`BATCH_ATOMS`."""
    cpu = getattr(potential, "cpu_batch_atoms", None)
    if cpu is not None and jax.default_backend() == "cpu":
        return int(cpu)
    return BATCH_ATOMS


class PotentialMethods:
    """What every potential has. ``elements``: atomic numbers in species order, or ``()`` for
    a potential that applies to every element (all atoms are species 0); ``cutoff`` in A.
    Both are static fields of the subclass."""

    elements: tuple[int, ...]
    cutoff: float
    #: Whether ``evaluate`` reads the ghost form of the neighbour list (built only then).
    uses_ghosts = False
    #: Slots per row of the row form of the neighbour list ``evaluate`` reads (built only when
    #: > 0; :mod:`molopt.neighbors`).
    row_width = 0
    #: Whether an evaluation costs far more than copying a batch's positions and forces: a
    #: relaxation step then skips (``lax.cond``) the evaluation of a move whose neighbour
    #: lists went stale instead of computing and discarding it
    #: (:func:`molopt.engine.kernel.advance`).
    costly = False
    #: Verlet skin (A) of relaxations that do not set one: a wider skin rebuilds less often,
    #: a narrower one lists fewer pairs (what a costly pair term pays for).
    default_skin = 1.0
    #: Atoms per batch on a CPU for relaxations that do not set ``max_batch_atoms`` (None:
    #: :data:`BATCH_ATOMS`, as on every other device). A CPU gains nothing from batches
    #: whose step takes long (its cores are busy with a fraction of them); a batch waits
    #: for its slowest system, and a smaller one is refilled from the queue instead.
    cpu_batch_atoms: int | None = None

    def energy(self, positions, cell, batch: Batch, nbrs: Neighbors) -> jax.Array:
        """Total potential energy per system, (S,) eV. Differentiable in every argument."""
        raise NotImplementedError

    def species_of(self, numbers) -> dict[int, int]:
        """Map atomic numbers to species indices; raises KeyError on an uncovered element."""
        if not self.elements:
            return {int(z): 0 for z in numbers}
        table = {z: k for k, z in enumerate(self.elements)}
        return {int(z): table[int(z)] for z in numbers}

    def covers(self, numbers) -> bool:
        return not self.elements or set(int(z) for z in numbers) <= set(self.elements)

    def for_training(self):
        """The potential as training differentiates it with respect to its leaves: itself,
        unless some leaves are constants of the architecture (they come back behind
        ``stop_gradient``)."""
        return self

    def evaluate(self, positions, cell, batch: Batch, nbrs: Neighbors, stress: bool) -> Evaluation:
        """Energy, forces and (if ``stress``) dE/dstrain by automatic differentiation.

        Subclasses may override with a faster route that gives the same numbers.
        """
        return autodiff_evaluate(self, positions, cell, batch, nbrs, stress)


def autodiff_evaluate(potential, positions, cell, batch, nbrs, stress: bool) -> Evaluation:
    """Reference implementation: forces = -dE/dx, dE/dstrain by a symmetric strain."""
    n_systems = cell.shape[0]
    eye = jnp.eye(3, dtype=positions.dtype)
    system_of_atom = jnp.minimum(batch.system_idx, n_systems - 1)

    def total(pos, strain):
        sym = 0.5 * (strain + jnp.swapaxes(strain, 1, 2))
        pos = pos + jnp.einsum("ax,axy->ay", pos, sym[system_of_atom])
        strained_cell = jnp.einsum("sxy,syz->sxz", cell, eye + sym)
        per_system = potential.energy(pos, strained_cell, batch, nbrs)
        return jnp.sum(per_system), per_system

    zero = jnp.zeros((n_systems, 3, 3), positions.dtype)
    if stress:
        (_, energy), (grad_x, grad_strain) = jax.value_and_grad(total, (0, 1), has_aux=True)(
            positions, zero
        )
    else:
        (_, energy), grad_x = jax.value_and_grad(total, 0, has_aux=True)(positions, zero)
        grad_strain = zero
    forces = jnp.where(batch.atom_mask[:, None], -grad_x, 0.0)
    return Evaluation(energy=energy, forces=forces, dE_dstrain=grad_strain)


def static_pytree(cls):
    """Register a frozen dataclass as a pytree: fields with ``metadata={"static": True}`` are
    part of the structure (hashable), the others are leaves. Rebuilding a tree (``jax.tree``
    maps, jit, vmap outputs) sets the fields directly, without ``__init__`` and its checks,
    as Equinox does: JAX rebuilds trees with placeholders or batched arrays as leaves, which
    ``jax.tree_util.register_dataclass`` would hand to ``__init__``."""
    fields = dataclasses.fields(cls)
    static = tuple(f.name for f in fields if f.metadata.get("static"))
    leaves = tuple(f.name for f in fields if not f.metadata.get("static"))

    def flatten(obj):
        return (
            [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in leaves],
            tuple(getattr(obj, n) for n in static),
        )

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for name, value in zip(static, aux, strict=True):
            object.__setattr__(obj, name, value)
        for name, value in zip(leaves, children, strict=True):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten, unflatten)
    return cls


def _make_potential():
    import equinox as eqx

    class Potential(PotentialMethods, eqx.Module):
        """Abstract potential as an Equinox module: subclass it with the fields your energy
        needs (arrays are differentiable leaves) and define ``energy``."""

        elements: tuple[int, ...] = eqx.field(static=True)
        cutoff: float = eqx.field(static=True)

    Potential.__module__, Potential.__qualname__ = __name__, "Potential"
    return Potential


# made on first use: molopt.startup, section 6
__getattr__ = build_on_first_use(__name__, Potential=_make_potential)
