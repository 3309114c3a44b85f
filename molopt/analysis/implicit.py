"""Relaxations as differentiable functions of the potential's parameters.

At a minimum the generalized gradient g(dof*, theta) vanishes, so by the implicit function
theorem d dof*/d theta = -H^-1 dg/d theta, H the Hessian in the degrees of freedom. The
backward pass solves H w = v matrix-free (Hessian-vector products by forward-over-reverse
autodiff, conjugate gradients, with the zero modes of translation/rotation projected out)
and returns -w . dg/d theta: memory and cost do not depend on the number of optimizer steps
(nothing is unrolled). The forward pass is an ordinary molopt relaxation (any optimizer, all
structures in one batch), run on the host through ``jax.pure_callback``.

    import jax, molopt
    from molopt.analysis.implicit import relax_implicit
    lj = molopt.load_potential("argon")
    def lattice(potential):
        (crystal,) = relax_implicit(potential, [fcc_argon], relax_cell=True)
        return crystal.cell[0, 0]
    jax.grad(lattice)(lj).sigma    # d a / d sigma

Degrees of freedom: free atoms' positions (FixAtoms excluded); with ``relax_cell`` also a
symmetric strain S (cell = cell* expm(S), positions = z expm(S)) around the relaxed cell,
at zero pressure or ``pressure`` (eV/A^3) with the enthalpy E + pV.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax.numpy as jnp
import numpy as np

from molopt._jax import jax
from molopt.engine.packing import neighbor_lists, pack_structures
from molopt.linalg3 import det3, expm3
from molopt.structure import Structure

SYM_INDEX = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Relaxed:
    """A relaxed structure as JAX values: ``positions`` (n, 3) A, ``cell`` (3, 3) A, ``energy``
    () eV (potential energy, no pV term). Differentiable with respect to the potential."""

    positions: jax.Array
    cell: jax.Array
    energy: jax.Array


def _sym(u6):
    s = jnp.zeros((3, 3), u6.dtype)
    for k, (i, j) in enumerate(SYM_INDEX):
        s = s.at[i, j].set(u6[k]).at[j, i].set(u6[k])
    return s


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Context:
    """Arrays describing one structure around its base (relaxed) state."""

    positions: jax.Array  # (n, 3) base positions
    cell: jax.Array  # (3, 3) base cell
    free: jax.Array  # (f,) indices of the atoms that move
    batch: object
    nbrs: object
    pressure: jax.Array


def geometry(dof, ctx: Context, relax_cell: bool):
    """(positions (n, 3), cell (3, 3)) for a dof vector (differentiable)."""
    k = 3 * ctx.free.shape[0]
    positions = ctx.positions.at[ctx.free].set(dof[:k].reshape(-1, 3))
    cell = ctx.cell
    if relax_cell:
        deformation = expm3(_sym(dof[k:]))
        positions = positions @ deformation.T
        cell = cell @ deformation.T
    return positions, cell


def energy_at(positions, cell, potential, ctx: Context):
    A = ctx.batch.n_padded_atoms
    n = positions.shape[0]
    padded = jnp.zeros((A, 3), positions.dtype).at[:n].set(positions)
    cells = jnp.zeros((ctx.batch.n_systems, 3, 3), cell.dtype).at[0].set(cell)
    return potential.energy(padded, cells, ctx.batch, ctx.nbrs)[0]


def enthalpy(dof, potential, ctx: Context, relax_cell: bool):
    positions, cell = geometry(dof, ctx, relax_cell)
    energy = energy_at(positions, cell, potential, ctx)
    if relax_cell:
        energy = energy + ctx.pressure * jnp.abs(det3(cell))
    return energy


enthalpy_gradient = jax.grad(enthalpy)


@partial(jax.jit, static_argnames=("relax_cell",))
def _hessian_solve(dof, v, potential, ctx, modes, tol, relax_cell: bool):
    """w with H w = v on the complement of the zero modes ``modes`` (conjugate gradients
    on Hessian-vector products; the zero modes are projected out of v and shifted in H)."""

    def project(x):
        return x - modes @ (modes.T @ x)

    def operator(w):
        hw = jax.jvp(
            lambda d: enthalpy_gradient(d, potential, ctx, relax_cell), (dof,), (project(w),)
        )[1]
        return project(hw) + modes @ (modes.T @ w)

    w, _ = jax.scipy.sparse.linalg.cg(
        operator, project(v), tol=tol, atol=0.0, maxiter=10 * dof.shape[0] + 100
    )
    return project(w)


@partial(jax.jit, static_argnames=("relax_cell",))
def _parameter_pullback(w, dof, potential, ctx, relax_cell: bool):
    """d/d(potential) of w . grad_dof E(dof; potential)."""
    return jax.grad(lambda p: jnp.vdot(w, enthalpy_gradient(dof, p, ctx, relax_cell)))(potential)


class Problem:
    """One structure: its degrees of freedom and, once relaxed, its :class:`Context`."""

    def __init__(
        self, structure: Structure, potential, relax_cell: bool, pressure: float, skin: float = 1.0
    ):
        self.structure = structure
        self.relax_cell = relax_cell
        self.pressure = pressure
        self.free = np.nonzero(~structure.fixed)[0]
        self.skin = skin
        self.batch, _, _, self.layout = pack_structures([structure], potential, np.float64)
        self.n = structure.n_atoms

    def set_base(self, positions: np.ndarray, cell: np.ndarray, potential):
        """The relaxed state to linearize around; neighbour list built there for
        ``potential`` (with a skin: the finite strains of line searches stay valid)."""
        self.positions = np.asarray(positions, np.float64)
        self.cell = np.asarray(cell, np.float64)
        A = self.layout.n_padded_atoms
        padded = np.zeros((A, 3))
        padded[: self.n] = self.positions
        cells = np.zeros((self.layout.n_systems, 3, 3))
        cells[0] = self.cell
        nbrs = neighbor_lists(
            padded, cells, self.batch.pbc, self.layout, potential, self.skin, np.float64
        ).to_device()
        self.ctx = Context(
            jax.device_put(self.positions),
            jax.device_put(self.cell),
            jax.device_put(self.free.astype(np.int32)),
            self.batch,
            nbrs,
            jax.device_put(np.asarray(self.pressure, np.float64)),
        )

    @property
    def n_dof(self) -> int:
        return 3 * len(self.free) + (6 if self.relax_cell else 0)

    def base_dof(self) -> np.ndarray:
        dof = self.positions[self.free].ravel()
        return np.concatenate([dof, np.zeros(6)]) if self.relax_cell else dof

    def geometry(self, dof):
        return geometry(dof, self.ctx, self.relax_cell)

    def enthalpy(self, dof, potential):
        return enthalpy(dof, potential, self.ctx, self.relax_cell)

    def energy_at(self, positions, cell, potential):
        return energy_at(positions, cell, potential, self.ctx)

    def zero_modes(self) -> np.ndarray:
        """Orthonormal basis (n_dof, m) of the translations (and, without periodicity, the
        rotations) of the free atoms; none when atoms are fixed."""
        if len(self.free) < self.n:
            return np.zeros((self.n_dof, 0))
        vectors = []
        for c in range(3):
            t = np.zeros((self.n, 3))
            t[:, c] = 1.0
            vectors.append(t.ravel())
        if not self.structure.pbc.any() and not self.relax_cell:
            centred = self.positions - self.positions.mean(axis=0)
            for c in range(3):
                axis = np.zeros(3)
                axis[c] = 1.0
                vectors.append(np.cross(axis, centred).ravel())
        basis = np.array(vectors).T
        if self.relax_cell:
            basis = np.concatenate([basis, np.zeros((6, basis.shape[1]))])
        q, r = np.linalg.qr(basis)
        keep = np.abs(np.diag(r)) > 1e-8 * np.abs(np.diag(r)).max()
        return q[:, keep]


def _relax_on_host(problems, optimizer, fmax, steps, potential_leaves, treedef):
    """Forward pass: relax every structure with the engine; returns each dof at the minimum
    and sets each problem's base state."""
    from molopt.engine import EngineSettings, relax_structures

    potential = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in potential_leaves])
    relax_cell = problems[0].relax_cell
    settings = EngineSettings(
        optimizer=optimizer,
        fmax=fmax,
        steps=steps,
        relax_cell=relax_cell,
        pressure=problems[0].pressure,
        trajectory_interval=0,
        final_stress=False,
    )
    items = [(k, p.structure) for k, p in enumerate(problems)]
    results = {r.key: r for r in relax_structures(items, potential, settings)}
    out = []
    for k, p in enumerate(problems):
        r = results[k]
        if r.status != "converged":
            raise RuntimeError(f"structure {k} did not converge ({r.status}, fmax {r.fmax:.2e})")
        p.set_base(r.structure.positions, r.structure.cell, potential)
        out.append(p.base_dof())
    return out


