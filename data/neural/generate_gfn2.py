"""Labelled configurations for the `nn-gfn2-chno` potential: GFN2-xTB (tblite) on small
organic molecules of H, C, N, O with up to ~30 atoms.

Molecules: closed-shell CHNO molecules of ASE's G2 set and molecules embedded from SMILES with
RDKit (ETKDG + MMFF). Each is relaxed with GFN2-xTB, then sampled by rattles of the minimum
and short Langevin MD at 300/600/1000 K (0.5 fs). The test split holds out whole molecules
(never seen in training) and uses an independent seed.

    pip install tblite rdkit
    OMP_NUM_THREADS=1 python data/neural/generate_gfn2.py train 0
    OMP_NUM_THREADS=1 python data/neural/generate_gfn2.py test 12345
Energies in eV, forces in eV/A (tblite's ASE calculator).
"""

from __future__ import annotations

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
    "O=C(O)C(O)C",
    "c1cnccn1",
    "CCOC(=O)CC",
    "CC=CCO",
    "Nc1ccc(O)cc1",
    "CC(C)C(C)O",
    "OC(=O)CCO",
    "C1CCCC1O",
    "CC(=O)c1ccncc1",
    "COC(C)=O",
    "CCc1ccccc1",
    "NC(=O)CC",
    "O=CCCC=O",
    "CC1CCCO1",
    "c1ccc(F)cc1",
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
TEST_G2 = ["CH3CH2NH2", "HCOOCH3", "CH3COCH3", "C4H4NH", "trans-butane", "H2CCO"]


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


def md(atoms: Atoms, rng, temperature: float, n: int, interval: int = 8):
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = atoms.copy()
    atoms.calc = calculator()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.02, rng=rng)
    out = []
    for _ in range(n):
        dyn.run(interval)
        out.append(Atoms(atoms.numbers, atoms.positions))
    return out


def molecules(split: str, seed: int):
    from ase.build import molecule

    smiles = TEST_SMILES if split == "test" else TRAIN_SMILES
    g2 = TEST_G2 if split == "test" else TRAIN_G2
    out = [(name, molecule(name)) for name in g2]
    for k, s in enumerate(smiles):
        atoms = from_smiles(s, seed + k)
        if atoms is not None and len(atoms) <= 32:
            out.append((s, atoms))
    return out


def generate(split: str, seed: int, per_molecule: int):
    rng = np.random.default_rng(seed)
    images = []
    for name, atoms in molecules(split, seed):
        minimum = relaxed(atoms)
        n_rattle = per_molecule // 3
        for _ in range(n_rattle):
            trial = minimum.copy()
            trial.positions += rng.normal(0, rng.uniform(0.02, 0.12), trial.positions.shape)
            images.append(label(trial, f"rattle {name}"))
        n_md = per_molecule - n_rattle
        for temperature in (300, 600, 1000):
            for snap in md(minimum, rng, temperature, max(1, n_md // 3)):
                images.append(label(snap, f"md-{temperature}K {name}"))
        print(f"{name}: {len(images)} configurations so far", flush=True)
    return images


if __name__ == "__main__":
    split = sys.argv[1] if len(sys.argv) > 1 else "train"
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else (0 if split == "train" else 12345)
    per_molecule = int(sys.argv[3]) if len(sys.argv) > 3 else (30 if split == "train" else 8)
    images = generate(split, seed, per_molecule)
    target = Path(__file__).parent / "gfn2-chno" / f"{split}.extxyz.gz"
    write(images, target)
    print(f"{len(images)} configurations, {sum(len(a) for a in images)} atoms -> {target}")
