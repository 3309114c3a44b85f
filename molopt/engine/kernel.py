"""The one jit boundary of a relaxation: :func:`initial_state`, :func:`advance` (a bounded
loop of up to ``chunk`` optimizer steps over a padded batch, each system with its own
optimizer state, step count and status, recording every step into a preallocated buffer and
stopping early when every system has finished or some system's neighbour list has gone
stale) and :func:`evaluate_once`. No IO, no exceptions, no host syncs in here."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax.numpy as jnp
import numpy as np

from molopt import constraints as cons
from molopt import neighbors as nl
from molopt import symmetry as sym
from molopt._jax import jax
from molopt.batch import Batch, system_sum
from molopt.engine.state import Program, RelaxState, Status, StepBuffer
from molopt.optimizers import cell as cellfilter
from molopt.optimizers.rows import Rows
from molopt.potentials.base import PotentialMethods as Potential

RUNNING, CONVERGED, NOT_CONVERGED, FAILED, EXPLODED = (int(s) for s in Status)


def _rows(batch: Batch, program: Program) -> Rows:
    idx = batch.system_idx
    if program.variable_cell:
        cell_rows = jnp.repeat(jnp.arange(batch.n_systems, dtype=idx.dtype), 3)
        idx = jnp.concatenate([idx, cell_rows])
    return Rows(idx, batch.n_systems)


def _movable(batch: Batch, program: Program, reference):
    """(R, 3) where the optimizer's step applies: free atoms, and with a variable cell the
    cell coordinates inside each system's mask of free strain components."""
    atoms = batch.atom_mask & ~batch.fixed
    movable = jnp.broadcast_to(atoms[:, None], (atoms.shape[0], 3))
    if program.variable_cell:
        cell_rows = jnp.repeat(batch.system_mask, 3)[:, None] & (
            cellfilter.free_rows(reference) > 0
        )
        movable = jnp.concatenate([movable, cell_rows])
    return movable


def _physical(x, cell0, batch, program, reference):
    if program.variable_cell:
        return cellfilter.to_physical(x, batch.system_idx, reference)
    return x, cell0, None


def _evaluate(state: RelaxState, batch, nbrs, potential, program, reference, targets):
    """Forces etc. at ``state.x``; updates step counts and statuses of active systems."""
    rows = _rows(batch, program)
    positions, cell, F = _physical(state.x, state.cell, batch, program, reference)
    running = (state.status == RUNNING) & batch.system_mask
    # finished systems keep what they had (below): their neighbours need no evaluation
    # (a row-form potential skips their rows; lists never cross systems)
    nbrs = nl.only_systems(nbrs, running, batch.system_idx)
    ev = potential.evaluate(positions, cell, batch, nbrs, program.stress or program.variable_cell)
    forces = jnp.where(batch.atom_mask[:, None], ev.forces, 0.0)
    constrained = jnp.where(batch.fixed[:, None], 0.0, forces)
    constrained, energy, dE_dstrain = _constrain(constrained, ev, positions, cell, batch)
    if program.variable_cell:
        generalized = cellfilter.generalized_forces(
            state.x, constrained, dE_dstrain, cell, F, batch.system_idx, reference
        )
    else:
        generalized = constrained
    fmax = rows.max_norm(generalized)
    bad_rows = ~jnp.all(jnp.isfinite(generalized), axis=1)
    bad = (system_sum(bad_rows.astype(jnp.int32), rows.system_idx, batch.n_systems) > 0) | (
        ~jnp.isfinite(ev.energy)
    )
    counted = running & state.completes
    n_steps = state.n_steps + (counted & state.pending).astype(jnp.int32)
    status = state.status
    status = jnp.where(running & bad, FAILED, status)
    floor = targets.energy_floor * jnp.maximum(batch.n_atoms, 1)
    status = jnp.where(running & ~bad & (ev.energy < floor), EXPLODED, status)
    status = jnp.where(
        (status == RUNNING) & counted & ~bad & (fmax < targets.fmax), CONVERGED, status
    )
    status = jnp.where(
        (status == RUNNING) & counted & (n_steps >= targets.max_steps), NOT_CONVERGED, status
    )
    updated = dataclasses.replace(
        state,
        positions=positions,
        cell=cell,
        forces=forces,
        generalized=generalized,
        energy=energy,
        dE_dstrain=dE_dstrain,
        fmax=fmax,
        n_steps=n_steps,
        status=status,
        pending=jnp.asarray(False),
    )
    # systems that were not running keep every evaluated quantity as it was
    return _keep_finished(updated, state, running, batch, program), counted


def _constrain(forces, ev, positions, cell, batch: Batch):
    """ASE's constraints beyond FixAtoms on what the optimizer sees: forces as
    ``Atoms.get_forces()``, the stress as ``Atoms.get_stress()`` (symmetrized), the energy as
    ``Atoms.get_potential_energy()`` (springs included)."""
    energy, dE_dstrain = ev.energy, ev.dE_dstrain
    if batch.constraints is not None:
        forces, springs = cons.adjust_forces(
            batch.constraints, forces, positions, cell, batch.pbc, batch.system_idx, batch.n_systems
        )
        energy = energy + springs
    if batch.symmetry is not None:
        forces = sym.symmetrize_vectors(
            batch.symmetry, forces, cell, batch.system_idx, batch.n_systems
        )
        dE_dstrain = sym.symmetrize_tensors(batch.symmetry, dE_dstrain, cell)
    return forces, energy, dE_dstrain