def relax_implicit(
    potential,
    structures,
    *,
    relax_cell: bool = False,
    pressure: float = 0.0,
    fmax: float = 1e-7,
    optimizer: str = "lbfgs",
    steps: int = 20_000,
    cg_tol: float = 1e-12,
) -> list[Relaxed]:
    """Relax ``structures`` with ``potential`` and return :class:`Relaxed` JAX values whose
    derivatives with respect to the potential's parameters come from the implicit function
    theorem. ``pressure`` in eV/A^3. Tight ``fmax`` (default 1e-7 eV/A) makes the
    derivatives accurate. Call outside ``jax.jit`` (the forward relaxation runs on the host)."""
    problems = [Problem(s, potential, relax_cell, pressure) for s in structures]
    leaves, treedef = jax.tree.flatten(potential)

    @jax.custom_vjp
    def minimum(leaves):
        dofs = _relax_on_host(
            problems, optimizer, fmax, steps, [np.asarray(x) for x in leaves], treedef
        )
        return tuple(jnp.asarray(d) for d in dofs)

    def forward(leaves):
        dofs = minimum(leaves)
        return dofs, (leaves, dofs)

    def backward(residuals, cotangents):
        leaves, dofs = residuals
        potential_now = jax.tree.unflatten(treedef, list(leaves))
        total = jax.tree.map(jnp.zeros_like, potential_now)
        for problem, dof, v in zip(problems, dofs, cotangents, strict=True):
            modes = jax.device_put(problem.zero_modes())
            w = _hessian_solve(
                dof, jnp.asarray(v), potential_now, problem.ctx, modes, cg_tol, problem.relax_cell
            )
            contribution = _parameter_pullback(
                -w, dof, potential_now, problem.ctx, problem.relax_cell
            )
            total = jax.tree.map(jnp.add, total, contribution)
        return (jax.tree.leaves(total),)

    minimum.defvjp(forward, backward)
    dofs = minimum(list(leaves))
    out = []
    for problem, dof in zip(problems, dofs, strict=True):
        positions, cell = problem.geometry(dof)
        energy = problem.energy_at(positions, cell, potential)
        out.append(Relaxed(positions=positions, cell=cell, energy=energy))
    return out
