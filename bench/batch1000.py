"""1,000 mixed small structures in one `molopt relax` call against a plain ASE loop.

    python bench/batch1000.py [--ase-subset 100]

Structures (deterministic): argon clusters of 5-40 atoms, small periodic fcc cells (4-32
atoms, strained and rattled) and slabs; argon LJ (epsilon 0.0104 eV, sigma 3.40 A, cutoff
8.5 A, shifted), FIRE to fmax 1e-3 eV/A. molopt: one command over the directory (whole
process, warm compilation cache; compilations counted from JAX's log). ASE: FIRE with ASE's
LennardJones calculator in a Python loop, on the first N structures, extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import precompile_molopt  # noqa: E402


def make_inputs(directory: Path, n: int = 1000, seed: int = 11):
    import ase.io
    from ase import Atoms
    from ase.build import bulk

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        path = directory / f"s{k:04d}.extxyz"
        if path.exists():
            continue
        kind = k % 3
        if kind == 0:  # cluster on a jittered grid
            size = int(rng.integers(5, 41))
            side = int(np.ceil(size ** (1 / 3)))
            grid = np.array(
                [(i, j, m) for i in range(side) for j in range(side) for m in range(side)]
            )[:size]
            atoms = Atoms(f"Ar{size}", positions=grid * 3.9 + rng.uniform(-0.3, 0.3, (size, 3)))
        elif kind == 1:  # small crystal
            reps = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2)][int(rng.integers(4))]
            atoms = bulk("Ar", "fcc", a=rng.uniform(5.1, 5.4), cubic=True).repeat(reps)
            atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        else:  # slab
            atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
            atoms.pbc = [True, True, False]
            atoms.center(vacuum=5.0, axis=2)
            atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        ase.io.write(path, atoms)


def run_molopt(inputs: Path, cache: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="b1000-"))
    env = dict(os.environ, MOLOPT_CACHE_DIR=str(cache), JAX_LOG_COMPILES="1")
    cmd = [
        sys.executable,
        "-m",
        "molopt.cli",
        "relax",
        str(inputs),
        "-p",
        "argon",
        "--fmax",
        "1e-3",
        "-o",
        str(out),
        "--json",
        "-q",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    records = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    shutil.rmtree(out, ignore_errors=True)
    compiled = re.findall(
        r"Compiling (jit\w+)|Finished XLA compilation of (jit\(\w+\))", proc.stderr
    )
    misses = len(
        re.findall(r"Not writing persistent cache entry|Writing .* to persistent", proc.stderr)
    )
    hits = len(re.findall(r"Persistent compilation cache hit", proc.stderr))
    return {
        "wall_s": wall,
        "n": len(records),
        "converged": sum(r["status"] == "converged" for r in records),
        "steps": sum(r["steps"] or 0 for r in records),
        "xla_compilations": len(compiled),
        "cache_hits": hits,
        "cache_writes": misses,
    }


def run_ase(inputs: Path, limit: int) -> dict:
    import ase.io
    from ase.calculators.lj import LennardJones
    from ase.optimize import FIRE

    paths = sorted(inputs.glob("*.extxyz"))[:limit]
    t = time.perf_counter()
    steps = 0
    for path in paths:
        atoms = ase.io.read(path)
        atoms.calc = LennardJones(epsilon=0.0104, sigma=3.40, rc=8.5)
        opt = FIRE(atoms, logfile=None)
        opt.run(fmax=1e-3, steps=100000)
        steps += opt.nsteps
    return {"wall_s": time.perf_counter() - t, "n": len(paths), "steps": steps}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ase-subset", type=int, default=100)
    args = parser.parse_args()
    inputs = HERE / "out" / "batch1000"
    make_inputs(inputs)
    print(f"molopt from {precompile_molopt()} (bytecode written)", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="b1000-cache-"))
    cold = run_molopt(inputs, cache)
    warm = run_molopt(inputs, cache)
    ase_result = run_ase(inputs, args.ase_subset)
    rate_molopt = warm["n"] / warm["wall_s"]
    rate_ase = ase_result["n"] / ase_result["wall_s"]
    result = {
        "molopt_cold": cold,
        "molopt_warm": warm,
        "ase": ase_result,
        "structures_per_s": {
            "molopt_warm": rate_molopt,
            "molopt_cold": cold["n"] / cold["wall_s"],
            "ase_loop": rate_ase,
        },
        "speedup_warm": rate_molopt / rate_ase,
    }
    (HERE / "out" / "batch1000.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