def _constrain_step(step, x, cell, batch: Batch, program: Program, reference):
    """An optimizer's step as ``Atoms.set_positions`` applies it under the constraints (and
    the cell step as ``FixSymmetry.adjust_cell``). Atom steps are in the optimizer's frame,
    the reference cell's with a variable cell: there ASE's filter sets the new cell first and
    the constraints act on the Cartesian step in it, so each atom's map is conjugated by the
    new deformation gradient (:func:`molopt.constraints.adjust_step`)."""
    if batch.constraints is None and batch.symmetry is None:
        return step
    n_atoms = batch.n_padded_atoms
    atoms = step[:n_atoms]
    cell_step = step[n_atoms:]
    if batch.symmetry is not None and program.variable_cell:
        shaped = cell_step.reshape(batch.n_systems, 3, 3)
        cell_step = sym.symmetrize_tensors(batch.symmetry, shaped, reference.cell).reshape(-1, 3)
    if batch.constraints is not None:
        deformation = None
        if program.variable_cell:
            deformation = cellfilter.deformation(x[n_atoms:] + cell_step, reference)
            # the cell ASE sets for a mask that is not a block of axes (cellfilter.read_back)
            eye = jnp.eye(3, dtype=x.dtype)
            masked = eye + (deformation - eye) * jnp.swapaxes(reference.mask, 1, 2)
            deformation = jnp.where(reference.roundtrip[:, None, None], masked, deformation)
            real = batch.system_mask[:, None, None]
            deformation = jnp.where(real, deformation, jnp.eye(3, dtype=x.dtype))
        atoms = cons.adjust_step(
            batch.constraints, atoms, batch.system_idx, batch.n_systems, deformation
        )
    if batch.symmetry is not None:
        frame = reference.cell if program.variable_cell else cell
        atoms = sym.symmetrize_vectors(
            batch.symmetry, atoms, frame, batch.system_idx, batch.n_systems
        )
    return jnp.concatenate([atoms, cell_step])


def _keep_finished(new: RelaxState, old: RelaxState, running, batch, program):
    atom_running = running[jnp.minimum(batch.system_idx, batch.n_systems - 1)]
    rows = _rows(batch, program)
    row_running = running[jnp.minimum(rows.system_idx, batch.n_systems - 1)]
    out = {}
    for name in ("positions", "forces", "generalized", "energy", "dE_dstrain", "fmax", "cell"):
        n, o = getattr(new, name), getattr(old, name)
        mask = {"positions": atom_running, "forces": atom_running, "generalized": row_running}.get(
            name, running
        )
        out[name] = jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
    return dataclasses.replace(new, **out)


@partial(jax.jit, static_argnames=("program",))
def initial_state(x, cell, batch, program: Program) -> RelaxState:
    """The state before step 0, nothing evaluated yet: ``pending``, with ``n_steps`` at -1
    so that the evaluation of the pending "move" (the first thing :func:`advance` does;
    ``limit`` 0 to do only that) counts it as step 0: converged already if fmax < target,
    "not converged" if max_steps is 0 (evaluate only). A program of its own this small
    costs next to nothing to trace and load; one that evaluated would trace the potential a
    second time."""
    n_rows = x.shape[0]
    dtype = x.dtype
    S = batch.n_systems
    return RelaxState(
        x=x,
        positions=x[: batch.n_padded_atoms],
        cell=cell,
        forces=jnp.zeros((batch.n_padded_atoms, 3), dtype),
        generalized=jnp.zeros((n_rows, 3), dtype),
        energy=jnp.zeros((S,), dtype),
        dE_dstrain=jnp.zeros((S, 3, 3), dtype),
        fmax=jnp.zeros((S,), dtype),
        n_steps=jnp.where(batch.system_mask, -1, 0).astype(jnp.int32),
        status=jnp.where(batch.system_mask, RUNNING, NOT_CONVERGED).astype(jnp.int32),
        completes=jnp.ones((S,), bool),
        pending=jnp.asarray(True),
        opt=program.optimizer.init(n_rows, S, dtype),
    )


def _empty_frames(state: RelaxState, k: int) -> StepBuffer:
    def buf(a, dtype=None):
        return jnp.zeros((k,) + a.shape, dtype or a.dtype)

    return StepBuffer(
        positions=buf(state.positions),
        forces=buf(state.forces),
        energy=buf(state.energy),
        fmax=buf(state.fmax),
        step=buf(state.n_steps),
        cell=buf(state.cell),
        dE_dstrain=buf(state.dE_dstrain),
        recorded=buf(state.status, bool),
    )


