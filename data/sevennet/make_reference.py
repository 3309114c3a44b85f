"""Reference energies, forces and stresses of SevenNet-0 from sevenn's own ASE calculator.

Run it where sevenn and torch are installed (neither is a molopt dependency)::

    /tmp/venv-sevenn/bin/python data/sevennet/make_reference.py

Writes ``data/sevennet/reference.extxyz`` (one frame per structure) and
``data/sevennet/reference.json`` (versions, checkpoint hash, counts). Every frame carries two
sets of results:

- ``f32_*``: ``SevenNetCalculator("7net-0")`` exactly as its users run it (float32 PyTorch);
- ``f64_*``: the same model and graph with every floating-point tensor in float64 (the
  calculator's own graph construction, then ``model.double()``), so that molopt's float64
  evaluation can be compared to the last digits instead of to float32 rounding.

Energies in eV (``f32_energy``/``f64_energy`` in the frame info), forces in eV/A
(``f32_forces``/``f64_forces`` arrays), stresses in eV/A^3 as a 3x3 in ASE's sign convention
(``f32_stress``/``f64_stress``, only for fully periodic frames). The structures span the
periodic table: elemental crystals of each common prototype, binary and ternary compounds
(rocksalt, zincblende, wurtzite, CsCl, fluorite, perovskite, rutile, corundum, layered), random
alloys, oxides, halides, slabs with adsorbates, molecules and clusters, most of them rattled
and some strained, all from a fixed random seed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def need_sevenn():
    try:
        import sevenn  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "make_reference.py needs the sevenn package and PyTorch (not molopt dependencies):\n"
            "  python -m venv /tmp/venv-sevenn && /tmp/venv-sevenn/bin/pip install sevenn\n"
            "  /tmp/venv-sevenn/bin/python data/sevennet/make_reference.py"
        )


def stored_frames(labels):
    """Fresh copies (numbers, positions, cell, pbc and label only) of the frames of
    ``reference.extxyz`` named in ``labels``, in that order."""
    import ase.io

    frames = {a.info["label"]: a for a in ase.io.read(HERE / "reference.extxyz", ":")}
    out = []
    for label in labels:
        atoms = frames[label].copy()
        for key in [k for k in atoms.info if k != "label"]:
            del atoms.info[key]
        for key in [k for k in atoms.arrays if k not in ("numbers", "positions")]:
            del atoms.arrays[key]
        out.append(atoms)
    return out


def structures(rng):
    """(label, Atoms) pairs; deterministic for a given generator."""
    from ase import Atoms
    from ase.build import add_adsorbate, bulk, fcc100, fcc111, hcp0001, molecule
    from ase.cluster import Icosahedron
    from ase.spacegroup import crystal

    out = []

    def add(label, atoms, rattle=0.05, strain=0.0):
        atoms = atoms.copy()
        if strain and atoms.pbc.all():
            eps = rng.uniform(-strain, strain, (3, 3))
            eps = 0.5 * (eps + eps.T)
            atoms.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
        if rattle:
            atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
        atoms.info["label"] = label
        out.append(atoms)

    # elemental crystals
    for sym in ("Cu", "Al", "Ni", "Ag", "Au", "Pt", "Pd", "Pb", "Ir", "Rh", "Ca", "Sr"):
        add(f"fcc-{sym}", bulk(sym, "fcc", cubic=True), rattle=0.05, strain=0.02)
    for sym in ("Fe", "W", "Mo", "Cr", "V", "Nb", "Ta", "Na", "K", "Li", "Ba", "Eu"):
        add(f"bcc-{sym}", bulk(sym, "bcc", cubic=True).repeat((2, 1, 1)), strain=0.02)
    for sym in ("Mg", "Ti", "Zn", "Co", "Zr", "Ru", "Cd", "Y", "Sc", "Hf", "Re", "Be"):
        add(f"hcp-{sym}", bulk(sym, "hcp").repeat((2, 2, 1)), strain=0.02)
    for sym, a in (("C", 3.567), ("Si", 5.431), ("Ge", 5.658), ("Sn", 6.489)):
        add(f"diamond-{sym}", bulk(sym, "diamond", a=a, cubic=True), rattle=0.08, strain=0.03)
    for sym, a in (("Sb", 3.0), ("Bi", 3.3)):  # Po (84) is not among the 89
        add(f"sc-{sym}", Atoms(sym, cell=[a] * 3, pbc=True).repeat(2), rattle=0.05)
    add(
        "gas-He-Ne-Ar-Kr-Xe",
        Atoms("HeNeArKrXe", cell=[9.0] * 3, pbc=True, scaled_positions=rng.uniform(0, 1, (5, 3))),
        rattle=0.0,
    )

    # binary compounds by prototype
    for formula, a in (
        ("NaCl", 5.64),
        ("MgO", 4.21),
        ("LiF", 4.03),
        ("KCl", 6.29),
        ("CaO", 4.81),
        ("NiO", 4.18),
        ("TiN", 4.24),
        ("ZrC", 4.70),
        ("AgCl", 5.55),
        ("PbS", 5.94),
        ("SrO", 5.16),
        ("BaO", 5.52),
        ("KBr", 6.60),
        ("RbI", 7.34),
        ("ScN", 4.50),
        ("UO", 4.92),
    ):
        add(f"rocksalt-{formula}", bulk(formula, "rocksalt", a=a), strain=0.02)
    for formula, a in (
        ("GaAs", 5.65),
        ("ZnS", 5.41),
        ("InP", 5.87),
        ("CdTe", 6.48),
        ("SiC", 4.36),
        ("BN", 3.62),
        ("AlP", 5.46),
        ("CuCl", 5.42),
        ("GaSb", 6.10),
        ("ZnSe", 5.67),
        ("HgTe", 6.46),
    ):
        add(
            f"zincblende-{formula}",
            bulk(formula, "zincblende", a=a, cubic=True),
            rattle=0.06,
            strain=0.02,
        )
    for formula, a, c in (
        ("ZnO", 3.25, 5.21),
        ("GaN", 3.19, 5.19),
        ("AlN", 3.11, 4.98),
        ("InN", 3.54, 5.70),
    ):
        add(f"wurtzite-{formula}", bulk(formula, "wurtzite", a=a, c=c).repeat((2, 2, 1)))
    for formula, a in (
        ("CsCl", 4.12),
        ("CsBr", 4.29),
        ("CsI", 4.57),
        ("NiAl", 2.88),
        ("CuZn", 2.95),
        ("FeAl", 2.91),
        ("TlBr", 3.99),
    ):
        add(f"cscl-{formula}", bulk(formula, "cesiumchloride", a=a).repeat(2), strain=0.02)
    for formula, a in (
        ("CaF2", 5.46),
        ("ZrO2", 5.07),
        ("CeO2", 5.41),
        ("ThO2", 5.60),
        ("Li2O", 4.61),
        ("BaF2", 6.20),
        ("UO2", 5.47),
    ):
        add(f"fluorite-{formula}", bulk(formula, "fluorite", a=a, cubic=True), strain=0.02)
    for a_, b_, x_, a in (
        ("Sr", "Ti", "O", 3.905),
        ("Ba", "Ti", "O", 4.00),
        ("Ca", "Ti", "O", 3.84),
        ("K", "Nb", "O", 4.00),
        ("La", "Al", "O", 3.79),
        ("Cs", "Pb", "I", 6.30),
        ("K", "Mg", "F", 3.99),
        ("Sr", "Ru", "O", 3.93),
        ("Pr", "Mn", "O", 3.87),
        ("Nd", "Ga", "O", 3.86),
    ):
        perovskite = crystal(
            [a_, b_, x_],
            [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)],
            spacegroup=221,
            cellpar=[a, a, a, 90, 90, 90],
        )
        add(f"perovskite-{a_}{b_}{x_}3", perovskite, rattle=0.06, strain=0.02)
    for m, a, c, u in (
        ("Ti", 4.59, 2.96, 0.305),
        ("Sn", 4.74, 3.19, 0.307),
        ("Mg", 4.62, 3.05, 0.303),
        ("Ru", 4.49, 3.11, 0.306),
        ("Mn", 4.40, 2.87, 0.302),
        ("Ge", 4.40, 2.86, 0.306),
    ):
        x = "F" if m == "Mg" else "O"
        rutile = crystal(
            [m, x], [(0, 0, 0), (u, u, 0)], spacegroup=136, cellpar=[a, a, c, 90, 90, 90]
        )
        add(f"rutile-{m}{x}2", rutile, rattle=0.05, strain=0.02)
    for m, a, c in (("Al", 4.76, 12.99), ("Cr", 4.96, 13.59), ("Fe", 5.04, 13.77)):
        corundum = crystal(
            [m, "O"],
            [(0, 0, 0.3523), (0.306, 0, 0.25)],
            spacegroup=167,
            cellpar=[a, a, c, 90, 90, 120],
            primitive_cell=True,
        )
        add(f"corundum-{m}2O3", corundum, rattle=0.04)
    quartz = crystal(
        ["Si", "O"],
        [(0.4697, 0, 0), (0.4135, 0.2669, 0.1191)],
        spacegroup=154,
        cellpar=[4.916, 4.916, 5.405, 90, 90, 120],
    )
    add("quartz-SiO2", quartz, rattle=0.04, strain=0.02)
    for alkali, tm in (("Li", "Co"), ("Li", "Ni"), ("Na", "Co"), ("Li", "Mn")):
        layered = crystal(
            [alkali, tm, "O"],
            [(0, 0, 0.5), (0, 0, 0), (0, 0, 0.26)],
            spacegroup=166,
            cellpar=[2.82, 2.82, 14.05, 90, 90, 120],
            primitive_cell=True,
        ).repeat((2, 2, 1))
        add(f"layered-{alkali}{tm}O2", layered, rattle=0.04)
    spinel = crystal(
        ["Mg", "Al", "O"],
        [(0.125, 0.125, 0.125), (0.5, 0.5, 0.5), (0.2624, 0.2624, 0.2624)],
        spacegroup=227,
        setting=2,
        cellpar=[8.08] * 3 + [90] * 3,
        primitive_cell=True,
    )
    add("spinel-MgAl2O4", spinel, rattle=0.04)
    add(
        "olivine-like-LiFePO4",
        crystal(
            ["Li", "Fe", "P", "O"],
            [(0, 0, 0), (0.28, 0.25, 0.97), (0.09, 0.25, 0.42), (0.10, 0.25, 0.74)],
            spacegroup=62,
            cellpar=[10.33, 6.01, 4.69, 90, 90, 90],
        ),
        rattle=0.03,
    )
    # halides beyond rocksalt/CsCl
    for m, x, a in (("Mg", "Cl", 3.64), ("Fe", "Cl", 3.59), ("Ni", "Br", 3.70)):
        cdi2 = crystal(
            [m, x],
            [(0, 0, 0), (1 / 3, 2 / 3, 0.25)],
            spacegroup=164,
            cellpar=[a, a, 6.0, 90, 90, 120],
        ).repeat((2, 2, 1))
        add(f"CdI2-{m}{x}2", cdi2, rattle=0.04)
    # ordered and random alloys
    ni3al = crystal(
        ["Ni", "Al"], [(0.5, 0.5, 0), (0, 0, 0)], spacegroup=221, cellpar=[3.57] * 3 + [90] * 3
    )
    add("L12-Ni3Al", ni3al.repeat(2), rattle=0.04)
    heusler = crystal(
        ["Cu", "Mn", "Al"],
        [(0.25, 0.25, 0.25), (0, 0, 0), (0.5, 0.5, 0.5)],
        spacegroup=225,
        cellpar=[5.95] * 3 + [90] * 3,
    )
    add("heusler-Cu2MnAl", heusler, rattle=0.04)
    for symbols, a in (
        (("Cu", "Au"), 3.9),
        (("Ni", "Pt"), 3.75),
        (("Ag", "Pd"), 4.0),
        (("Fe", "Co", "Ni", "Cr", "Mn"), 3.58),
        (("Ti", "Zr", "Hf", "Nb", "Ta"), 4.4),
    ):
        struct = "bcc" if "Ti" in symbols else "fcc"
        base = bulk("Cu", struct, a=a if struct == "fcc" else 3.35, cubic=True).repeat(2)
        base.set_chemical_symbols(rng.choice(symbols, len(base)))
        add(f"alloy-{struct}-{''.join(symbols)}", base, rattle=0.06, strain=0.02)
    lanthanides = "La Ce Pr Nd Pm Sm Gd Tb Dy Ho Er Tm Yb Lu".split()
    for k in range(0, len(lanthanides), 2):
        pair = bulk(lanthanides[k], "bcc", a=4.1, cubic=True)
        pair.set_chemical_symbols([lanthanides[k], lanthanides[k + 1]])
        add(f"B2-{lanthanides[k]}{lanthanides[k + 1]}", pair.repeat(2), rattle=0.05)
    actinides = (("Ac", "Th"), ("Pa", "U"), ("Np", "Pu"))
    for pair_symbols in actinides:
        pair = bulk("Ac", "bcc", a=3.8, cubic=True)
        pair.set_chemical_symbols(list(pair_symbols))
        add(f"B2-{''.join(pair_symbols)}", pair.repeat(2), rattle=0.05)
    for pnictide in (("Ga", "As"), ("In", "Sb"), ("Tl", "Bi")):
        pair = bulk("Cs", "bcc", a=3.9, cubic=True)
        pair.set_chemical_symbols(list(pnictide))
        add(f"B2-{''.join(pnictide)}", pair.repeat(2), rattle=0.05)
    face_centred = [(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)]
    for label, symbols, a in (
        ("tetra-Tc-Os-Hg", "TcOsHgTe", 5.5),
        ("mixed-SeAsBrI", "SeAsBrI", 6.0),
        ("mixed-RbSrYB", "RbSrYB", 6.5),
    ):
        add(label, Atoms(symbols, cell=[a] * 3, pbc=True, scaled_positions=face_centred))

    # slabs with adsorbates (periodic in-plane, vacuum along z, not periodic along z)
    # (label, surface builder, metal, adsorbate, height A, site, adsorbate atom at the height)
    slabs = (
        ("slab-Pt111-O", fcc111, "Pt", "O", 1.2, "fcc", 0),
        ("slab-Cu100-CO", fcc100, "Cu", "CO", 1.9, "ontop", 1),  # C down (g2 lists O first)
        ("slab-Al111-H", fcc111, "Al", "H", 1.0, "hcp", 0),
        ("slab-Au111-OH", fcc111, "Au", "OH", 1.9, "ontop", 0),
        ("slab-Ru0001-N", hcp0001, "Ru", "N", 1.1, "hcp", 0),
        ("slab-Pd100-H", fcc100, "Pd", "H", 0.9, "hollow", 0),
        ("slab-Ni111-CH3", fcc111, "Ni", "CH3", 2.0, "ontop", 0),
        ("slab-Ag111-H2O", fcc111, "Ag", "H2O", 2.4, "ontop", 0),
    )
    for label, builder, metal, adsorbate, height, site, index in slabs:
        s = builder(metal, (2, 2, 3), vacuum=6.0)
        species = adsorbate if len(adsorbate) == 1 else molecule(adsorbate)
        add_adsorbate(s, species, height, site, mol_index=index)
        s.pbc = (True, True, False)
        add(label, s, rattle=0.04)
    # molecules and clusters (not periodic)
    for name in (
        "H2O",
        "CH4",
        "NH3",
        "C6H6",
        "CO2",
        "CH3CH2OH",
        "HCN",
        "SiH4",
        "PH3",
        "SH2",
        "HCl",
        "CH3Cl",
        "SO2",
        "LiF",
        "Na2",
        "BF3",
        "CH3COOH",
        "AlCl3",
        "N2O",
    ):
        m = molecule(name)
        add(f"molecule-{name}", m, rattle=0.03)
    for sym in ("Cu", "Au", "Pt"):
        cluster = Atoms(Icosahedron(sym, 2))
        cluster.pbc = False
        add(f"cluster-{sym}13", cluster, rattle=0.05)
    add(
        "cluster-Si4H",
        Atoms(
            "Si4H",
            positions=[(0, 0, 0), (2.3, 0, 0), (1.15, 2.0, 0), (1.15, 0.66, 1.9), (-1.4, 0, 0)],
        ),
        rattle=0.02,
    )
    return out


def as_stored(atoms):
    """``atoms`` as the extxyz file will hold it (positions and cell rounded to 1e-8 A), so
    that the reference results belong to exactly the coordinates that are stored."""
    import io

    import ase.io

    text = io.StringIO()
    ase.io.write(text, atoms, format="extxyz")
    text.seek(0)
    stored = ase.io.read(text, format="extxyz")
    stored.info["label"] = atoms.info["label"]
    return stored


def one_hot_wrapper():
    import torch
    from sevenn import _keys as KEY

    class OneHotIn(torch.nn.Module):
        """sevenn's one-hot embedding, its float outputs cast to ``dtype``."""

        def __init__(self, inner, dtype):
            super().__init__()
            self.inner, self.dtype = inner, dtype

        def forward(self, data):
            data = self.inner(data)
            for key in (KEY.NODE_FEATURE, KEY.NODE_ATTR):
                data[key] = data[key].to(self.dtype)
            return data

    return OneHotIn


