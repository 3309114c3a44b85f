"""One energy + forces + stress evaluation of a padded batch of SevenNet-0 crystals, as a
relaxation step makes it: the 16 crystals of ``bench/sevennet_throughput.py`` (2-8 atoms)
packed into one batch, neighbour lists at the cutoff + --skin, then the compiled call timed.

    python bench/sevennet_batch_call.py [--precision float64] [--skin 1.0] [--dense] [--keep N]

--dense reads the dense neighbour list instead of the row form (SevenNet's row_width 0).
--keep N evaluates only the first N crystals' rows, as a relaxation step does once the
others have converged (``neighbors.only_systems``).
Prints the list shapes and the median of --calls calls (after one that compiles).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="float64", choices=["float64", "float32"])
    parser.add_argument("--skin", type=float, default=1.0)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--dense", action="store_true")
    parser.add_argument("--keep", type=int, default=None)
    parser.add_argument("--count", type=int, default=16, help="crystals (default 16)")
    parser.add_argument("--max-atoms", type=int, default=8, help="largest crystal (default 8)")
    parser.add_argument("--profile", default=None, help="write a Perfetto trace of 3 calls here")
    args = parser.parse_args()

    import ase.io
    from sevennet_throughput import crystals

    from molopt._jax import jax
    from molopt.api import load_potential
    from molopt.engine.kernel import cast_potential, evaluate_once
    from molopt.engine.packing import neighbor_lists, pack_structures
    from molopt.io.read import from_atoms
    from molopt.neighbors import only_systems

    dtype = np.float64 if args.precision == "float64" else np.float32
    potential = cast_potential(load_potential("sevennet-0"), dtype)
    if args.dense:
        type(potential).row_width = 0
    with tempfile.TemporaryDirectory() as tmp:
        crystals(args.count, args.max_atoms, Path(tmp))
        structures = [from_atoms(ase.io.read(p)) for p in sorted(Path(tmp).glob("*.extxyz"))]
    batch, positions, cells, layout = pack_structures(structures, potential, dtype)
    host = neighbor_lists(positions, cells, batch.pbc, layout, potential, args.skin, dtype)
    nbrs = host.to_device()
    if args.keep is not None:
        keep = jax.numpy.arange(batch.n_systems) < args.keep
        nbrs = only_systems(nbrs, keep, batch.system_idx)
        print(f"rows of the first {args.keep} crystals only")
    pairs = int(host.mask.sum())
    print(f"{len(structures)} crystals, {layout.n_padded_atoms} padded atoms, {pairs} pairs")
    print(f"dense slots {host.index.size}", end="")
    if host.row_index is not None and not args.dense:
        print(f", rows {host.row_index.shape[1]} x {host.row_index.shape[0]} slots", end="")
    print()
    p, c = jax.device_put(positions), jax.device_put(cells)
    started = time.perf_counter()
    jax.block_until_ready(evaluate_once(p, c, batch, nbrs, potential, True))
    print(f"first call (compiles): {time.perf_counter() - started:.1f} s")
    times = []
    for _ in range(args.calls):
        started = time.perf_counter()
        jax.block_until_ready(evaluate_once(p, c, batch, nbrs, potential, True))
        times.append(time.perf_counter() - started)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(evaluate_once(p, c, batch, nbrs, potential, True))
    form = "dense" if args.dense else "rows"
    print(f"{args.precision} {form}: {1000 * statistics.median(times):.0f} ms per call "
          f"(calls: {', '.join(f'{1000 * t:.0f}' for t in times)})")  # fmt: skip


if __name__ == "__main__":
    main()
