"""Validate a shipped neural potential against its reference method by relaxing held-out
structures with both, from the same rattled starts.

    python data/neural/validate.py nn-emt-metals     # reference: ASE EMT + ASE BFGS
    python data/neural/validate.py nn-gfn2-chno      # reference: tblite GFN2-xTB + ASE BFGS

Writes potentials/<name>.validation.json: per structure the RMSD between the two minima (A),
E_ref(network minimum) - E_ref(reference minimum) (meV/atom) and both relaxation times, plus
medians. Starts are generated with an independent seed from structures never seen in
training and stored in data/neural/<set>/validation-starts.extxyz.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FMAX = 0.005  # eV/A for both relaxations
# validate this checkout's molopt and potentials/, not an older installed copy (run as a
# script, the directory on sys.path is data/neural/)
sys.path.insert(0, str(ROOT))


def reference_calculator(name: str):
    if name == "nn-emt-metals":
        from ase.calculators.emt import EMT

        return EMT()
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def emt_starts(seed=777):
    from ase.build import bulk, fcc100, fcc111, fcc211
    from ase.cluster import Icosahedron, Octahedron

    rng = np.random.default_rng(seed)
    metals = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt"]
    lattice = {"Cu": 3.61, "Ag": 4.09, "Au": 4.08, "Ni": 3.52, "Pd": 3.89, "Pt": 3.92}
    starts = []
    for k in range(24):
        m = metals[k % 6]
        other = metals[(k + 1 + k // 6) % 6]
        kind = ["cluster", "slab", "vacancy", "alloy-cluster"][k % 4]
        if kind == "cluster":
            atoms = (
                Icosahedron(m, 3, latticeconstant=lattice[m])
                if k % 8 == 0
                else Octahedron(m, 4, 1, latticeconstant=lattice[m])
            )
            atoms.center(vacuum=6.0)
            atoms.pbc = False
        elif kind == "alloy-cluster":
            atoms = Octahedron(m, 5, 2, latticeconstant=lattice[m])  # 43? truncated
            symbols = np.array(atoms.get_chemical_symbols())
            symbols[rng.random(len(atoms)) < 0.4] = other
            atoms.set_chemical_symbols(symbols)
            atoms.center(vacuum=6.0)
            atoms.pbc = False
        elif kind == "slab":
            maker = [fcc111, fcc100, fcc211][(k // 4) % 3]
            size = (3, 2, 3) if maker is fcc211 else (2, 2, 4)
            atoms = maker(m, size=size, a=lattice[m], vacuum=6.0)
        else:
            atoms = bulk(m, "fcc", a=lattice[m], cubic=True).repeat((2, 2, 2))
            del atoms[int(rng.integers(len(atoms)))]
        atoms.positions += rng.normal(0, 0.08, atoms.positions.shape)
        atoms.info = {"kind": kind}
        starts.append(atoms)
    return starts


def gfn2_starts(seed=777):
    sys.path.insert(0, str(Path(__file__).parent))
    from ase.build import molecule
    from generate_gfn2 import TEST_G2, TEST_SMILES, from_smiles, relaxed

    rng = np.random.default_rng(seed)
    starts = []
    molecules = [(n, molecule(n)) for n in TEST_G2]
    molecules += [
        (s, a) for k, s in enumerate(TEST_SMILES) if (a := from_smiles(s, seed + k)) is not None
    ]
    for name, atoms in molecules[:24]:
        minimum = relaxed(atoms)
        minimum.positions += rng.normal(0, 0.05, minimum.positions.shape)
        minimum.info = {"kind": name}
        starts.append(minimum)
    return starts


def rmsd(a, b) -> float:
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))))


def main(name: str, limit: int | None = None, write: bool = True) -> dict:
    import ase.io
    from ase.optimize import BFGS

    from molopt.engine import EngineSettings, relax_structures
    from molopt.io.read import from_atoms
    from molopt.potentials.registry import load

    dataset = {"nn-emt-metals": "emt-metals", "nn-gfn2-chno": "gfn2-chno"}[name]
    starts_path = ROOT / "data" / "neural" / dataset / "validation-starts.extxyz"
    if not starts_path.exists():
        starts = emt_starts() if name == "nn-emt-metals" else gfn2_starts()
        ase.io.write(starts_path, starts)
    starts = ase.io.read(starts_path, ":")[:limit]
    spec = load(name)
    # molopt: all structures in one batched run
    items = [(k, from_atoms(a)) for k, a in enumerate(starts)]
    t = time.perf_counter()
    results = {
        r.key: r
        for r in relax_structures(
            items, spec.potential, EngineSettings(optimizer="lbfgs", fmax=FMAX, steps=3000)
        )
    }
    nn_time = time.perf_counter() - t
    rows = []
    ref_time = 0.0
    for k, atoms in enumerate(starts):
        ref = atoms.copy()
        ref.calc = reference_calculator(name)
        t = time.perf_counter()
        BFGS(ref, logfile=None).run(fmax=FMAX, steps=3000)
        ref_time += time.perf_counter() - t
        e_ref_min = ref.get_potential_energy()
        nn_min = atoms.copy()
        nn_min.positions = results[k].structure.positions
        nn_min.calc = reference_calculator(name)
        e_ref_at_nn = nn_min.get_potential_energy()
        rows.append(
            {
                "structure": str(atoms.info.get("kind", k)),
                "formula": atoms.get_chemical_formula(),
                "n_atoms": len(atoms),
                "rmsd_A": rmsd(results[k].structure.positions, ref.positions),
                "dE_meV_per_atom": 1000 * (e_ref_at_nn - e_ref_min) / len(atoms),
                "network_status": results[k].status,
            }
        )
    summary = {
        "potential": name,
        "reference": "ASE EMT + ASE BFGS"
        if name == "nn-emt-metals"
        else "tblite GFN2-xTB + ASE BFGS",
        "fmax_eV_per_A": FMAX,
        "n_structures": len(rows),
        "median_rmsd_A": float(np.median([r["rmsd_A"] for r in rows])),
        "median_abs_dE_meV_per_atom": float(np.median([abs(r["dE_meV_per_atom"]) for r in rows])),
        "max_rmsd_A": float(np.max([r["rmsd_A"] for r in rows])),
        "network_relax_time_s": nn_time,
        "reference_relax_time_s": ref_time,
        "structures": rows,
    }
    if write:
        target = ROOT / "potentials" / f"{name}.validation.json"
        target.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    result = main(sys.argv[1])
    print(json.dumps({k: v for k, v in result.items() if k != "structures"}, indent=1))
