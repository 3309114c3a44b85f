"""Labelled configurations for the `nn-emt-metals` potential, from ASE's EMT calculator.

Cu, Ag, Au, Ni, Pd, Pt and their binary alloys: bulk (strained, rattled), vacancies,
surfaces (111)/(100)/(110), clusters (icosahedra, cuboctahedra, random), and snapshots of
short Langevin MD at 300-1500 K. Energies (eV), forces (eV/A) and, for bulk, stress (eV/A^3).

    python data/neural/generate_emt.py train 0      # -> data/neural/emt-metals/train.extxyz.gz
    python data/neural/generate_emt.py test 12345   # independent seed; held-out sizes/faces

The test split uses an independent seed and structures never generated for training:
cluster sizes 43/79, (211)-like stepped surfaces, a 4x3x3 supercell and other compositions.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc100, fcc110, fcc111, fcc211
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.cluster import Icosahedron, Octahedron
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

METALS = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt"]
LATTICE = {"Cu": 3.61, "Ag": 4.09, "Au": 4.08, "Ni": 3.52, "Pd": 3.89, "Pt": 3.92}


def label(atoms, kind):
    atoms = atoms.copy()
    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info = {"config_type": kind}
    return atoms


def alloy(rng, repeat=(2, 2, 2), pair=None):
    a, b = pair or rng.choice(METALS, 2, replace=False)
    x = rng.choice([0.0, 0.25, 0.5, 0.75]) if pair is None else rng.uniform(0.1, 0.9)
    lattice = (1 - x) * LATTICE[a] + x * LATTICE[b]
    atoms = bulk(a, "fcc", a=lattice, cubic=True).repeat(repeat)
    symbols = np.where(rng.random(len(atoms)) < x, b, a)
    atoms.set_chemical_symbols(symbols)
    return atoms


def strained(atoms, rng, amount):
    strain = rng.uniform(-amount, amount, (3, 3))
    strain = 0.5 * (strain + strain.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    return atoms


def md_snapshots(atoms, rng, temperature, n_snapshots, interval=10):
    atoms = atoms.copy()
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    out = []
    for _ in range(n_snapshots):
        dyn.run(interval)
        snap = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        out.append(snap)
    return out


def surface(rng, test: bool):
    metal = rng.choice(METALS)
    a = LATTICE[metal]
    if test:
        slab = fcc211(metal, size=(3, 2, 3), a=a, vacuum=6.0)
    else:
        maker = [fcc111, fcc100, fcc110][rng.integers(3)]
        slab = maker(metal, size=(2, 2, 4), a=a, vacuum=6.0)
    if rng.random() < 0.5:  # surface alloy
        other = rng.choice([m for m in METALS if m != metal])
        top = slab.positions[:, 2] > slab.positions[:, 2].max() - 1.0
        swap = top & (rng.random(len(slab)) < 0.5)
        symbols = np.array(slab.get_chemical_symbols())
        symbols[swap] = other
        slab.set_chemical_symbols(symbols)
    return slab


def cluster(rng, test: bool):
    metal = rng.choice(METALS)
    if test:
        shape = rng.choice(["oct43", "ico79"]) if rng.random() < 0.5 else "random"
    else:
        shape = rng.choice(["ico13", "ico55", "oct19", "oct38", "random"])
    a = LATTICE[metal]
    if shape.startswith("ico"):
        atoms = Icosahedron(metal, {"ico13": 2, "ico55": 3, "ico79": 3}[shape], latticeconstant=a)
        if shape == "ico79":
            atoms = Octahedron(metal, 5, 1, latticeconstant=a)  # truncated octahedron, 79
    elif shape.startswith("oct"):
        length, cut = {"oct19": (3, 1), "oct38": (4, 1), "oct43": (5, 2)}[shape]
        atoms = Octahedron(metal, length, cut, latticeconstant=a)
    else:
        n = int(rng.integers(6, 30))
        d = a / np.sqrt(2)
        pts = [np.zeros(3)]
        while len(pts) < n:
            base = pts[rng.integers(len(pts))]
            direction = rng.normal(size=3)
            p = base + d * direction / np.linalg.norm(direction)
            if np.min(np.linalg.norm(np.asarray(pts) - p, axis=1)) > 0.85 * d:
                pts.append(p)
        atoms = Atoms(metal + str(n), positions=np.asarray(pts))
    if rng.random() < 0.4:
        other = rng.choice([m for m in METALS if m != metal])
        symbols = np.array(atoms.get_chemical_symbols())
        symbols[rng.random(len(atoms)) < 0.3] = other
        atoms.set_chemical_symbols(symbols)
    atoms.center(vacuum=6.0)
    atoms.pbc = False
    return atoms


def generate(split: str, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    test = split == "test"
    out = []

    def add(atoms, kind, rattle=0.0):
        atoms = atoms.copy()
        if rattle:
            atoms.positions += rng.normal(0, rattle, atoms.positions.shape)
        out.append(label(atoms, kind))

    n = lambda k: max(1, int(round(k * scale)))  # noqa: E731
    repeat = (3, 2, 2) if test else (2, 2, 2)
    # bulk: pure and alloys, strained and rattled
    for _ in range(n(300)):
        atoms = (
            alloy(rng, repeat)
            if rng.random() < 0.6
            else bulk(m := rng.choice(METALS), "fcc", a=LATTICE[m], cubic=True).repeat(repeat)
        )
        add(strained(atoms, rng, 0.06), "bulk", rattle=rng.uniform(0.02, 0.15))
    # vacancies
    for _ in range(n(120)):
        atoms = (
            alloy(rng, repeat)
            if rng.random() < 0.5
            else bulk(m := rng.choice(METALS), "fcc", a=LATTICE[m], cubic=True).repeat(repeat)
        )
        del atoms[rng.choice(len(atoms), size=int(rng.integers(1, 3)), replace=False)]
        add(strained(atoms, rng, 0.03), "vacancy", rattle=rng.uniform(0.02, 0.12))
    # surfaces
    for _ in range(n(250)):
        add(surface(rng, test), "surface", rattle=rng.uniform(0.02, 0.15))
    # clusters
    for _ in range(n(250)):
        add(cluster(rng, test), "cluster", rattle=rng.uniform(0.02, 0.15))
    # short MD (bulk, vacancy, surface, cluster) at several temperatures
    for _ in range(n(40)):
        kind = rng.choice(["bulk", "surface", "cluster"])
        if kind == "bulk":
            atoms = alloy(rng, repeat)
        elif kind == "surface":
            atoms = surface(rng, test)
        else:
            atoms = cluster(rng, test)
        temperature = float(rng.choice([300, 600, 1000, 1500]))
        for snap in md_snapshots(atoms, rng, temperature, 6):
            add(snap, f"md-{kind}-{int(temperature)}K")
    return out


def write(images, path: Path):
    import ase.io

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    ase.io.write(buffer, images, format="extxyz")
    tmp = path.with_name(f".{path.name}.tmp")
    with gzip.open(tmp, "wt") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, path)  # never a half-written data set


if __name__ == "__main__":
    split = sys.argv[1] if len(sys.argv) > 1 else "train"
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else (0 if split == "train" else 12345)
    scale = float(sys.argv[3]) if len(sys.argv) > 3 else (1.0 if split == "train" else 0.25)
    images = generate(split, seed, scale)
    target = Path(__file__).parent / "emt-metals" / f"{split}.extxyz.gz"
    write(images, target)
    print(f"{len(images)} configurations, {sum(len(a) for a in images)} atoms -> {target}")
