"""Cost of one BFGS step for one system of n atoms: molopt's jitted ``BFGS.step`` (the
engine's block size, :func:`molopt.optimizers.bfgs.block_rows`) beside ASE's ``BFGS`` step
(``prepare_step`` + ``determine_step``, numpy), on the same random points and forces.

    python bench/bfgs_step.py                 # 100 and 1000 atoms, median of 5 steps
    python bench/bfgs_step.py 300 --repeat 3

Only the optimizer's step is timed (no forces): the update of the Hessian, its
eigendecomposition and the step. Float64, one system per batch; the Hessian block's memory
is printed with it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import molopt._jax  # noqa: F401  (x64)


def molopt_step_s(n_atoms: int, repeat: int) -> tuple[float, int]:
    import jax
    import jax.numpy as jnp

    from molopt.optimizers.bfgs import BFGS, block_rows
    from molopt.optimizers.rows import Rows

    optimizer = BFGS(system_rows=block_rows(n_atoms))
    rows = Rows(jnp.zeros(n_atoms, jnp.int32), 1)
    state = optimizer.init(n_atoms, 1, jnp.float64)
    active = jnp.ones(1, bool)
    step = jax.jit(lambda st, x, f: optimizer.step(st, x, f, active, rows))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n_atoms, 3)))
    times = []
    for k in range(repeat + 2):  # two untimed: compiling, then the first update
        f = jnp.asarray(rng.normal(size=(n_atoms, 3)))
        start = time.perf_counter()
        state, dx, _ = step(state, x, f)
        jax.block_until_ready(dx)
        if k >= 2:
            times.append(time.perf_counter() - start)
        x = x + dx
    return statistics.median(times), 3 * optimizer.system_rows


def ase_step_s(n_atoms: int, repeat: int) -> float:
    from ase import Atoms
    from ase.optimize import BFGS

    optimizer = BFGS(Atoms(f"Ar{n_atoms}"), logfile=None)
    rng = np.random.default_rng(0)
    x = rng.normal(size=3 * n_atoms)
    times = []
    for k in range(repeat + 1):
        gradient = rng.normal(size=3 * n_atoms)
        start = time.perf_counter()
        dx, lengths = optimizer.prepare_step(x, gradient)
        dx = optimizer.determine_step(dx, lengths)
        if k >= 1:
            times.append(time.perf_counter() - start)
        x = x + dx
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("atoms", nargs="*", type=int, default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for n in args.atoms:
        molopt_s, dim = molopt_step_s(n, args.repeat)
        ase_s = ase_step_s(n, args.repeat)
        print(
            f"{n} atoms: molopt {molopt_s * 1e3:.1f} ms/step (block {dim}x{dim}, "
            f"{8 * dim * dim / 1e6:.1f} MB), ASE {ase_s * 1e3:.1f} ms/step",
            flush=True,
        )


if __name__ == "__main__":
    main()
