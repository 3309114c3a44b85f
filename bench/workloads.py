"""Deterministic benchmark workloads (issue "Performance"), written as extxyz files.

W1: fcc argon 10x10x10 conventional cells (4,000 atoms), a = 5.26 A, every coordinate
    displaced uniformly by up to 0.2 A.        W2: the same at 20x20x20 (32,000 atoms).
W3: 256 non-periodic clusters of 13-64 atoms, random positions in a sphere, minimum
    separation 3.0 A.                          W4: ~100,000 atoms (fcc 29x29x30).
Usage: python bench/workloads.py OUT_DIR [W1 W2 W3 W4 W1M]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

A_LATTICE = 5.26


def crystal(repeats, seed):
    from ase.build import bulk

    atoms = bulk("Ar", "fcc", a=A_LATTICE, cubic=True).repeat(repeats)
    rng = np.random.default_rng(seed)
    atoms.positions += rng.uniform(-0.2, 0.2, atoms.positions.shape)
    return atoms


def clusters(n=256, seed=3, min_sep=3.0):
    from ase import Atoms

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        size = int(rng.integers(13, 65))
        # sphere volume ~ 2.5x the close-packed volume of `size` atoms at min_sep spacing
        radius = min_sep * (2.5 * size / 0.74) ** (1 / 3) / 2
        pts = []
        while len(pts) < size:
            p = rng.uniform(-radius, radius, 3)
            if np.linalg.norm(p) > radius:
                continue
            if pts and np.min(np.linalg.norm(np.asarray(pts) - p, axis=1)) < min_sep:
                continue
            pts.append(p)
        out.append(Atoms(f"Ar{size}", positions=np.asarray(pts)))
    return out


WORKLOADS = {
    "W1": lambda: crystal((10, 10, 10), 1),
    "W2": lambda: crystal((20, 20, 20), 2),
    "W3": clusters,
    "W4": lambda: crystal((29, 29, 30), 4),
    "W1M": lambda: crystal((63, 63, 63), 5),
}


def write(out_dir: Path, names) -> dict[str, Path]:
    import ase.io

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        if name == "W3":
            target = out_dir / "W3"
            target.mkdir(exist_ok=True)
            for k, atoms in enumerate(clusters()):
                path = target / f"cluster{k:03d}.xyz"
                if not path.exists():
                    ase.io.write(path, atoms)
            paths[name] = target
        else:
            # big crystals as ASE trajectories (binary: fast to write and read)
            suffix = "traj" if name in ("W4", "W1M") else "extxyz"
            path = out_dir / f"{name}.{suffix}"
            if not path.exists():
                ase.io.write(path, WORKLOADS[name]())
            paths[name] = path
    return paths


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out/workloads")
    print(write(out, sys.argv[2:] or ["W1", "W2", "W3", "W4"]))


def precompile_molopt() -> str:
    """Write the bytecode of the molopt package the timed commands import (the one found from
    the current directory, as ``python -m molopt.cli`` finds it), as ``pip install`` does for
    users. Run from a source tree under PYTHONDONTWRITEBYTECODE (set on this machine), every
    timed process would otherwise compile molopt's sources again: 0.07 s of W1. Returns the
    package directory."""
    import compileall
    import subprocess

    where = subprocess.run(
        [sys.executable, "-c", "import molopt, os; print(os.path.dirname(molopt.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    compileall.compile_dir(where, quiet=1)
    return where


def molopt_command(workload: Path, out: Path, optimizer: str = "fire") -> list[str]:
    """The `molopt relax` command every benchmark times: argon, FIRE to fmax 1e-3 eV/A, JSON
    records, no progress display, final frame only in the trajectory."""
    return [
        sys.executable,
        "-m",
        "molopt.cli",
        "relax",
        str(workload),
        "-p",
        "argon",
        "--fmax",
        "1e-3",
        "--optimizer",
        optimizer,
        "-o",
        str(out),
        "--json",
        "-q",
        "--traj-interval",
        "0",
    ]
