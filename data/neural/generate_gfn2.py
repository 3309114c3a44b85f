"""Labelled configurations for the `nn-gfn2-chno` potential: GFN2-xTB (tblite) on small
organic molecules of H, C, N, O with up to ~30 atoms.

Molecules: closed-shell CHNO molecules of ASE's G2 set, a hand-picked list of SMILES, and (for
training) a seeded sample of molecules enumerated from ring and chain scaffolds with one or two
substituents, and a list of bonding classes none of those covers (cumulenes, azoles, N=N,
strained rings, ...; written to a file of its own), all embedded with RDKit (ETKDG + MMFF).
Each is relaxed with GFN2-xTB, then sampled by rattles of the minimum (Gaussian, sigma
0.01-0.07 A: the range relaxations start from) and short Langevin MD at 300/600/1000 K
(0.5 fs). The test split holds out whole molecules and uses an independent seed; the script
refuses to write a training set that shares a molecular graph (connectivity from the 3D
structure) with the test molecules.

    pip install tblite rdkit
    python data/neural/generate_gfn2.py train 0        # two worker processes, one core each
                                # -> gfn2-chno/train.extxyz.gz + train-coverage.extxyz.gz
    python data/neural/generate_gfn2.py test 12345
    python data/neural/generate_gfn2.py extra 1 9 2000   # 2000 more molecules -> train-extra
Energies in eV, forces in eV/A (tblite's ASE calculator).
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from generate_emt import write  # noqa: E402

TRAIN_SMILES = [
    "CCO",
    "CC(=O)O",
    "CC(=O)N",
    "CN(C)C=O",
    "c1ccccc1O",
    "c1ccncc1",
    "c1ccc(N)cc1",
    "CC(C)O",
    "OCCO",
    "NCCO",
    "CC#N",
    "C=CC=O",
    "CC(=O)OC",
    "COC(=O)C=C",
    "c1ccoc1",
    "c1cc[nH]c1",
    "Cc1ccccc1",
    "CC(=O)c1ccccc1",
    "OC(=O)c1ccccc1",
    "NC(=O)c1ccccc1",
    "CCCCO",
    "CCOCC",
    "CC(C)(C)O",
    "C1CCCCC1",
    "C1CCOC1",
    "C1CCNCC1",
    "O=C1CCCC1",
    "NCC(=O)O",
    "CC(N)C(=O)O",
    "OCC(O)CO",
    "CC(O)C(=O)O",
    "O=CC(O)CO",
    "CNC(=O)OC",
    "N#Cc1ccccc1",
    "Oc1ccc(O)cc1",
    "Cc1ccncc1",
    "CC(=O)Nc1ccccc1",
    "COc1ccccc1",
    "O=C(O)CCC(=O)O",
    "CC1=CC(=O)CC1",
    "c1ncncn1",
    "Nc1ncccn1",
    "CCN(CC)CC",
    "CCCC(=O)O",
    "OCc1ccccc1",
    "CC=CC=O",
    "C#CCO",
    "CC(C)C(=O)O",
    "NC(=O)N",
    "O=C1NC(=O)C=C1",
    "CC(=O)CC(C)=O",
    "CCOC(=O)C",
    "c1ccc2ccccc2c1",
    "Cc1cc(C)cc(C)c1",
    "CC(C)CC(N)C(=O)O",
    "OC1CCCCC1",
    "CN1CCCC1",
    "O=C(O)c1ccncc1",
    "CC(=O)OCC=C",
    "NCCc1ccccc1",
]
TEST_SMILES = [
    "CCCO",
    "CC(=O)CC",
    "c1ccc(C)cc1O",
    "NCCCO",
    "CC(O)CC",
    "c1ccc(cc1)C=O",
    "OCCCO",
    "CC(C)N",
    "C1CCNC1",
    "CC(=O)NC",
    "CC(O)C(N)=O",
    "c1cnccn1",
    "CCOC(=O)CC",
    "CC=CCO",
    "Nc1ccc(O)cc1",
    "CC(C)C(C)O",
    "OC(=O)CCO",
    "C1CCCC1O",
    "CC(=O)c1ccncc1",
    "COC(=O)CC",
    "CCc1ccccc1",
    "NC(=O)CC",
    "O=CCCC=O",
    "CC1CCCO1",
    "NC(=O)c1ccncc1",
]
TRAIN_G2 = [
    "H2O",
    "NH3",
    "CH4",
    "C2H6",
    "C2H4",
    "C2H2",
    "CH3OH",
    "H2CO",
    "HCOOH",
    "CH3CN",
    "CO2",
    "HCN",
    "CH3CHO",
    "CH3COOH",
    "CH3NO2",
    "C6H6",
    "C5H5N",
    "C4H4O",
    "N2H4",
    "H2O2",
    "CH3CH2OH",
    "CH3OCH3",
    "C3H8",
    "isobutane",
    "CH3CONH2",
    "H3CNH2",
]
TEST_G2 = ["CH3CH2NH2", "HCOOCH3", "CH3COCH3", "CH3CH2OCH3", "trans-butane", "H2CCO"]


# bonding classes that neither list above nor the enumeration covers (audit of 2026-11-27:
# cumulenes, heterocumulenes, diazines and azoles, N=N/C=N/N-O groups, strained rings,
# polyynes, fused rings); appended after the enumerated sample, so the molecules before them
# keep their index and with it their seeded stream
COVERAGE_SMILES = [
    "CC=C=O", "CC(C)=C=O", "O=C=Cc1ccccc1", "C=C=C", "CC=C=C", "N=C=O", "CN=C=O",
    "O=C=Nc1ccccc1", "O=C=C=C=O", "CN=C=NC", "C=[N+]=[N-]", "N=[N+]=[N-]", "C[N+]#[C-]",
    "NC#N", "N#CC#N", "C#CC#C", "CC#CC", "C=CC#N", "c1ccnnc1", "c1cncnc1", "c1cn[nH]c1",
    "c1nn[nH]c1", "CN=NC", "CC=NO", "CC(C)=NN", "C=NC", "NC(N)=N", "CON", "NN(C)C",
    "CN(C)N=O", "CO[N+](=O)[O-]", "CC(=O)OO", "C1CO1", "C1CN1", "C1CC1", "C1COC1",
    "O=C1CCCN1", "O=C1CCCO1", "O=CC=O", "CC(=O)C(C)=O", "C1=CCC=C1", "c1ccc2[nH]ccc2c1",
    "c1ccc2ncccc2c1", "c1ccc2occc2c1",
]  # fmt: skip

# scaffolds with one or two attachment points (as branches) and the substituents put there;
# combinations are canonicalised with RDKit and sampled with the split's seed
SCAFFOLDS = [
    "c1ccc({0})cc1", "c1cc({0})ccc1({1})", "c1c({0})cccc1({1})", "c1cccc({0})c1({1})",
    "c1cc({0})ccn1", "c1ccc({0})nc1", "c1cc({0})cnc1({1})", "c1cc({0})oc1", "c1cc({0})[nH]c1",
    "c1cnc({0})nc1", "c1cnc({0})[nH]1", "c1coc({0})n1", "c1cc({0})no1", "c1cn({0})cn1",
    "C1CCC({0})CC1", "C1CCC({0})C1", "C1CC({0})C1", "C1C({0})C1", "C1CC({0})OC1",
    "C1CC({0})CO1", "C1COCCN1({0})", "C1CCN({0})CC1", "C1CCN({0})C1", "C1CC({0})CN1",
    "O=C1CCC({0})C1", "C1CC({0})CCO1", "C({0})({1})", "C({0})C({1})", "C({0})CC({1})",
    "C({0})CCC({1})", "CC({0})({1})", "CC(C)({0})", "C=C({0})", "C(=C{0})({1})", "C#C({0})",
    "O=C({0})({1})", "O=C(C({0}))({1})", "N({0})({1})", "O({0})", "C({0})OC({1})",
    "C({0})NC({1})", "CN(C)C({0})", "C(=O)(N{0})", "N=C({0})N",
]  # fmt: skip
SUBSTITUENTS = [
    "C", "O", "N", "C=O", "C(=O)O", "C(=O)N", "C#N", "OC", "NC", "N(C)C", "CO", "CN", "CC",
    "C(C)=O", "OC(C)=O", "NC(C)=O", "[N+](=O)[O-]", "C=C", "C#C", "C(=O)OC", "CCO", "C(C)C",
]  # fmt: skip


TRAIN_ENUMERATED = 600  # enumerated molecules in the seed-0 training set


def enumerated() -> list[str]:
    """Canonical SMILES of every scaffold + substituent combination with 3 to 30 atoms."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    found = set()
    for scaffold in SCAFFOLDS:
        slots = scaffold.count("{")
        choices = SUBSTITUENTS + ([""] if slots > 1 else [])
        for combo in itertools.product(choices, repeat=slots):
            mol = Chem.MolFromSmiles(scaffold.format(*combo).replace("()", ""))
            if mol is None or mol.GetNumAtoms() < 3 or Chem.AddHs(mol).GetNumAtoms() > 30:
                continue
            found.add(Chem.MolToSmiles(mol))
    return sorted(found)


