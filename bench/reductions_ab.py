"""A/B of molopt's per-system sums and maxima on an accelerator, in one process.

    python bench/reductions_ab.py                   # W2 W4, 3 alternated rounds
    python bench/reductions_ab.py W3 --repeat 5
    python bench/reductions_ab.py W1 --repeat 1 --steps 20      # smoke test (any backend)

molopt.batch.system_sum/system_max are masked (one-hot) reductions on an accelerator and
segment reductions on the CPU (batch._dense_reductions decides, from the backend and the
batch's size). This script swaps that decision for every module (they all call through
molopt.batch) and relaxes the same workload both ways: each round runs "segment" then
"dense"; each mode clears JAX's in-memory caches (programs traced with the other reductions
must not be reused), runs one untimed relaxation (tracing and compiling) and then one timed
relaxation (warm, in-process: molopt.engine.relax, argon, FIRE to fmax 1e-3 eV/A, float64,
no files written). Prints, per mode, the median relaxation time, steps and ms per FIRE step,
and writes bench/out/reductions_ab.json ($OUT/reductions_ab.json when OUT is set).

The README's accelerator figures for this change (H100, 2026-11-27: W4 2.69 -> 1.66 s, W2
0.63 -> 0.54 s) were measured with an uncommitted script of the same method before this one
existed; figures from this script replace them once run on a device. On a CPU the
comparison runs (as a check that the script works) but says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import write  # noqa: E402


def structures_of(path: Path):
    from molopt.io.read import read_frames

    files = sorted(path.glob("*.xyz")) if path.is_dir() else [path]
    return [(k, f.structure) for k, p in enumerate(files) for f in read_frames(p)]


def relax_once(items, potential, settings) -> dict:
    import jax

    from molopt import engine

    t = time.perf_counter()
    results = engine.run(items, potential, settings)
    jax.effects_barrier()
    wall = time.perf_counter() - t
    return {
        "relax_s": wall,
        "steps": sum(r.steps or 0 for r in results),
        "max_steps": max(r.steps or 0 for r in results),
        "energy_sum": sum(r.energy for r in results),
        "statuses": sorted({r.status for r in results}),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workloads", nargs="*", default=["W2", "W4"])
    parser.add_argument("--repeat", type=int, default=3, help="alternated rounds")
    parser.add_argument("--steps", type=int, default=10_000, help="max FIRE steps (smoke)")
    args = parser.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    from molopt import batch
    from molopt.engine import EngineSettings
    from molopt.potentials.registry import load

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    print(f"JAX {jax.__version__}, backend {backend}, device {device}", flush=True)
    potential = load("argon").potential
    settings = EngineSettings(fmax=1e-3, steps=args.steps, trajectory_interval=0)
    paths = write(HERE / "out" / "workloads", args.workloads)
    original = batch._dense_reductions
    results: dict = {"backend": backend, "device": device, "workloads": {}}
    try:
        for name in args.workloads:
            items = structures_of(paths[name])
            runs: dict[str, list] = {"segment": [], "dense": []}
            for k in range(max(1, args.repeat)):
                for mode in runs:
                    dense = mode == "dense"
                    batch._dense_reductions = lambda rows, systems, dense=dense: dense
                    jax.clear_caches()
                    relax_once(items, potential, settings)  # trace and compile
                    r = relax_once(items, potential, settings)
                    runs[mode].append(r)
                    print(f"{name} round {k + 1} {mode}: {r['relax_s']:.3f} s, "
                          f"{r['steps']} steps", flush=True)  # fmt: skip
            summary = {}
            for mode, rs in runs.items():
                wall = statistics.median(r["relax_s"] for r in rs)
                summary[mode] = {
                    "relax_s": wall,
                    "relax_s_all": [r["relax_s"] for r in rs],
                    "steps": rs[0]["steps"],
                    "ms_per_step": 1000 * wall / max(1, rs[0]["max_steps"]),
                    "energy_sum": rs[0]["energy_sum"],
                    "statuses": rs[0]["statuses"],
                }
            results["workloads"][name] = summary
    finally:
        batch._dense_reductions = original
    out_dir = Path(os.environ.get("OUT", HERE / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "reductions_ab.json").write_text(json.dumps(results, indent=1))
    print(f"\n{device} ({backend}), median of {max(1, args.repeat)} alternated rounds, warm:")
    print("| workload | segment (s) | dense (s) | ms/step segment | ms/step dense | steps |")
    print("|---|---|---|---|---|---|")
    for name, s in results["workloads"].items():
        seg, den = s["segment"], s["dense"]
        print(
            f"| {name} | {seg['relax_s']:.3f} | {den['relax_s']:.3f} | "
            f"{seg['ms_per_step']:.2f} | {den['ms_per_step']:.2f} | "
            f"{seg['steps']} / {den['steps']} |"
        )


if __name__ == "__main__":
    main()
