"""Fine-tuning SevenNet-0 on GFN2-xTB molecules: a worked example of ``molopt train --init``.

SevenNet-0 was trained on PBE(+U) crystals and surfaces (MPtrj); GFN2-xTB (tblite) is a
semi-empirical method for molecules, with its own zero of energy. The labelled molecules of
``data/neural/gfn2-chno`` (made by ``data/neural/generate_gfn2.py``) stand for a user's data:

1. ``data/sevennet/finetune-train.extxyz.gz``: every configuration (rattled minima, 300-1000 K
   MD snapshots) of the first ``--molecules`` molecules of ``gfn2-chno/train.extxyz.gz``;
2. ``molopt train`` on it with ``--init sevennet-0`` and the preset ``train-sevennet-finetune``
   (per-element energy offsets refitted first, then Adam), testing on
   ``gfn2-chno/test.extxyz.gz``: 31 molecules in no training set;
3. errors on those test molecules, float64: SevenNet-0 as shipped (its forces; its energies
   sit on PBE's zero level), SevenNet-0 with only the refitted offsets, the fine-tuned model,
   and ``nn-gfn2-chno`` (the PaiNN trained on 24,561 such configurations) for scale;
4. the table, printed and written to ``data/sevennet/finetune.json``.

    python data/sevennet/finetune.py [--molecules 40] [--epochs 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "data" / "neural" / "gfn2-chno"
TRAIN = ROOT / "data" / "sevennet" / "finetune-train.extxyz.gz"


def write_training_set(n_molecules: int) -> int:
    """Every configuration of the first ``n_molecules`` molecules (by config_type's name)."""
    import ase.io

    names: list[str] = []
    picked = []
    import io

    # decompressed first: ASE's reader seeks, which restarts a gzip stream each time
    with gzip.open(SOURCE / "train.extxyz.gz", "rt") as handle:
        text = io.StringIO(handle.read())
    for atoms in ase.io.iread(text, format="extxyz"):  # molecule after molecule
        name = atoms.info["config_type"].split()[-1]
        if name not in names:
            if len(names) == n_molecules:
                break
            names.append(name)
        picked.append(atoms)
    with gzip.open(TRAIN, "wt") as handle:
        ase.io.write(handle, picked, format="extxyz")
    print(f"{TRAIN.relative_to(ROOT)}: {len(picked)} configurations of {len(names)} molecules")
    return len(picked)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="sevennet-finetuned")
    args = parser.parse_args()

    count = write_training_set(args.molecules)
    test = SOURCE / "test.extxyz.gz"
    command = [
        sys.executable, "-m", "molopt.cli", "train", str(TRAIN), "-c", "train-sevennet-finetune",
        "--init", "sevennet-0", "-o", args.out, "--test", str(test),
        "--epochs", str(args.epochs), "--overwrite", "-q",
    ]  # fmt: skip
    print("$", " ".join(command[2:]))
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started

    import tomllib

    from molopt.potentials import registry
    from molopt.training.data import read_labelled
    from molopt.training.evaluate import errors

    card = tomllib.loads((Path(args.out) / "sevennet-0-finetuned.toml").read_text())
    offsets = card["training"]["init"]["energy_offsets_eV"]
    data = read_labelled([test])
    base = registry.load("sevennet-0").potential
    import numpy as np

    from molopt import elements as el

    delta = np.array([offsets.get(el.symbol(z), 0.0) for z in base.elements])
    rows = {
        "sevennet-0": errors(base, data),
        "sevennet-0 + refitted offsets": errors(base.with_energy_offsets(delta), data),
        "sevennet-0 fine-tuned": card["errors"],
        "nn-gfn2-chno (PaiNN, 24,561 configurations)": errors(
            registry.load("nn-gfn2-chno").potential, data
        ),
    }
    table = {
        name: {
            "energy_mae_meV_per_atom": round(r["energy_mae_meV_per_atom"], 2),
            "force_mae_meV_per_A": round(r["force_mae_meV_per_A"], 1),
            "force_rmse_meV_per_A": round(r["force_rmse_meV_per_A"], 1),
        }
        for name, r in rows.items()
    }
    print(f"\n{len(data)} test configurations of 31 molecules never trained on (float64)")
    print(f"{'model':46s} {'E MAE meV/atom':>15s} {'F MAE meV/A':>12s} {'F RMSE':>8s}")
    for name, r in table.items():
        print(
            f"{name:46s} {r['energy_mae_meV_per_atom']:15.2f} "
            f"{r['force_mae_meV_per_A']:12.1f} {r['force_rmse_meV_per_A']:8.1f}"
        )
    import jax

    result = {
        "command": "python data/sevennet/finetune.py "
        f"--molecules {args.molecules} --epochs {args.epochs}",
        "training_configurations": count,
        "molecules": args.molecules,
        "epochs_run": card["training"]["epochs"],
        "best_epoch": card["training"]["best_epoch"],
        "train_wall_s": round(wall, 1),
        "energy_offsets_eV": offsets,
        "test": table,
        "jax": jax.__version__,
        "machine": f"{jax.devices()[0].platform}, {__import__('os').cpu_count()} cores",
    }
    out = ROOT / "data" / "sevennet" / "finetune.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)} (training {wall:.0f} s)")


if __name__ == "__main__":
    main()
