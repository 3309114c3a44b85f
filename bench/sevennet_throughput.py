"""SevenNet-0: relaxing many small crystals (cell relaxation) with `molopt relax` against a
Python loop of ASE FIRE + FrechetCellFilter + sevenn's own calculator, and TorchSim where it
installs, same machine, same run.

    python bench/sevennet_throughput.py --sevenn-python /path/to/venv-with-sevenn/bin/python \
        [--count 32] [--max-atoms 8] [--repeat 1] [--tools float64,float32,ase,torch-sim]

The crystals are the fully periodic structures of ``data/sevennet/reference.extxyz`` with at
most --max-atoms atoms (rattled and strained: rocksalt, perovskite, fcc/bcc/hcp metals, ...),
--count of them spread over the sizes, written one file each; a --count beyond the 140 there
adds doubled cells of them (spread over the sizes, rattled by 0.05 A and strained by up to
1%, seeded): ``--count 256 --max-atoms 64`` gives 256 crystals of 2-64 atoms.

* molopt: one fresh `molopt relax DIR --potential sevennet-0 --relax-cell` process (default
  settings: float64; and float32), wall time including imports and compiling, as a user
  runs it.
* ASE: one fresh process of the sevenn venv that loads the calculator once and relaxes the
  files one after another (``FIRE(FrechetCellFilter(atoms))``, ASE's defaults, float32 as
  sevenn runs), wall time of the whole process.
* TorchSim, where ``torch_sim`` imports in that venv (``pip install torch-sim-atomistic``;
  TorchSim 0.3.0 needs sevenn <= 0.12, so --torch-sim-python may name another venv): one
  fresh process relaxing all the crystals as one batched state with its
  ``frechet_cell_fire`` (ASE flavour), float32.

All to fmax 0.05 eV/A (molopt's default; cell forces too) with at most 1,000 steps. The
processes alternate for --repeat rounds; medians. --tools picks which run (the ASE loop
always). Prints structures per second, the steps and the ratio, and writes
``bench/out/sevennet_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FMAX, STEPS = 0.05, 1000

ASE_LOOP = f"""
import json, sys, time, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import ase.io
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from sevenn.calculator import SevenNetCalculator
calc = SevenNetCalculator("7net-0", device="cpu")
steps = 0
converged = 0
for path in sorted(Path(sys.argv[1]).glob("*.extxyz")):
    atoms = ase.io.read(path)
    atoms.calc = calc
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    converged += bool(opt.run(fmax={FMAX}, steps={STEPS}))
    steps += opt.nsteps
