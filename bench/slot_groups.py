"""One Lennard-Jones force call (argon, float64, fcc crystals of growing size, rattled) with the
neighbour slots summed all at once and in groups of several sizes: the figures behind
``molopt.neighbors.SLOT_GROUP_ABOVE_BYTES`` / ``SLOT_GROUP_BYTES``. Prints median ms per call.

    python bench/slot_groups.py [8,10,12,14,17,20]
"""

import sys
import time

import numpy as np
from ase.build import bulk

from molopt import batch as B
from molopt import engine as E
from molopt import neighbors as N
from molopt._jax import jax
from molopt.io.read import from_atoms
from molopt.potentials.registry import load


def median_ms(f, repeats=15):
    jax.block_until_ready(f())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main():
    sizes = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8,10,12,14,17,20").split(",")]
    potential = load("argon").potential
    rng = np.random.default_rng(0)
    settings = [("at once", 1 << 60, 0)] + [
        (f"groups<={b >> 10}KiB", 0, b) for b in (256 << 10, 512 << 10, 1 << 20, 2 << 20)
    ]
    print("atoms  K  (K,A) MiB  " + "  ".join(name for name, _, _ in settings))
    for n in sizes:
        atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((n, n, n))
        atoms.positions += rng.uniform(-0.2, 0.2, atoms.positions.shape)
        s = from_atoms(atoms)
        batch, pos, cells, layout = B.pack([s], potential.species_of(s.numbers), np.float64)
        nbrs = N.build(pos, cells, np.asarray(batch.pbc), layout, potential.cutoff, 1.0)
        nbrs = nbrs.to_device()
        p, c = jax.numpy.asarray(pos), jax.numpy.asarray(cells)
        K, A = nbrs.index.shape
        row = []
        for _, above, group_bytes in settings:
            N.SLOT_GROUP_ABOVE_BYTES, N.SLOT_GROUP_BYTES = above, group_bytes
            jax.clear_caches()
            g = N.slot_group(K, A, 8, minimum=N.SLOT_GROUP_MIN)  # as summed
            ms = median_ms(
                lambda p=p, c=c, b=batch, nb=nbrs: E.evaluate_once(p, c, b, nb, potential, False)
            )
            row.append(f"g={g}: {ms:.1f}")
        print(f"{len(atoms):6d} {K} {K * A * 8 / 2**20:6.1f}  " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
