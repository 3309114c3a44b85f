"""One EMT energy + forces call on a rattled Cu fcc crystal: molopt's ``emt`` (closed-form
derivatives, the default, and automatic differentiation, the reference route) beside ASE's
``ase.calculators.emt.EMT`` (NumPy) and, when installed, asap3's C++ EMT (its own parameters
and cutoff: the same physics, not the same numbers).

    python bench/emt_force_call.py [--repeat 4 8] [--samples 7] [--precision float64]

Each tool: one untimed call, then ``--samples`` timed calls after moving one atom by 1e-3 A
(so that ASE's and asap3's calculators recompute); the median in ms. molopt's times are of
the jitted evaluation with its neighbour list already built (as in a relaxation, where the
list is rebuilt only when an atom may have crossed the cutoff); ASE's include its
neighbour-list check. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def crystal(repeat: int):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=1)
    return atoms


def time_ase_calculator(atoms, calculator, samples: int) -> float:
    atoms = atoms.copy()
    atoms.calc = calculator
    atoms.get_forces()
    times = []
    for k in range(samples):
        atoms.positions[k % len(atoms), 0] += 1e-3
        start = time.perf_counter()
        atoms.get_forces()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_molopt(atoms, samples: int, precision: str, closed_form: bool) -> float:
    from molopt._jax import jax
    from molopt.engine.kernel import cast_potential
    from molopt.engine.packing import neighbor_lists, pack_structures
    from molopt.io.read import from_atoms
    from molopt.potentials.base import autodiff_evaluate
    from molopt.potentials.registry import load

    dtype = np.float64 if precision == "float64" else np.float32
    potential = cast_potential(load("emt").potential, dtype)
    batch, positions, cells, layout = pack_structures([from_atoms(atoms)], potential, dtype)
    host = neighbor_lists(positions, cells, batch.pbc, layout, potential, 1.0, dtype)
    nbrs = host.to_device()
    # everything an argument, as in the engine (captured arrays would be compile-time
    # constants that XLA may fold)
    if closed_form:
        call = jax.jit(lambda x, c, b, n, p: p.evaluate(x, c, b, n, False))
    else:
        call = jax.jit(lambda x, c, b, n, p: autodiff_evaluate(p, x, c, b, n, False))
    positions, cells = jax.device_put(positions), jax.device_put(cells)
    jax.block_until_ready(call(positions, cells, batch, nbrs, potential))
    times = []
    for k in range(samples):
        moved = positions.at[k % len(atoms), 0].add(1e-3)
        jax.block_until_ready(moved)
        start = time.perf_counter()
        jax.block_until_ready(call(moved, cells, batch, nbrs, potential))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--precision", choices=["float64", "float32"], default="float64")
    args = parser.parse_args(argv)
    from ase.calculators.emt import EMT

    import molopt._jax  # noqa: F401  (float64 on)

    try:
        from asap3 import EMT as AsapEMT
    except ImportError:
        AsapEMT = None
    print("| atoms | molopt emt (ms) | molopt emt, autodiff (ms) | ASE EMT (ms) | asap3 EMT (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for repeat in args.repeat:
        atoms = crystal(repeat)
        ours = time_molopt(atoms, args.samples, args.precision, closed_form=True)
        autodiff = time_molopt(atoms, args.samples, args.precision, closed_form=False)
        theirs = time_ase_calculator(atoms, EMT(), args.samples)
        asap = time_ase_calculator(atoms, AsapEMT(), args.samples) if AsapEMT else None
        asap_text = f"{1e3 * asap:.1f}" if asap is not None else "not installed"
        print(
            f"| {len(atoms)} | {1e3 * ours:.1f} | {1e3 * autodiff:.1f} | {1e3 * theirs:.1f} "
            f"| {asap_text} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
