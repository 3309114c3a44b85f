"""Batching decisions, as pure host functions: which queued structures join a batch, and
when a running batch should be repacked (refilled from the queue, or compacted into a
smaller bucket once most of it is idle). The scheduler asks; nothing here touches a device."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from molopt.batch import Layout, plan_layout


def admit(
    queue: deque,
    keep: list,
    batch_size: int,
    max_batch_atoms: int,
    fits: Callable[[list], bool] | None = None,
) -> list:
    """Items for the next batch: ``keep`` (still running) plus queued ones that fit, in queue
    order, taken from ``queue``. A batch holds at most ``batch_size`` structures and, unless
    one structure alone is bigger, ``max_batch_atoms`` atoms and what ``fits`` (the memory
    bound) accepts; periodic structures and molecules are never mixed (periodic images need
    many more neighbour slots)."""
    chosen = list(keep)
    atoms = sum(it.structure.n_atoms for it in chosen)
    periodic = chosen[0].structure.pbc.any() if chosen else None
    while queue and len(chosen) < batch_size:
        n = queue[0].structure.n_atoms
        if chosen and atoms + n > max_batch_atoms:
            break
        if chosen and fits is not None and not fits(chosen + [queue[0]]):
            break
        if periodic is not None and bool(queue[0].structure.pbc.any()) != periodic:
            break
        periodic = bool(queue[0].structure.pbc.any())
        chosen.append(queue.popleft())
        atoms += n
    return chosen


@dataclass(frozen=True)
class Idle:
    """A batch's idle account: device seconds it has wasted since it became sparse, and the
    share of the next chunk's device time its idle atoms waste (the fraction of its padded
    atoms a compacted batch would drop, times what an idle atom costs)."""

    wasted_s: float = 0.0
    fraction: float = 0.0


def should_repack(
    layout: Layout,
    running_sizes: Sequence[int],
    waiting: bool,
    n_done: int,
    computed_s: float,
    idle: Idle,
    idle_cost: float,
    compaction_cost: Callable[[Layout], float],
) -> tuple[bool, Idle]:
    """Whether to repack a batch of ``layout`` whose running systems have ``running_sizes``
    atoms, and its idle account after the chunk just computed (``computed_s`` device
    seconds, run at the idle fraction seen when it was launched). ``idle_cost``: the share
    of its device time an idle atom costs against a running one (1 unless the potential
    skips finished systems' work).

    With structures waiting: refill once systems have left and a quarter of the padded atoms
    or of the systems is free *and* the device time the free atoms have wasted has reached
    what starting a batch of this layout costs (``compaction_cost(layout)``: a refilled
    batch is about as big).
    With none waiting: compact once half of it is idle *and* the device time the sparse
    batch has wasted has reached what starting the compacted batch costs
    (``compaction_cost(target layout)``). Rent or buy, never more than twice the better of
    the two choices: a start that compiles (~10 s for SevenNet) waits for that much waste,
    a cheap one happens at once; a short tail finishes where it is, a long one still moves."""
    A = layout.n_padded_atoms
    atoms = sum(running_sizes)
    wasted = idle.wasted_s + computed_s * idle.fraction
    if waiting:
        free_atoms = A - atoms
        # (room made by systems that left: a batch's own padding is no reason to repack it)
        room = n_done >= 1 and (free_atoms >= A // 4 or n_done >= max(1, layout.n_systems // 4))
        idle = Idle(wasted, idle_cost * free_atoms / A if room else 0.0)
        return room and wasted >= compaction_cost(layout), idle
    target = plan_layout(list(running_sizes))
    smaller = target.n_padded_atoms
    # fewer systems alone is a reason only where idle systems cost as much as running ones
    # (where they cost little, a program with fewer systems saves next to nothing)
    sparse = smaller <= A // 2 or (
        idle_cost >= 1.0 and len(running_sizes) <= layout.n_systems // 2 and layout.n_systems > 4
    )
    idle = Idle(wasted, idle_cost * max(0.0, 1.0 - smaller / A) if sparse else 0.0)
    if not sparse:
        return False, idle
    return wasted >= compaction_cost(target), idle


def runs_in(key: tuple, n_atoms: int, n_systems: int, rows: int, row_reuse: float) -> bool:
    """Whether a batch of ``n_atoms`` padded atoms, ``n_systems`` systems and ``rows``
    neighbour rows can run in the program of shape ``key`` (:meth:`Engine._note_shape`'s
    (atoms, systems, list shapes, images)): the same atoms, at least the systems, and at
    least the rows but at most ``row_reuse`` times as many."""
    return key[0] == n_atoms and key[1] >= n_systems and rows <= key[2][2] <= row_reuse * rows


def compaction_cost(
    target: Layout,
    shapes_seen: set,
    start_cost: dict,
    override: float | None = None,
    rows: int = 0,
    row_reuse: float = 1.0,
) -> float:
    """Seconds a move to a batch of layout ``target`` is expected to cost: ``override`` when
    given, else the most a start of a batch of a new shape has cost (``start_cost['new']``),
    or, when the compacted shape has run before (in ``shapes_seen``), the most a start of a
    known shape has (``start_cost['known']``). With the row form of the lists (``rows``: the
    row capacity the moved systems need) a shape is known only where a program of the same
    padded atoms, at least the systems, and between ``rows`` and ``row_reuse`` times as many
    rows ran before (the one :meth:`Engine._seen_shape` would pick); the same atoms and
    systems with other rows would compile."""
    if override is not None:
        return override
    A, S = target.n_padded_atoms, target.n_systems
    if rows:
        known = any(runs_in(k, A, S, rows, row_reuse) for k in shapes_seen)
    else:
        known = any(k[:2] == (A, S) for k in shapes_seen)
    if known and "known" in start_cost:
        return start_cost["known"]
    return start_cost.get("new", 0.0)
