"""Where a `molopt relax` process spends its time, phase by phase (whole process, one run).

    python bench/phases.py bench/out/workloads/W2.extxyz -p argon --fmax 1e-3 \
        --traj-interval 0 -q --optimizer fire2 --dmax 0.1

Arguments after the script are `molopt relax`'s (an output directory in a fresh temporary
folder is added unless -o is given). The command runs in this process with a timer around
each phase; compiled calls are waited for inside their phase, so the figures add up to the
wall time instead of hiding device work in whichever call next waits for it. JAX's own
monitoring events give tracing, lowering and compiling (or loading from the persistent cache).
Prints one JSON line (seconds) and a table:

* imports: Python start to the command's first line (molopt, JAX, ASE, h5py, ...; with the
  engine's modules, which the command would import on its way);
* read: reading and checking the inputs;
* neighbour lists: host neighbour lists, first builds and rebuilds;
* trace / lower / compile-or-load: JAX turning the programs into executables;
* relax: the compiled optimizer chunks (less the above when a call compiled);
* final stress: the extra evaluation of finished periodic structures;
* writing: retiring finished structures (reporting, handing outputs to the writer thread)
  and waiting for the writer at the end;
* exit: the command's end to the process's (measured by the parent).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import collections, json, sys, time
start = float(sys.argv[1])
argv = sys.argv[2:]
phases = collections.defaultdict(float)
t_import = time.time()
from molopt._jax import jax
import jax.monitoring
import molopt.engine.scheduler as scheduler
import molopt.run as run
from molopt.io import outputs

EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile or load",
}
def listen(event, duration, **kwargs):
    if event in EVENTS:
        phases[EVENTS[event]] += duration
jax.monitoring.register_event_duration_secs_listener(listen)

counts = collections.Counter()
# (seconds, compile seconds) of timed calls inside the call being timed: each phase is
# counted exclusively, and compiling under the call that compiled
inner = [(0.0, 0.0)]

def compiled_so_far():
    return sum(phases[k] for k in EVENTS.values())

def timed(owner, name, phase, block=False):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        compiled = compiled_so_far()
        outer, inner[0] = inner[0], (0.0, 0.0)
        t = time.perf_counter()
        try:
            out = original(*args, **kwargs)
            if block:
                jax.block_until_ready(out)
        finally:
            spent = time.perf_counter() - t
            nested, nested_compile = inner[0]
            own_compile = compiled_so_far() - compiled - nested_compile
            phases[phase] += spent - nested - own_compile
            counts[phase] += 1
            inner[0] = (outer[0] + spent, outer[1] + nested_compile + own_compile)
        return out
    setattr(owner, name, wrapper)

timed(run._Run, "read", "read")
timed(scheduler, "neighbor_lists", "neighbour lists")
timed(scheduler, "advance", "relax", block=True)
timed(scheduler, "initial_state", "relax", block=True)
timed(scheduler, "evaluate_once", "final stress", block=True)
timed(outputs.OutputSink, "flush", "writing")
timed(scheduler.Engine, "_retire", "writing")
from molopt import startup
from molopt.cli import app
imported = time.time()
phases["imports"] = imported - start
startup.standalone()  # as the console entry point (molopt.cli.main) does
code = 0
try:
    app(argv, prog_name="molopt")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
end = time.time()
phases["other (command)"] = (end - imported) - sum(
    v for k, v in phases.items() if k != "imports"
)
print("PHASES " + json.dumps({"end": end, "phases": phases, "calls": counts}), flush=True)
startup.leave(code)  # and ends the process as it does
"""


def main() -> None:
    argv = ["relax", *sys.argv[1:]]
    if "-o" not in argv and "--out-dir" not in argv:
        argv += ["-o", tempfile.mkdtemp(prefix="molopt-phases-")]
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, repr(start), *argv], capture_output=True, text=True
    )
    done = time.time()
    line = [x for x in proc.stdout.splitlines() if x.startswith("PHASES ")]
    if proc.returncode or not line:
        sys.exit(f"molopt failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads(line[-1][len("PHASES ") :])
    phases = dict(report["phases"])
    phases["exit"] = done - report["end"]
    phases = {k: round(v, 3) for k, v in phases.items()}
    wall = round(done - start, 3)
    calls = report["calls"]
    print(json.dumps({"command": argv, "wall_s": wall, "phases_s": phases, "calls": calls}))
    for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        times = f"  ({calls[name]} calls)" if name in calls else ""
        print(f"{name:>18}  {seconds:7.3f} s  {100 * seconds / wall:5.1f}%{times}")
    print(f"{'wall':>18}  {wall:7.3f} s")


if __name__ == "__main__":
    main()
