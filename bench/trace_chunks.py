"""A `molopt relax` run with one line per compiled chunk: when each batch starts (its shapes:
structures, padded atoms, systems, neighbour slots / ghosts / rows, whether the shape is new),
each chunk's steps and seconds, and each neighbour-list rebuild. What a batching policy did.

    python bench/trace_chunks.py relax DIR --potential sevennet-0 --relax-cell -o OUT -q

(the arguments are `molopt`'s). Times are waited for (each chunk is synchronised), so the run
is a little slower than an untraced one.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import molopt.engine.scheduler as scheduler
from molopt._jax import jax

T0 = time.perf_counter()
launch, advance, rebuild = (
    scheduler.Engine._launch,
    scheduler.Engine._advance,
    scheduler.Engine._rebuild,
)


def now() -> str:
    return f"{time.perf_counter() - T0:8.2f}"


def traced_launch(self, items, carry=None, **options):
    started = time.perf_counter()
    live = launch(self, items, carry, **options)
    jax.block_until_ready(live.state)
    layout = live.layout
    print(
        f"{now()} batch: {len(items)} structures, {layout.n_padded_atoms} padded atoms, "
        f"{layout.n_systems} systems, lists (slots, ghosts, rows) {live.nbrs_host.shapes}, "
        f"{'new' if live.new_shape else 'known'} shape, started in "
        f"{time.perf_counter() - started:.2f} s",
        flush=True,
    )
    return live


def traced_advance(self, live, limit=None):
    started = time.perf_counter()
    before = np.asarray(live.state.n_steps).copy()
    advance(self, live, limit)
    jax.block_until_ready(live.state)
    if limit is None:
        status = np.asarray(live.state.status)[: live.layout.n_real]
        advanced = np.asarray(live.state.n_steps) - before
        # batch steps: the most any system took; system-steps: all systems' steps together
        # (a carried system's own count can exceed the batch's, so counts are not compared)
        print(
            f"{now()}   chunk: {int(advanced.max())} batch steps, {int(advanced.sum())} "
            f"system-steps, {int((status == 0).sum())} running, "
            f"{time.perf_counter() - started:.3f} s",
            flush=True,
        )


def traced_rebuild(self, live, systems):
    old = live.nbrs_host.shapes
    rebuild(self, live, systems)
    grown = "" if live.nbrs_host.shapes == old else f" (grew {old} -> {live.nbrs_host.shapes})"
    print(f"{now()}     rebuilt the lists of {len(systems)} system(s){grown}", flush=True)


scheduler.Engine._launch = traced_launch
scheduler.Engine._advance = traced_advance
scheduler.Engine._rebuild = traced_rebuild

if __name__ == "__main__":
    from molopt.cli import app

    sys.argv = ["molopt", *sys.argv[1:]]
    try:
        app()
    finally:
        print(f"{now()} total")