def graph_key(atoms: Atoms) -> str:
    """Canonical SMILES of the connectivity graph (no bond orders) of a 3D structure."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds

    xyz = f"{len(atoms)}\n\n" + "".join(
        f"{s} {x:.6f} {y:.6f} {z:.6f}\n"
        for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions, strict=True)
    )
    mol = Chem.MolFromXYZBlock(xyz)
    rdDetermineBonds.DetermineConnectivity(mol)
    mol.UpdatePropertyCache(strict=False)
    return Chem.MolToSmiles(mol)


def from_smiles(smiles: str, seed: int) -> Atoms | None:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    mol = Chem.AddHs(mol)
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        return None
    AllChem.MMFFOptimizeMolecule(mol)
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    if not set(symbols) <= {"H", "C", "N", "O"}:
        return None
    return Atoms(symbols, positions=mol.GetConformer().GetPositions())


def calculator():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def label(atoms: Atoms, kind: str) -> Atoms:
    atoms = Atoms(atoms.numbers, atoms.positions)
    atoms.calc = calculator()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info = {"config_type": kind}
    return atoms


def relaxed(atoms: Atoms) -> Atoms:
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = calculator()
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=500)
    return Atoms(atoms.numbers, atoms.positions)


def md(atoms: Atoms, rng, temperature: float, n: int, interval: int = 10):
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = atoms.copy()
    atoms.calc = calculator()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.02, fixcm=False, rng=rng
    )
    out = []
    for _ in range(n):
        dyn.run(interval)
        out.append(Atoms(atoms.numbers, atoms.positions))
    return out


def hand_picked(split: str, seed: int):
    from ase.build import molecule

    smiles = TEST_SMILES if split == "test" else TRAIN_SMILES
    g2 = TEST_G2 if split == "test" else TRAIN_G2
    out = [(name, molecule(name)) for name in g2]
    for k, s in enumerate(smiles):
        atoms = from_smiles(s, seed + k)
        if atoms is not None and len(atoms) <= 32:
            out.append((s, atoms))
    return out


def molecules(split: str, seed: int, n_enumerated: int):
    """(name, structure) of the split's molecules, and how many come before the coverage list;
    training never shares a graph with test. The "extra" split samples further enumerated
    molecules with its own seed, none of them in the seed-0 training set (nor test)."""
    if split == "extra":
        first, _ = molecules("train", 0, TRAIN_ENUMERATED)
        out, seen = [], {graph_key(a) for _, a in first}
    else:
        out = hand_picked(split, seed)
        if split == "test":
            return out, len(out)
        seen = {graph_key(a) for _, a in out}
    # bond graphs do not depend on the embedding seed: any seed gives the same keys
    held_out = {graph_key(a) for _, a in hand_picked("test", 12345)}
    pool = enumerated()
    rng = np.random.default_rng(seed)
    clash = seen & held_out
    if clash:
        raise SystemExit(f"training molecules also in the test set: {sorted(clash)}")
    for k in rng.permutation(len(pool)):
        if n_enumerated <= 0:
            break
        atoms = from_smiles(pool[k], seed + int(k))
        if atoms is None:
            continue
        key = graph_key(atoms)
        if key in held_out or key in seen:
            continue
        seen.add(key)
        out.append((pool[k], atoms))
        n_enumerated -= 1
    n_main = len(out)
    if split == "extra":
        return out, n_main
    for k, s in enumerate(COVERAGE_SMILES):
        atoms = from_smiles(s, seed + 100_000 + k)
        if atoms is None:
            raise SystemExit(f"cannot embed coverage molecule {s}")
        key = graph_key(atoms)
        if key in held_out:
            raise SystemExit(f"coverage molecule {s} is also in the test set")
        if key not in seen:
            seen.add(key)
            out.append((s, atoms))
    return out, n_main


def sample(job) -> list[Atoms]:
    """Relax one molecule, then label its rattles and MD snapshots (own seeded stream)."""
    seed, k, name, atoms, per_molecule = job
    rng = np.random.default_rng([seed, k])
    minimum = relaxed(atoms)
    images = []
    n_rattle = per_molecule // 3
    for _ in range(n_rattle):
        trial = minimum.copy()
        trial.positions += rng.normal(0, rng.uniform(0.01, 0.07), trial.positions.shape)
        images.append(label(trial, f"rattle {name}"))
    n_md = per_molecule - n_rattle
    for temperature in (300, 600, 1000):
        for snap in md(minimum, rng, temperature, max(1, n_md // 3)):
            images.append(label(snap, f"md-{temperature}K {name}"))
    return images


def generate(split: str, seed: int, per_molecule: int, n_enumerated: int, workers: int = 2):
    """Labelled images of the split's molecules: (main part, coverage part)."""
    from multiprocessing import get_context

    found, n_main = molecules(split, seed, n_enumerated)
    jobs = [(seed, k, name, atoms, per_molecule) for k, (name, atoms) in enumerate(found)]
    parts = ([], [])
    with get_context("spawn").Pool(workers) as pool:
        for k, images in enumerate(pool.imap(sample, jobs)):
            parts[k >= n_main].extend(images)
            if k % 20 == 0 or k == len(jobs) - 1:
                done = len(parts[0]) + len(parts[1])
                print(f"{k + 1}/{len(jobs)} molecules, {done} configurations", flush=True)
    return parts


if __name__ == "__main__":
    split = sys.argv[1] if len(sys.argv) > 1 else "train"
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else (0 if split == "train" else 12345)
    per_molecule = int(sys.argv[3]) if len(sys.argv) > 3 else (10 if split == "train" else 8)
    default = TRAIN_ENUMERATED if split == "train" else 0
    n_enumerated = int(sys.argv[4]) if len(sys.argv) > 4 else default
    main, coverage = generate(split, seed, per_molecule, n_enumerated)
    # the coverage molecules go to a file of their own: the shipped network was trained on
    # the main file first and then on both (configs/train-gfn2-chno.toml)
    for images, suffix in ((main, ""), (coverage, "-coverage")):
        if images:
            stem = "train-extra" if split == "extra" else split
            target = Path(__file__).parent / "gfn2-chno" / f"{stem}{suffix}.extxyz.gz"
            write(images, target)
            atoms = sum(len(a) for a in images)
            print(f"{len(images)} configurations, {atoms} atoms -> {target}")