def graph_results(calc, model, atoms, dtype):
    """Energy, forces, stress (3x3, ASE sign) of ``atoms`` through sevenn's own graph builder
    with the float tensors in ``dtype``."""
    import torch
    from sevenn import _keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph
    from sevenn.util import dtype_correct

    graph = unlabeled_atoms_to_graph(atoms, calc.cutoff, with_shift=False)
    for key, value in graph.items():
        graph[key] = dtype_correct(value, float_dtype=dtype)
    data = AtomGraphData(**graph)
    output = model(data)
    energy = float(output[KEY.PRED_TOTAL_ENERGY].detach().cpu().item())
    forces = output[KEY.PRED_FORCE].detach().cpu().numpy().astype(np.float64)
    voigt = (-output[KEY.PRED_STRESS]).detach().cpu().numpy().astype(np.float64)
    xx, yy, zz, xy, yz, zx = voigt  # sevenn's order
    stress = np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]])
    del torch
    return energy, forces, stress


def main():
    need_sevenn()
    warnings.filterwarnings("ignore")
    import copy

    import ase.io
    import sevenn
    import torch
    from sevenn import util
    from sevenn.calculator import SevenNetCalculator

    OneHotIn = one_hot_wrapper()
    rng = np.random.default_rng(20240711)
    frames = [as_stored(atoms) for atoms in structures(rng)]
    calc = SevenNetCalculator("7net-0", device="cpu")
    model64 = copy.deepcopy(calc.model).double()
    # sevenn's one-hot embedding returns float32 whatever the model's dtype
    model64._modules["onehot_idx_to_onehot"] = OneHotIn(
        model64._modules["onehot_idx_to_onehot"], torch.float64
    )
    rows = []
    for atoms in frames:
        work = atoms.copy()
        work.calc = calc
        e32 = work.get_potential_energy()
        f32 = work.get_forces()
        periodic = bool(atoms.pbc.all())
        s32 = work.get_stress(voigt=False) if periodic else None
        e64, f64, s64 = graph_results(calc, model64, atoms, torch.float64)
        # the calculator's float32 path and the same graph in float32 must agree exactly
        e32b, _, _ = graph_results(calc, calc.model, atoms, torch.float32)
        assert abs(e32b - e32) <= 1e-6 * max(1.0, abs(e32)), (atoms.info["label"], e32b, e32)
        atoms.info["f32_energy"] = e32
        atoms.info["f64_energy"] = e64
        atoms.arrays["f32_forces"] = np.asarray(f32, np.float64)
        atoms.arrays["f64_forces"] = f64
        if periodic:
            atoms.info["f32_stress"] = np.asarray(s32, np.float64).reshape(-1)
            atoms.info["f64_stress"] = s64.reshape(-1)
        rows.append((atoms.info["label"], len(atoms), (e32 - e64) / len(atoms)))
        print(
            f"{atoms.info['label']:28s} {len(atoms):4d} atoms  E {e64:14.6f} eV  "
            f"f32-f64 {(e32 - e64) / len(atoms):+.1e} eV/atom",
            flush=True,
        )
    out = HERE / "reference.extxyz"
    ase.io.write(out, frames, format="extxyz")
    checkpoint = Path(util.pretrained_name_to_path("7net-0"))
    elements = sorted({int(z) for a in frames for z in a.numbers})
    meta = {
        "model": "7net-0",
        "sevenn_version": sevenn.__version__,
        "torch_version": torch.__version__,
        "checkpoint": str(Path(*checkpoint.parts[-2:])),
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "n_structures": len(frames),
        "n_atoms": int(sum(len(a) for a in frames)),
        "n_periodic": int(sum(bool(a.pbc.all()) for a in frames)),
        "elements": len(elements),
        "reference_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "max_f32_minus_f64_eV_per_atom": max(abs(r[2]) for r in rows),
    }
    (HERE / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