@partial(jax.jit, static_argnames=("program",), donate_argnames=("state",))
def advance(state: RelaxState, batch, nbrs, potential, reference, targets, program: Program, limit):
    """Run up to ``min(program.chunk, limit)`` steps (``limit`` a traced int: 0 only
    evaluates a pending move). Returns (state, frames, n_frames, stale (S,)).

    Each iteration moves every running system, then evaluates. When a system's neighbour
    list went stale with that move, nothing is evaluated, the state is left ``pending`` with
    the positions and cells it moved to, and the loop stops: the host rebuilds the lists
    there and the next call evaluates first. No ``cond`` carries the big buffers (XLA would
    copy them every step); for a ``costly`` potential one around the evaluation (positions
    and per-system values) skips a stale move's evaluation.
    """
    rows = _rows(batch, program)
    movable = _movable(batch, program, reference)
    evaluated_fields = (
        "positions",
        "cell",
        "forces",
        "generalized",
        "energy",
        "dE_dstrain",
        "fmax",
        "n_steps",
        "status",
        "pending",
    )

    def record(frames: StepBuffer, n, s: RelaxState, counted) -> StepBuffer:
        if not program.record:
            return frames
        values = dict(
            positions=s.positions,
            forces=s.forces,
            energy=s.energy,
            fmax=s.fmax,
            step=s.n_steps,
            cell=s.cell,
            dE_dstrain=s.dE_dstrain,
            recorded=counted,
        )
        return StepBuffer(**{k: getattr(frames, k).at[n].set(v) for k, v in values.items()})

    def body(carry):
        s, frames, n, _ = carry
        # a pending move (the initial state, or a move made before the lists were rebuilt)
        # is evaluated first, with no step: one copy of the potential in the program (a
        # second, for the pending evaluation alone, doubled the compile time)
        move = ~s.pending
        active = (s.status == RUNNING) & batch.system_mask
        # (optimizers keep the state of systems they are not asked to move)
        opt, dx, completes = program.optimizer.step(s.opt, s.x, s.generalized, active & move, rows)
        step = _constrain_step(jnp.where(movable, dx, 0.0), s.x, s.cell, batch, program, reference)
        x = s.x + step
        if program.variable_cell and program.roundtrip:  # as ASE reads U back from a masked cell
            x = cellfilter.read_back(x, reference)
        moved = dataclasses.replace(
            s,
            x=jnp.where(move, x, s.x),
            opt=opt,
            pending=jnp.asarray(True),
            completes=jnp.where(move, completes, s.completes),
        )
        positions, cell, _ = _physical(moved.x, s.cell, batch, program, reference)
        # (a pending move is evaluated: its lists were built where it went)
        stale = (
            nl.stale_systems(
                positions, cell, batch.system_idx, batch.system_mask, nbrs, program.variable_cell
            )
            & active
            & move
        )
        ok = ~jnp.any(stale)

        def evaluate(m):
            evaluated, counted = _evaluate(m, batch, nbrs, potential, program, reference, targets)
            return {name: getattr(evaluated, name) for name in evaluated_fields}, counted

        def skip(m):  # where the move went, for the host to rebuild the lists there
            fields = {name: getattr(m, name) for name in evaluated_fields}
            fields.update(positions=positions, cell=cell)
            return fields, jnp.zeros_like(m.status, bool)

        light = dataclasses.replace(moved, opt=None)
        if getattr(potential, "costly", False):
            # only when every list is still valid: a stale move's evaluation would be thrown
            # away, a step's worth of time per rebuild. (The branches carry the evaluated
            # fields only; for a cheap potential copying them costs more than it saves.)
            fields, counted = jax.lax.cond(ok, evaluate, skip, light)
        else:
            evaluated, counted = evaluate(light)
            kept, _ = skip(light)
            fields = {k: jnp.where(ok, evaluated[k], kept[k]) for k in evaluated_fields}
        s = dataclasses.replace(moved, **fields)
        frames = record(frames, n, s, counted & ok)
        return s, frames, n + ok.astype(n.dtype), stale

    def keep_going(carry):
        s, _, n, stale = carry
        running = jnp.any((s.status == RUNNING) & batch.system_mask)
        steps_left = n < jnp.minimum(program.chunk, limit)
        return (s.pending | (steps_left & running)) & ~jnp.any(stale)

    frames = _empty_frames(state, program.chunk if program.record else 1)
    stale0 = jnp.zeros((batch.n_systems,), bool)
    state, frames, n_frames, stale = jax.lax.while_loop(
        keep_going, body, (state, frames, jnp.asarray(0), stale0)
    )
    return state, frames, n_frames, stale


@partial(jax.jit, static_argnames=("stress",))
def evaluate_once(positions, cell, batch, nbrs, potential, stress: bool):
    """Plain energy/forces(/dE_dstrain) of a packed batch (for final results, the API)."""
    return potential.evaluate(positions, cell, batch, nbrs, stress)


def cast_potential(potential: Potential, dtype):
    """The potential with its floating-point leaves in ``dtype``, on the device."""

    def cast(a):
        if isinstance(a, jax.Array | np.ndarray) and jnp.issubdtype(a.dtype, jnp.floating):
            return jax.device_put(np.asarray(a, dtype))
        return a

    return jax.tree.map(cast, potential)