print(json.dumps({{"steps": steps, "converged": converged}}))
"""

#: TorchSim (where it installs: `pip install torch-sim-atomistic` in the sevenn venv): all the
#: crystals as one batched state, frechet_cell_fire (its ASE flavour), converged on forces
#: and cell forces below fmax; systems leave the batch as they converge
TORCH_SIM = f"""
import json, sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import ase.io
import torch
import torch_sim as ts
from sevenn.util import load_checkpoint, pretrained_name_to_path
from torch_sim.models.sevennet import SevenNetModel
checkpoint = load_checkpoint(pretrained_name_to_path("7net-0"))
model = SevenNetModel(model=checkpoint.build_model(), modal=None, device="cpu")
atoms = [ase.io.read(p) for p in sorted(Path(sys.argv[1]).glob("*.extxyz"))]
state = ts.optimize(
    system=atoms, model=model, optimizer=ts.frechet_cell_fire,
    convergence_fn=ts.generate_force_convergence_fn({FMAX}), max_steps={STEPS},
    autobatcher=False,
)
print(json.dumps({{"steps": -1, "converged": -1}}))
"""


def crystals(count: int, max_atoms: int, directory: Path) -> list[int]:
    import ase.io

    frames = [
        a
        for a in ase.io.read(ROOT / "data" / "sevennet" / "reference.extxyz", ":")
        if a.pbc.all() and len(a) <= max_atoms
    ]
    frames.sort(key=lambda a: (len(a), a.info["label"]))
    if count > len(frames):  # all of them, then doubled cells of the smaller ones
        picked = list(frames)
        rng = np.random.default_rng(7)
        small = [a for a in frames if 2 * len(a) <= max_atoms]
        if not small:
            sys.exit(f"only {len(frames)} periodic structures of <= {max_atoms} atoms")
        extra = count - len(frames)
        for k in range(extra):
            base = small[(k * len(small)) // extra]  # spread over the sizes
            atoms = base.repeat((2, 1, 1) if k % 3 == 0 else (1, 2, 1))
            atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
            strain = np.eye(3) + rng.uniform(-0.01, 0.01, (3, 3))
            atoms.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
            atoms.info["label"] = base.info["label"] + "-x2"
            picked.append(atoms)
    else:
        step = (len(frames) - 1) / max(count - 1, 1)
        picked = [frames[round(k * step)] for k in range(count)]
    for k, atoms in enumerate(picked):
        clean = atoms.copy()
        clean.calc = None
        clean.info = {"label": atoms.info["label"]}
        for key in [k for k in clean.arrays if k not in ("numbers", "positions")]:
            del clean.arrays[key]
        ase.io.write(directory / f"{k:03d}-{atoms.info['label']}.extxyz", clean)
    return [len(a) for a in picked]


def run_molopt(directory: Path, out: Path, precision: str) -> dict:
    command = [
        sys.executable, "-m", "molopt.cli", "relax", str(directory), "--potential",
        "sevennet-0", "--relax-cell", "--fmax", str(FMAX), "--steps", str(STEPS),
        "--precision", precision, "-o", str(out), "--overwrite", "--json", "-q",
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        sys.exit(proc.stderr)
    records = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return {
        "wall_s": wall,
        "steps": sum(r["steps"] for r in records),
        "converged": sum(r["status"] == "converged" for r in records),
    }


def run_ase(python: str, directory: Path) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([python, "-c", ASE_LOOP, str(directory)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def run_torch_sim(python: str, directory: Path) -> dict | None:
    """TorchSim's batched relaxation, or None where torch_sim is not importable."""
    probe = subprocess.run([python, "-c", "import torch_sim"], capture_output=True)
    if probe.returncode != 0:
        return None
    started = time.perf_counter()
    proc = subprocess.run([python, "-c", TORCH_SIM, str(directory)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"TorchSim failed: {proc.stderr[-2000:]}")
        return None
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sevenn-python", required=True)
    parser.add_argument(
        "--torch-sim-python",
        help="interpreter of a venv with torch_sim and a sevenn it works with (default: "
        "--sevenn-python; TorchSim 0.3.0 needs sevenn <= 0.12)",
    )
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--max-atoms", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--tools",
        default="float64,float32,ase,torch-sim",
        help="which to run, comma-separated: float64 and float32 (molopt), ase, torch-sim "
        "(the 256-crystal size takes most of an hour per tool on two cores)",
    )
    args = parser.parse_args()
    tools = set(args.tools.split(","))
    if "ase" not in tools:
        sys.exit("--tools needs ase: the ratios are to the ASE loop")

    def versions_in(python, code="import sevenn, torch; print(sevenn.__version__, "
                    "torch.__version__)"):  # fmt: skip
        return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.split()

    versions = versions_in(args.sevenn_python)
    torch_sim_versions = versions_in(
        args.torch_sim_python or args.sevenn_python,
        "import importlib.metadata as m; print(m.version('torch-sim-atomistic'), "
        "m.version('sevenn'))",
    )
    import jax

    import molopt

    rows: dict[str, list] = {
        **{f"molopt {p}": [] for p in ("float64", "float32") if p in tools},
        "ASE + sevenn": [],
    }
    # TorchSim joins when it imports in the sevenn venv (steps not counted there: -1)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "in"
        directory.mkdir()
        sizes = crystals(args.count, args.max_atoms, directory)
        print(f"{len(sizes)} crystals, {sum(sizes)} atoms ({min(sizes)}-{max(sizes)} each)")
        for _ in range(args.repeat):
            for precision in ("float64", "float32"):
                if precision not in tools:
                    continue
                result = run_molopt(directory, Path(tmp) / "out", precision)
                rows[f"molopt {precision}"].append(result)
                print(f"molopt {precision}: {result}", flush=True)
            result = run_ase(args.sevenn_python, directory)
            rows["ASE + sevenn"].append(result)
            print(f"ASE + sevenn: {result}", flush=True)
            if "torch-sim" not in tools:
                continue
            result = run_torch_sim(args.torch_sim_python or args.sevenn_python, directory)
            if result is not None:
                rows.setdefault("TorchSim", []).append(result)
                print(f"TorchSim: {result}", flush=True)
    ase_s = statistics.median(r["wall_s"] for r in rows["ASE + sevenn"])
    table = {}
    print(f"\n{'tool':16s} {'wall s':>8s} {'structures/s':>13s} {'steps':>7s} {'conv':>5s} "
          f"{'x ASE loop':>10s}")  # fmt: skip
    for name, results in rows.items():
        wall = statistics.median(r["wall_s"] for r in results)
        row = {
            "wall_s": round(wall, 1),
            "structures_per_s": round(len(sizes) / wall, 4),
            "steps": results[-1]["steps"],
            "converged": results[-1]["converged"],
            "speedup_vs_ase_loop": round(ase_s / wall, 2),
        }
        table[name] = row
        print(
            f"{name:16s} {row['wall_s']:8.1f} {row['structures_per_s']:13.4f} "
            f"{row['steps']:7d} {row['converged']:5d} {row['speedup_vs_ase_loop']:10.2f}"
        )
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    result = {
        "command": " ".join(["python", "bench/sevennet_throughput.py", *sys.argv[1:]]),
        "crystals": len(sizes),
        "atoms": sum(sizes),
        "rows": table,
        "versions": {
            "molopt": molopt.__version__ if hasattr(molopt, "__version__") else "",
            "jax": jax.__version__,
            "sevenn": versions[0] if versions else "",
            "torch": versions[1] if len(versions) > 1 else "",
            "torch_sim_and_its_sevenn": torch_sim_versions,
        },
    }
    (out / "sevennet_throughput.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
