"""The state types of a batched relaxation: what evolves inside the compiled loop, what the
loop reads, and its static configuration. Every field of :class:`RelaxState` declares its
scope (:mod:`molopt.scopes`), so systems move between batches without special cases."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import jax

from molopt.scopes import ATOM, GLOBAL, NESTED, ROW, SYSTEM, batched_state, scoped


class Status(IntEnum):
    """Per-system status inside the compiled loop; its value is what the device holds."""

    RUNNING = 0
    CONVERGED = 1
    NOT_CONVERGED = 2
    FAILED = 3  # energy or forces not finite
    EXPLODED = 4  # energy past its sane bound: stopped early

    @property
    def label(self) -> str:
        """The status as users read it (JSON records, H5MD ``/parameters``)."""
        if self in (Status.FAILED, Status.EXPLODED):
            return "failed"
        return "not_converged" if self == Status.RUNNING else self.name.lower()

    @property
    def stop_reason(self) -> str:
        """Why the relaxation stopped: ``converged``, ``step_limit``, ``non_finite`` (energy
        or forces NaN/inf) or ``exploded`` (energy past its bound)."""
        return {
            Status.CONVERGED: "converged",
            Status.NOT_CONVERGED: "step_limit",
            Status.RUNNING: "step_limit",
            Status.FAILED: "non_finite",
            Status.EXPLODED: "exploded",
        }[self]


@batched_state
class RelaxState:
    """Everything that evolves. Rows: R = A atoms (+ 3S cell rows with a variable cell).

    ``x`` (R, 3) optimizer coordinates; ``positions`` (A, 3) A and ``cell`` (S, 3, 3) A;
    ``forces`` (A, 3) eV/A from the potential; ``generalized`` (R, 3) forces the optimizer
    sees (constraints applied; cell rows); ``energy`` (S,) eV; ``dE_dstrain`` (S, 3, 3) eV;
    ``fmax`` (S,) eV/A (ASE's, cell rows included); ``n_steps``/``status`` (S,) int32;
    ``completes`` (S,) whether the pending move is a full optimizer step; ``pending`` ()
    a move was made whose forces are not evaluated yet; ``opt`` the optimizer's state.
    """

    x: jax.Array = scoped(ROW)
    positions: jax.Array = scoped(ATOM)
    cell: jax.Array = scoped(SYSTEM)
    forces: jax.Array = scoped(ATOM)
    generalized: jax.Array = scoped(ROW)
    energy: jax.Array = scoped(SYSTEM)
    dE_dstrain: jax.Array = scoped(SYSTEM)
    fmax: jax.Array = scoped(SYSTEM)
    n_steps: jax.Array = scoped(SYSTEM)
    status: jax.Array = scoped(SYSTEM)
    completes: jax.Array = scoped(SYSTEM)
    pending: jax.Array = scoped(GLOBAL)
    opt: Any = scoped(NESTED)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Targets:
    """Convergence: ``fmax`` (eV/A, strict ``<`` as ASE) and ``max_steps`` per system; a
    system whose energy per atom falls below ``energy_floor`` (eV) has exploded."""

    fmax: jax.Array
    max_steps: jax.Array
    energy_floor: jax.Array


@dataclass(frozen=True)
class Program:
    """Static configuration of the compiled computation (part of the cache key)."""

    optimizer: Any
    variable_cell: bool = False
    stress: bool = False
    chunk: int = 50
    record: bool = True  # keep every step's frame (else only the state: first/last frames)
    #: some system's cell mask is not a block of axes: ASE's read-back of U through logm is
    #: compiled in (:func:`molopt.optimizers.cell.read_back`; a no-op for block masks)
    roundtrip: bool = False


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepBuffer:
    """Up to ``chunk`` recorded steps of a batch, preallocated inside the compiled loop:
    ``positions``/``forces`` (k, A, 3); ``energy``, ``fmax``, ``step`` (k, S);
    ``cell``/``dE_dstrain`` (k, S, 3, 3); ``recorded`` (k, S)."""

    positions: jax.Array
    forces: jax.Array
    energy: jax.Array
    fmax: jax.Array
    step: jax.Array
    cell: jax.Array
    dE_dstrain: jax.Array
    recorded: jax.Array
