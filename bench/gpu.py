"""GPU benchmark: molopt on big crystals (W2 32k, W4 100k, W1M 1M atoms) and W3 (256
clusters) on the machine's accelerator, cold (empty compilation cache) and, for the
workloads in $WARM (default "W2 W4 W3"; W1M is left out to save device time), warm.

    bash bench/gpu.sh            # prints a table; JSON to bench/out/gpu.json (or $OUT)

Each workload runs once cold and once warm: no repeats, so the figures carry the device
machine's run-to-run noise. The table's relax column says which run it comes from: a
workload not in $WARM has only a cold run ("warm": null in the JSON; files written before
2026-12-06, such as bench/gpu-h100.json, hold a copy of the cold run under "warm").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import molopt_command, precompile_molopt, write  # noqa: E402


def relax(path: Path, cache: Path, optimizer: str = "fire") -> dict:
    out = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    env = dict(os.environ, MOLOPT_CACHE_DIR=str(cache))
    cmd = molopt_command(path, out, optimizer)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    records = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if not records:
        return {"error": proc.stderr[-1500:]}
    return {
        "wall_s": wall,
        "relax_s": max(r.get("relax_time_s") or 0 for r in records),
        "steps": sum(r["steps"] or 0 for r in records),
        "energy": records[0]["energy"] if len(records) == 1 else None,
        "n": len(records),
        "statuses": sorted({r["status"] for r in records}),
    }


WARM = set(os.environ.get("WARM", "W2 W4 W3").split())


def main():
    names = sys.argv[1:] or ["W2", "W4", "W1M", "W3"]
    out_dir = Path(os.environ.get("OUT", HERE / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    paths = write(HERE / "out" / "workloads", names)
    print(f"molopt from {precompile_molopt()} (bytecode written)", flush=True)
    print(f"workloads ready in {time.perf_counter() - t:.1f} s", flush=True)
    results = {}
    for name in names:
        cache = Path(tempfile.mkdtemp(prefix="molopt-cache-"))
        cold = relax(paths[name], cache)
        warm = relax(paths[name], cache) if name in WARM else None
        results[name] = {"cold": cold, "warm": warm}
        print(name, json.dumps(results[name]), flush=True)
        (out_dir / "gpu.json").write_text(json.dumps(results, indent=1))
    (out_dir / "gpu.json").write_text(json.dumps(results, indent=1))
    import jax

    print(f"\ndevice: {jax.devices()[0].device_kind}")
    print(table(results))


def table(results: dict) -> str:
    """The README's GPU table. "relax" comes from the warm run where there is one, else from
    the cold run, and says which."""
    lines = [
        "| workload | atoms | steps | relax (s) | relax from | whole process, warm (s) | "
        "whole process, cold (s) | atom-steps/s (relax) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    atoms = {"W2": 32000, "W4": 100920, "W1M": 1000188, "W3": 9660}
    for name, r in results.items():
        c, w = r["cold"], r.get("warm")
        if w is not None and w == c:  # older files: "warm" was a copy of the cold run
            w = None
        shown, label = (w, "warm run") if w is not None else (c, "cold run")
        if "error" in shown:
            lines.append(f"| {name} | | failed: {shown['error'][-200:]!r} | | | | | |")
            continue
        rate = atoms[name] * shown["steps"] / shown["relax_s"] if name != "W3" else float("nan")
        whole_warm = f"{w['wall_s']:.2f}" if w is not None else "not run"
        lines.append(
            f"| {name} | {atoms[name]} | {shown['steps']} | {shown['relax_s']:.2f} | {label} | "
            f"{whole_warm} | {c['wall_s']:.2f} | {rate:.3g} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
