"""SevenNet-0: molopt's JAX port against sevenn's own calculator (PyTorch), one
energy + forces + stress call on rattled MgO cells of 64, 512 and 4,096 atoms, same machine,
same run.

    python bench/sevennet_speed.py --sevenn-python /path/to/venv-with-sevenn/bin/python

sevenn is not a molopt dependency: give the interpreter of a venv that has it (`pip install
torch==2.13.0 sevenn` on this project's machines: a CPU build of PyTorch). Each (tool,
size) is a process of its own: one untimed call (molopt: compiling), then --samples timed
calls, their median; the processes alternate (molopt, sevenn, molopt, ...) for --repeat
rounds and the table shows the median of the rounds' medians, with each process's peak RSS.
molopt runs float32 (as sevenn's calculator does) and float64. A call is what a relaxation
step costs: for molopt the compiled evaluation on a packed batch with its neighbour list
(built once, outside the timing), for sevenn ``atoms.get_forces()`` after a move (it builds
its graph in each call: that is how its users run it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {64: 2, 512: 4, 4096: 8}  # atoms -> repeats of the 8-atom rocksalt cell

STRUCTURE = """
import numpy as np
from ase.build import bulk
atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat({reps})
atoms.rattle(0.05, seed=1)
"""

#: one untimed call (molopt: compiling), then the timed ones; each tool's code defines call(k)
TIMING = """
t = time.perf_counter(); call(0); first = time.perf_counter() - t
times = []
for k in range(1, {samples} + 1):
    t = time.perf_counter(); call(k); times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"call_s": statistics.median(times), "first_s": first, "rss_mib": peak}}))
"""

MOLOPT = (
    STRUCTURE
    + """
import json, resource, statistics, time
from molopt._jax import jax
import jax.numpy as jnp
from molopt.engine.kernel import cast_potential, evaluate_once
from molopt.engine.packing import neighbor_lists, pack_structures
from molopt.io.read import from_atoms
from molopt.potentials import registry
dtype = np.float32 if "{precision}" == "float32" else np.float64
potential = cast_potential(registry.load("sevennet-0").potential, dtype)
s = from_atoms(atoms)
batch, positions, cells, layout = pack_structures([s], potential, dtype)
nbrs = neighbor_lists(positions, cells, batch.pbc, layout, potential, 1e-9, dtype).to_device()
base = jnp.asarray(positions)
c = jnp.asarray(cells)
def call(k):
    p = base + (1e-4 if k % 2 else 0.0)  # a new position array each call
    jax.block_until_ready(evaluate_once(p, c, batch, nbrs, potential, True))
"""
    + TIMING
)

SEVENN = (
    STRUCTURE
    + """
import json, resource, statistics, time
from sevenn.calculator import SevenNetCalculator
atoms.calc = SevenNetCalculator("7net-0", device="cpu")
base = atoms.positions.copy()
def call(k):
    atoms.positions = base + (1e-4 if k % 2 else 0.0)
    atoms.get_forces(); atoms.get_stress()
"""
    + TIMING
)


def run(python: str, code: str) -> dict:
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-1500:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sevenn-python", required=True)
    parser.add_argument("--sizes", default="64,512,4096")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "out" / "sevennet_speed.json"))
    parser.add_argument(
        "--sevenn-max-atoms",
        type=int,
        default=512,
        help="larger cells run molopt only (sevenn's calculator took 4.1 GB at 512 atoms on "
        "this project's CPU machines and grows with the cell: 4,096 would pass their 24 GB)",
    )
    args = parser.parse_args()
    tools = {
        "molopt float32": lambda n, s: MOLOPT.format(reps=SIZES[n], samples=s, precision="float32"),
        "molopt float64": lambda n, s: MOLOPT.format(reps=SIZES[n], samples=s, precision="float64"),
        "sevenn (float32)": lambda n, s: SEVENN.format(reps=SIZES[n], samples=s),
    }
    pythons = {name: sys.executable for name in tools}
    pythons["sevenn (float32)"] = args.sevenn_python
    versions = run(
        args.sevenn_python,
        "import json, sevenn, torch; print(json.dumps({'sevenn': sevenn.__version__, "
        "'torch': torch.__version__}))",
    )
    versions.update(
        run(sys.executable, "import json, jax; print(json.dumps({'jax': jax.__version__}))")
    )
    results: dict = {}
    for n in (int(x) for x in args.sizes.split(",")):
        samples = args.samples if n < 4096 else max(2, args.samples // 2)
        chosen = {
            name: code
            for name, code in tools.items()
            if not (name.startswith("sevenn") and n > args.sevenn_max_atoms)
        }
        runs: dict = {name: [] for name in chosen}
        for k in range(args.repeat):
            for name, code in chosen.items():
                r = run(pythons[name], code(n, samples))
                runs[name].append(r)
                print(f"{n} atoms, round {k + 1}: {name} {1000 * r['call_s']:.1f} ms", flush=True)
        results[n] = {
            name: {
                "call_s": statistics.median(r["call_s"] for r in rs),
                "rounds_s": [round(r["call_s"], 4) for r in rs],
                "first_s": statistics.median(r["first_s"] for r in rs),
                "rss_mib": statistics.median(r["rss_mib"] for r in rs),
            }
            for name, rs in runs.items()
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"versions": versions, "results": results}, indent=1))
    print("versions:", versions)
    print("| atoms | tool | call (ms), median | rounds (ms) | first call (s) | peak RSS (MiB) |")
    print("|---|---|---:|---|---:|---:|")
    for n, by_tool in results.items():
        for name, r in by_tool.items():
            rounds = ", ".join(f"{1000 * x:.1f}" for x in r["rounds_s"])
            print(
                f"| {n} | {name} | {1000 * r['call_s']:.1f} | {rounds} | {r['first_s']:.1f} | "
                f"{r['rss_mib']:.0f} |"
            )


if __name__ == "__main__":
    main()
