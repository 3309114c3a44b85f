"""The Dask path against one process: the 1,000-structure directory of bench/batch1000.py
through `molopt relax` alone, with `--cluster local:1` and with `--cluster local:2`, whole
processes, alternated, medians of --repeat rounds. Needs `pip install '.[dask]'`.

    python bench/dask_overhead.py                      # 3 rounds, 1,000 structures
    python bench/dask_overhead.py --workers 1 2 4 8 --n 10000   # throughput/efficiency
    python bench/dask_overhead.py --limit 60 --repeat 1          # smoke test

Each path runs once untimed first: a path's tasks batch differently from one process, so
their program shapes differ, and each path's first run fills the compilation cache with its
own (what a long campaign pays once per shape). The timed runs then relax every structure
(--traj-interval 0) and write their outputs. Besides the whole-run walls it measures, in the
same run: Dask's own cost per task (1,000 no-op tasks through a LocalCluster of one worker),
the start of a LocalCluster with molopt imported on its workers, and what a long-lived
worker pays per task once its programs are loaded (one process relaxing 200 structures as
tasks of 200, 40 and 20). The per-task overhead of a whole run on Dask is (wall - one process
- cluster start) / tasks; with a few tasks per worker it is mostly each fresh worker loading
its program shapes from the cache, which a long campaign pays once per worker. Parallel
efficiency at W workers is throughput(W) / (W x throughput(local:1)). JSON to
bench/out/dask_overhead.json.
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
import time
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
    tasks = re.findall(r"Dask: (\d+) task", stderr)
    return {
        "wall_s": wall,
        "n": len(records),
        "converged": sum(r["status"] == "converged" for r in records),
        "steps": sum(r["steps"] or 0 for r in records),
        "tasks": int(tasks[-1]) if tasks else 0,
    }


def _noop(x):
    return x


def _import_molopt():
    import molopt.run  # noqa: F401
    from molopt._jax import jax

    return len(jax.devices())


def dask_costs(workers: list[int], n_tasks: int = 1000) -> dict:
    """Dask's own round trip per no-op task (ms, one worker), and the seconds from nothing to
    a LocalCluster of W workers with molopt and JAX imported on each."""
    from distributed import Client, LocalCluster

    costs: dict = {"start_s": {}}
    for w in sorted(set(workers) | {1}):
        t = time.perf_counter()
        with (
            LocalCluster(
                n_workers=w, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(w)
            client.run(_import_molopt)
            costs["start_s"][w] = time.perf_counter() - t
            if w == 1:
                client.gather(client.map(_noop, range(50), pure=False))  # warm
                t = time.perf_counter()
                client.gather(client.map(_noop, range(n_tasks), pure=False))
                costs["noop_ms_per_task"] = 1000 * (time.perf_counter() - t) / n_tasks
    return costs


def steady_per_task(inputs: Path, cache: Path, n: int = 200, sizes=(200, 40, 20), rounds=3):
    """What a long-lived worker pays per task once every program shape is loaded: one process
    relaxes the first ``n`` structures as tasks of each size (``molopt.run.relax_members``,
    the Dask task), warm, alternated, medians; ms per extra task against one task of ``n``."""
    os.environ["MOLOPT_CACHE_DIR"] = str(cache)
    from molopt import config
    from molopt.run import relax_members

    files = sorted(inputs.glob("*.extxyz"))[:n]
    members = [(str(p), None, p.stem) for p in files]

    def go(size):
        out = Path(tempfile.mkdtemp(prefix="steady-"))
        settings = config.validate(
            {"potential": "argon", "fmax": 1e-3, "trajectory_interval": 0, "out_dir": str(out)},
            "bench",
        )
        t = time.perf_counter()
        for i in range(0, len(members), size):
            relax_members(members[i : i + size], settings)
        wall = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
        return wall

    for size in sizes:  # load every shape
        go(size)
    walls = {size: [] for size in sizes}
    for _ in range(rounds):
        for size in sizes:
            walls[size].append(go(size))
    medians = {size: statistics.median(w) for size, w in walls.items()}
    whole = medians[sizes[0]]
    return {
        str(size): {
            "tasks": -(-len(members) // size),
            "wall_s": medians[size],
            "ms_per_extra_task": 1000 * (medians[size] - whole) / (-(-len(members) // size) - 1)
            if size != sizes[0]
            else 0.0,
        }
        for size in sizes
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import dask
    import distributed
    import jax

    print(f"distributed {distributed.__version__}, dask {dask.__version__}, jax {jax.__version__}")
    root = Path(tempfile.mkdtemp(prefix="dask-bench-"))
    inputs = root / "in"
    make_inputs(inputs, args.n)
    if args.limit:
        inputs = first(inputs, args.limit)
    cache = root / "cache"
    configs = [None] + args.workers
    cold = {str(c): run(inputs, cache, c)["wall_s"] for c in configs}  # fills each path's cache
    runs: dict = {str(c): [] for c in configs}
    for _ in range(args.repeat):  # alternated
        for c in configs:
            runs[str(c)].append(run(inputs, cache, c))
    costs = dask_costs(args.workers)
    steady = steady_per_task(inputs, cache)
    table = {}
    for c in configs:
        walls = [r["wall_s"] for r in runs[str(c)]]
        table[str(c)] = {
            **runs[str(c)][0],
            "wall_s": statistics.median(walls),
            "all": walls,
            "first_run_s": cold[str(c)],
        }
    one = table["None"]["wall_s"]
    print(f"Dask's own round trip per no-op task: {costs['noop_ms_per_task']:.2f} ms")
    head = (
        f"{'path':>12} {'wall s':>8} {'first run s':>12} {'structures/s':>13} "
        f"{'vs one process':>15} {'tasks':>6} {'cluster start s':>16} {'ms/task':>8}"
    )
    print(head)
    for c in configs:
        row = table[str(c)]
        t = row["wall_s"]
        name = "one process" if c is None else f"local:{c}"
        start = costs["start_s"].get(c, 0.0) if c else 0.0
        per_task = 1000 * (t - one - start) / row["tasks"] if c and row["tasks"] else float("nan")
        row["cluster_start_s"], row["overhead_ms_per_task"] = start, per_task
        print(
            f"{name:>12} {t:8.2f} {row['first_run_s']:12.2f} {row['n'] / t:13.1f} "
            f"{t / one:15.2f} {row['tasks']:6d} {start:16.2f} {per_task:8.1f}"
        )
    print("a long-lived worker, every shape loaded (one process, relax_members as tasks):")
    for size, row in steady.items():
        print(
            f"  {row['tasks']:3d} task(s) of {size:>3} structures: {row['wall_s']:.2f} s, "
            f"{row['ms_per_extra_task']:.0f} ms per extra task"
        )
    if 1 in args.workers:
        base = table["1"]["n"] / table["1"]["wall_s"]
        for w in args.workers:
            rate = table[str(w)]["n"] / table[str(w)]["wall_s"]
            print(f"efficiency at {w} workers: {rate / (w * base):.2f}")
    (HERE / "out").mkdir(exist_ok=True)
    result = {
        "table": table,
        "dask": costs,
        "steady": steady,
        "versions": {"distributed": distributed.__version__, "jax": jax.__version__},
    }
    (HERE / "out" / "dask_overhead.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
