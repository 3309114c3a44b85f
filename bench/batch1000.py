"""1,000 mixed small structures in one `molopt relax` call against ASE FIRE + asap3 in a loop.

    python bench/batch1000.py                 # 3 alternated rounds, medians
    python bench/batch1000.py --numpy         # also ASE FIRE + ASE's numpy LennardJones
    python bench/batch1000.py --limit 30 --repeat 1    # smoke test: the first 30 structures

Structures (deterministic): argon clusters of 5-40 atoms, small periodic fcc cells (4-32
atoms, strained and rattled) and slabs; argon LJ (epsilon 0.0104 eV, sigma 3.40 A, cutoff
8.5 A, shifted), FIRE to fmax 1e-3 eV/A, float64.

Both sides relax every structure (no subset, no extrapolation), each as a whole process
timed from start to exit (wall clock, peak RSS), writing one output file set per structure:
* molopt: one `molopt relax` over the directory (the command of bench/workloads.py, so
  --traj-interval 0), warm compilation cache, writes <stem>.h5md (first and last frames) and
  <stem>.extxyz. A cold run first fills the cache (compilations counted from JAX's log).
* ASE + asap3: `bench/peers.py ase-asap3 DIR --out OUT`, a Python loop of ASE FIRE with
  asap3's compiled LennardJones, writes <stem>.extxyz (no H5MD). asap3 refuses a periodic
  cell under 17 A (twice the cutoff) along a periodic direction, which the small crystals and
  slabs are: for those it evaluates the replicated supercell and returns the cell's share
  (peers._Replicated; FIRE still runs on the small cell, step for step ASE's).
* --numpy: ASE FIRE with ASE's numpy LennardJones (`bench/peers.py ase-numpy`), likewise.
Rounds alternate (molopt, asap3[, numpy], molopt, ...); medians of --repeat rounds (>= 3 for
figures). JSON to bench/out/batch1000.json (bench/out/batch1000-firstN.json with --limit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import run_peer, timed  # noqa: E402
from workloads import molopt_command, precompile_molopt  # noqa: E402


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


def first(inputs: Path, n: int) -> Path:
    """A directory with the first ``n`` inputs (smoke tests): both sides relax the same."""
    target = inputs.parent / f"{inputs.name}-first{n}"
    target.mkdir(exist_ok=True)
    for p in sorted(inputs.glob("*.extxyz"))[:n]:
        if not (target / p.name).exists():
            shutil.copy(p, target / p.name)
    return target


def run_molopt(inputs: Path, cache: Path, log_compiles: bool = False) -> dict:
    out = Path(tempfile.mkdtemp(prefix="b1000-"))
    env = dict(os.environ, MOLOPT_CACHE_DIR=str(cache))
    if log_compiles:
        env["JAX_LOG_COMPILES"] = "1"
    cmd = molopt_command(inputs, out)
    try:
        wall, rss, stdout, stderr = timed(cmd, env, stderr=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    records = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    result = {
        "wall_s": wall,
        "rss_mib": rss,
        "n": len(records),
        "converged": sum(r["status"] == "converged" for r in records),
        "steps": sum(r["steps"] or 0 for r in records),
        "energy_sum": sum(r["energy"] for r in records if r["energy"] is not None),
    }
    if log_compiles:
        result["xla_compilations"] = len(
            re.findall(r"Compiling (jit\w+)|Finished XLA compilation of (jit\(\w+\))", stderr)
        )
        result["cache_hits"] = len(re.findall(r"Persistent compilation cache hit", stderr))
    return result


def run_ase(tool: str, inputs: Path) -> dict:
    r = run_peer(tool, inputs)
    return {
        "wall_s": r["wall_s"],
        "rss_mib": r["rss_mib"],
        "relax_s": r["relax_s"],
        "n": r["n_structures"],
        "steps": sum(r["steps"]),
        "energy_sum": sum(r["energies"]),
        "replicated_cells": r.get("replicated_cells"),
    }


def summary(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    return {**runs[0], "wall_s": statistics.median(walls), "wall_s_all": walls}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3, help="alternated rounds")
    parser.add_argument("--limit", type=int, default=None, help="the first N structures only")
    parser.add_argument("--numpy", action="store_true", help="also ASE + numpy LennardJones")
    args = parser.parse_args()
    inputs = HERE / "out" / "batch1000"
    make_inputs(inputs)
    if args.limit:
        inputs = first(inputs, args.limit)
    print(f"molopt from {precompile_molopt()} (bytecode written)", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="b1000-cache-"))
    cold = run_molopt(inputs, cache, log_compiles=True)
    print(f"molopt cold: {cold['wall_s']:.2f} s", flush=True)
    sides = ["molopt", "ase-asap3"] + (["ase-numpy"] if args.numpy else [])
    runs: dict[str, list] = {side: [] for side in sides}
    for k in range(max(1, args.repeat)):
        for side in sides:
            r = run_molopt(inputs, cache) if side == "molopt" else run_ase(side, inputs)
            runs[side].append(r)
            print(f"round {k + 1} {side}: {r['wall_s']:.2f} s ({r['n']} structures)", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    med = {side: summary(rs) for side, rs in runs.items()}
    result = {
        "n_structures": cold["n"],
        "rounds": max(1, args.repeat),
        "molopt_cold": cold,
        **{side.replace("-", "_"): m for side, m in med.items()},
        "structures_per_s": {side: m["n"] / m["wall_s"] for side, m in med.items()},
        "speedup_vs": {side: med[side]["wall_s"] / med["molopt"]["wall_s"] for side in sides[1:]},
    }
    name = "batch1000.json" if not args.limit else f"batch1000-first{args.limit}.json"
    (HERE / "out" / name).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
