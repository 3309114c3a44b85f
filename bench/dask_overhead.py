"""The Dask path against one process: the 1,000-structure directory of bench/batch1000.py
through `molopt relax` alone, with `--cluster local:1` and with `--cluster local:2`, whole
processes, alternated, medians of --repeat rounds; the per-task scheduling cost from the
tasks' count. Needs `pip install '.[dask]'`.

    python bench/dask_overhead.py                      # 3 rounds, 1,000 structures
    python bench/dask_overhead.py --workers 1 2 4 8 --n 10000   # throughput/efficiency
    python bench/dask_overhead.py --limit 60 --repeat 1          # smoke test

Each run relaxes every structure (warm compilation cache, --traj-interval 0) and writes its
outputs; JSON to bench/out/dask_overhead.json. Parallel efficiency at W workers is
throughput(W) / (W x throughput(local:1)).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from batch1000 import first, make_inputs  # noqa: E402
from run import timed  # noqa: E402


def run(inputs: Path, cache: Path, workers: int | None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="dask-"))
    env = dict(os.environ, MOLOPT_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "molopt.cli", "relax", str(inputs), "-o", str(out), "--json"]
    cmd += ["-p", "argon", "--fmax", "1e-3", "--traj-interval", "0"]
    if workers:
        cmd += ["--cluster", f"local:{workers}"]
    try:
        wall, rss, stdout, stderr = timed(cmd, env, stderr=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    records = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    return {
        "wall_s": wall,
        "n": len(records),
        "converged": sum(r["status"] == "converged" for r in records),
        "steps": sum(r["steps"] or 0 for r in records),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dask-bench-"))
    inputs = root / "in"
    make_inputs(inputs, args.n)
    if args.limit:
        inputs = first(inputs, args.limit)
    cache = root / "cache"
    run(inputs, cache, None)  # fill the compilation cache
    configs = [None] + args.workers
    runs: dict = {str(c): [] for c in configs}
    for _ in range(args.repeat):  # alternated
        for c in configs:
            runs[str(c)].append(run(inputs, cache, c))
    table = {}
    for c in configs:
        walls = [r["wall_s"] for r in runs[str(c)]]
        table[str(c)] = {**runs[str(c)][0], "wall_s": statistics.median(walls), "all": walls}
    one = table["None"]["wall_s"]
    print(f"{'path':>12} {'wall s':>8} {'structures/s':>13} {'vs one process':>15}")
    for c in configs:
        t = table[str(c)]["wall_s"]
        name = "one process" if c is None else f"local:{c}"
        print(f"{name:>12} {t:8.2f} {table[str(c)]['n'] / t:13.1f} {t / one:15.2f}")
    if 1 in args.workers:
        base = table["1"]["n"] / table["1"]["wall_s"]
        for w in args.workers:
            rate = table[str(w)]["n"] / table[str(w)]["wall_s"]
            print(f"efficiency at {w} workers: {rate / (w * base):.2f}")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "dask_overhead.json").write_text(json.dumps(table, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
