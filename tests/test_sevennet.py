"""SevenNet-0 and SevenNet-l3i5 in JAX against sevenn's own PyTorch implementation.

``data/sevennet/reference.extxyz`` holds, for 171 structures covering all 89 elements, the
energies, forces and stresses of sevenn's ASE calculator as users run it (float32) and of the
same model and graph in float64 (``data/sevennet/make_reference.py``). These tests need no
torch: molopt's float64 evaluation is compared with the float64 reference (tight bounds, far
below float32 rounding) and with the float32 one (the issue's targets: 1e-5 eV/atom,
1e-4 eV/A, 1e-5 eV/A^3); molopt's float32 evaluation with the float32 reference; l3i5 on six
structures; relaxations with ASE FIRE + sevenn's calculator on three (ten, and 30 + 30 with
and without the cell, under ``-m slow``); FixAtoms, the optimizers, the ASE calculator,
``molopt hessian``, implicit gradients and fine-tuning with SevenNet-0. A test marked
``sevenn`` compares live when sevenn is importable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from conftest import structure_from_atoms

from molopt.engine.single_point import evaluate_structures
from molopt.errors import PotentialError
from molopt.potentials import registry

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "data" / "sevennet" / "reference.extxyz"

#: molopt float64 vs sevenn float64 (its model and graph cast to float64). Measured: max
#: 1.6e-8 eV/atom, 4.7e-7 eV/A, 4.4e-9 eV/A^3, medians 4.5e-11 eV/atom and 6.7e-9 eV/A; the
#: few larger residuals were not traced (sevenn's float64 cast may keep some float32
#: constants). The medians are held tightly: a single float32 step in the model lifts them.
F64_ENERGY_PER_ATOM, F64_FORCE, F64_STRESS = 1e-7, 5e-6, 5e-8
F64_MEDIAN_ENERGY_PER_ATOM, F64_MEDIAN_FORCE = 1e-9, 5e-8
#: anything vs sevenn float32 (the issue's parity targets; float32 rounding is ~1e-6 relative)
F32_ENERGY_PER_ATOM, F32_FORCE, F32_STRESS = 1e-5, 1e-4, 1e-5


@pytest.fixture(scope="module")
def sevennet():
    return registry.load("sevennet-0").potential


@pytest.fixture(scope="module")
def two_blocks(sevennet):
    """SevenNet-0 cut to its first and last interaction blocks (the first's output features,
    128x0e + 64x1o + 32x2e, are what the last reads): the same model code, a program that
    compiles in a third of the time, for tests of how the engine and the row form run the
    model rather than of its values (those are compared with sevenn above)."""
    import dataclasses

    last = len(sevennet.blocks) - 1
    weights = {}
    for key, value in sevennet.weights.items():
        head, _, rest = key.partition("/")
        if not head.isdigit() or head == "0":
            weights[key] = value
        elif int(head) == last:
            weights[f"1/{rest}"] = value
    blocks = (sevennet.blocks[0], sevennet.blocks[last])
    return dataclasses.replace(sevennet, weights=weights, blocks=blocks)


@pytest.fixture(scope="module")
def reference():
    return ase.io.read(REFERENCE, ":")


def _deviations(frames, results, tag):
    """Per structure |dE|/atom, max |dF| and max |dS| of ``results`` against the ``tag``
    reference (stress only for fully periodic structures)."""
    de, df, ds = [], [], []
    for atoms, (energy, forces, stress) in zip(frames, results, strict=True):
        de.append(abs(energy - atoms.info[f"{tag}_energy"]) / len(atoms))
        df.append(float(np.abs(forces - atoms.arrays[f"{tag}_forces"]).max()))
        if atoms.pbc.all():
            ds.append(float(np.abs(stress.reshape(-1) - atoms.info[f"{tag}_stress"]).max()))
        else:
            assert stress is None
    return np.array(de), np.array(df), np.array(ds)


def _errors(frames, results, tag):
    """Largest |dE|/atom, |dF| and |dS| over all structures."""
    return tuple(float(v.max()) for v in _deviations(frames, results, tag))


def test_reference_spans_the_periodic_table(reference):
    elements = {int(z) for atoms in reference for z in atoms.numbers}
    assert len(reference) >= 100 and len(elements) >= 80
    assert sum(a.pbc.all() for a in reference) >= 100
    assert any(not a.pbc.any() for a in reference) and any(
        a.pbc.tolist() == [True, True, False] for a in reference
    )


@pytest.fixture(scope="module")
def float64_results(sevennet, reference):
    structures = [structure_from_atoms(a) for a in reference]
    return evaluate_structures(structures, sevennet, stress=True, precision="float64")


def test_float64_equals_sevenn_float64(reference, float64_results):
    """Every reference structure in one padded batch; tolerances in the module constants."""
    de, df, ds = _deviations(reference, float64_results, "f64")
    assert de.max() < F64_ENERGY_PER_ATOM, de.max()
    assert df.max() < F64_FORCE, df.max()
    assert ds.max() < F64_STRESS, ds.max()
    assert np.median(de) < F64_MEDIAN_ENERGY_PER_ATOM, np.median(de)
    assert np.median(df) < F64_MEDIAN_FORCE, np.median(df)


def test_float64_within_targets_of_sevenn_as_users_run_it(reference, float64_results):
    de, df, ds = _errors(reference, float64_results, "f32")
    assert de < F32_ENERGY_PER_ATOM and df < F32_FORCE and ds < F32_STRESS, (de, df, ds)


def test_row_form_equals_dense_form(two_blocks, reference, monkeypatch):
    """The model reads the row form of the neighbour list (what relaxations build); a list
    without it (training builds dense lists) gives the same energies, forces and stresses
    to rounding, here on a batch mixing molecules, slabs and crystals of many sizes."""
    frames = reference[::8]
    structures = [structure_from_atoms(a) for a in frames]
    rows = evaluate_structures(structures, two_blocks, stress=True, precision="float64")
    monkeypatch.setattr(type(two_blocks), "row_width", 0)
    dense = evaluate_structures(structures, two_blocks, stress=True, precision="float64")
    for (e1, f1, s1), (e2, f2, s2), atoms in zip(rows, dense, frames, strict=True):
        assert abs(e1 - e2) < 1e-10 * len(atoms)
        np.testing.assert_allclose(f1, f2, atol=1e-10)
        if s1 is not None:
            np.testing.assert_allclose(s1, s2, atol=1e-12)


def test_finished_systems_rows_are_left_out_and_the_others_unchanged(two_blocks, reference):
    """A relaxation step hands the model only its running systems' rows
    (``neighbors.only_systems``): the others' rows are skipped, and the running systems'
    energies, forces and stresses are those of the whole batch's evaluation, exactly."""
    from molopt._jax import jax
    from molopt.engine.kernel import cast_potential
    from molopt.engine.packing import neighbor_lists, pack_structures
    from molopt.neighbors import only_systems

    frames = [a for a in reference if a.pbc.all()][:12:2]
    structures = [structure_from_atoms(a) for a in frames]
    potential = cast_potential(two_blocks, np.float64)
    batch, positions, cells, layout = pack_structures(structures, potential, np.float64)
    nbrs = neighbor_lists(positions, cells, batch.pbc, layout, potential, 0.5, np.float64)
    nbrs = nbrs.to_device()
    keep = np.arange(batch.n_systems) % 2 == 0
    evaluate = jax.jit(lambda n: potential.evaluate(positions, cells, batch, n, True))
    whole = evaluate(nbrs)
    part = evaluate(only_systems(nbrs, jax.numpy.asarray(keep), batch.system_idx))
    for k in range(len(structures)):
        atoms = layout.atoms_of(k)
        if keep[k]:
            assert abs(float(part.energy[k] - whole.energy[k])) < 1e-12 * len(frames[k])
            np.testing.assert_allclose(part.forces[atoms], whole.forces[atoms], atol=1e-12)
            np.testing.assert_allclose(part.dE_dstrain[k], whole.dE_dstrain[k], atol=1e-11)
        else:  # no neighbours: no forces, the isolated atoms' energies
            assert np.all(np.asarray(part.forces[atoms]) == 0.0)
            assert abs(float(part.energy[k] - whole.energy[k])) > 1e-3


def test_default_skin_is_the_potentials_unless_set(sevennet, argon):
    """Relaxations with no skin set use the potential's: 0.5 A for SevenNet (each pair costs
    a radial network per block), 1 A otherwise; a skin given in the settings wins."""
    from molopt.config import build
    from molopt.engine import Engine, EngineSettings
    from molopt.run import engine_settings

    assert Engine(sevennet, EngineSettings()).skin == 0.5
    assert Engine(argon, EngineSettings()).skin == 1.0
    assert Engine(sevennet, EngineSettings(skin=0.8)).skin == 0.8
    assert Engine(sevennet, engine_settings(build())).skin == 0.5
    assert Engine(sevennet, engine_settings(build(skin=1.5))).skin == 1.5


def test_default_batch_atoms_on_a_cpu_is_the_potentials_unless_set(sevennet, argon):
    """On a CPU a SevenNet batch holds 256 atoms unless the settings say otherwise (a step
    of a bigger one takes seconds, and the batch waits for its slowest crystal); other
    potentials, and every potential off a CPU, 32,768."""
    import jax

    from molopt.engine import Engine, EngineSettings
    from molopt.potentials.base import BATCH_ATOMS

    cpu = jax.default_backend() == "cpu"
    assert Engine(sevennet, EngineSettings()).max_batch_atoms == (256 if cpu else BATCH_ATOMS)
    assert Engine(argon, EngineSettings()).max_batch_atoms == BATCH_ATOMS
    assert Engine(sevennet, EngineSettings(max_batch_atoms=999)).max_batch_atoms == 999


def test_a_compaction_is_priced_by_the_rows_its_systems_need(sevennet):
    """The compaction policy prices a move by whether its program is known, and with the
    row form that depends on the rows: ``_rows_needed`` of some systems of a batch is the
    row capacity a batch of those systems alone is built with."""
    from types import SimpleNamespace

    from molopt.engine import Engine, EngineSettings
    from molopt.engine.reporting import Item

    atoms = [bulk("Si", "diamond", a=5.43, cubic=True), bulk("NaCl", "rocksalt", a=5.64)]
    atoms += [bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1), bulk("Mg", "hcp", a=3.21)]
    for k, a in enumerate(atoms):
        a.rattle(0.05, seed=k)
    items = [Item(k, structure_from_atoms(a)) for k, a in enumerate(atoms)]
    engine = Engine(sevennet, EngineSettings())

    def built(chosen):
        batch, positions, cells, layout = engine._pack(chosen)
        host, _ = engine._neighbors(positions, cells, np.asarray(batch.pbc), layout)
        return SimpleNamespace(nbrs_host=host, layout=layout)

    whole = built(items)
    assert engine._rows_needed(whole, [0, 1, 2, 3]) == whole.nbrs_host.shapes[2]
    for subset in ([2], [0, 3], [1, 2, 3]):
        alone = built([items[k] for k in subset])
        assert engine._rows_needed(whole, subset) == alone.nbrs_host.shapes[2], subset


def test_lists_that_grow_run_in_a_program_compiled_before(two_blocks):
    """When a running batch's lists outgrow their rows, the rebuilt lists take the rows of
    a program already compiled for its atoms and systems (within ``row_reuse``), not a new
    shape."""
    import dataclasses

    from molopt.engine import Engine, EngineSettings
    from molopt.engine.reporting import Item

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=1)
    engine = Engine(two_blocks, EngineSettings(relax_cell=True))
    live = engine._launch([Item(0, structure_from_atoms(atoms))], more_waiting=True)
    rows = live.nbrs_host.shapes[2]
    bigger = 3 * rows  # a program with more rows, as if another batch had compiled it
    key = (live.layout.n_padded_atoms, live.layout.n_systems, (0, 0, bigger), 3)
    engine.shapes_seen.add(key)
    compiles = engine.compiles
    squeezed = dataclasses.replace(
        live.state, positions=live.state.positions * 0.75, cell=live.state.cell * 0.75
    )
    live.state = squeezed  # the crystal compressed by 25%: ~2.4x the pairs
    engine._rebuild(live, np.array([0]))
    assert rows < live.nbrs_host.shapes[2] == bigger == live.nbrs.row_index.shape[1]
    assert engine.compiles == compiles  # no new shape


def test_a_new_program_has_room_for_the_systems_of_later_batches(two_blocks):
    """While structures wait, a new SevenNet program (CPU) has room for a quarter as many
    systems as atoms: the later batch of smaller crystals (4 of 4 atoms after 2 of 8) runs in
    the program of the first instead of compiling another, on the same paths. A structure
    relaxed alone gets a program of its own size (nothing waits)."""
    from molopt import neighbors as nl
    from molopt.engine import Engine, EngineSettings
    from molopt.engine.reporting import Item

    structures = []
    for k in range(2):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.05, seed=k)
        structures.append(structure_from_atoms(atoms))
    for k in range(4):
        atoms = bulk("Si", "diamond", a=5.43, orthorhombic=True)
        atoms.rattle(0.05, seed=10 + k)
        structures.append(structure_from_atoms(atoms))
    settings = EngineSettings(fmax=0.15, max_batch_atoms=16)

    def run(floor):
        engine = Engine(two_blocks, settings)
        assert engine.system_floor == (16 // 4 if nl.skips_empty_blocks() else 0)
        engine.system_floor = floor
        engine.compaction_cost = float("inf")  # batches run to their ends
        return engine, {r.key: r for r in engine.run(list(enumerate(structures)))}

    roomy, shared = run(4)
    tight, apart = run(0)
    assert roomy.compiles == 1 and {k[1] for k in roomy.shapes_seen} == {4}
    assert tight.compiles == 2 and {k[1] for k in tight.shapes_seen} == {2, 4}
    for key in range(len(structures)):
        assert shared[key].status == apart[key].status == "converged"
        assert shared[key].steps == apart[key].steps
        assert shared[key].energy == pytest.approx(apart[key].energy, abs=1e-10)
        np.testing.assert_allclose(
            shared[key].structure.positions, apart[key].structure.positions, atol=1e-9
        )
    alone = roomy._launch([Item(9, structures[0])])  # nothing waits: its own systems
    assert alone.layout.n_systems == 1


def test_a_new_batch_runs_in_a_program_compiled_before(two_blocks, monkeypatch):
    """A batch whose row-form lists fit a program compiled before (the same padded atoms, at
    least its systems, at most ``ROW_REUSE`` (2x on a CPU) its rows) runs in that program
    instead of compiling another, and each structure follows the same path as with a
    program of its own."""
    from molopt.engine import Engine, EngineSettings
    from molopt.engine import scheduler as E

    structures = []
    for k, a in enumerate([5.43, 5.43, 6.6, 6.6]):  # two dense, then two stretched
        atoms = bulk("Si", "diamond", a=a, cubic=True)
        atoms.rattle(0.05, seed=k)
        structures.append(structure_from_atoms(atoms))
    settings = EngineSettings(fmax=0.15, max_batch_atoms=16)

    def run(reuse):
        monkeypatch.setattr(E, "ROW_REUSE", reuse)
        engine = Engine(two_blocks, settings)
        engine.compaction_cost = float("inf")  # a batch runs to its end: two batches
        results = {r.key: r for r in engine.run(list(enumerate(structures)))}
        return engine, results

    shared, reused = run(2.0)
    apart, own = run(1.0)
    (dense_key,) = {k[2][2] for k in shared.shapes_seen}  # one program: the dense batch's
    assert len(apart.shapes_seen) == 2 and shared.compiles == 1
    assert {k[2][2] for k in apart.shapes_seen} - {dense_key}  # the stretched need fewer
    for key in range(4):
        assert reused[key].status == own[key].status == "converged"
        assert reused[key].steps == own[key].steps
        assert reused[key].energy == pytest.approx(own[key].energy, abs=1e-10)
        np.testing.assert_allclose(
            reused[key].structure.positions, own[key].structure.positions, atol=1e-9
        )


def _float32_within_targets(sevennet, frames):
    structures = [structure_from_atoms(a) for a in frames]
    results = evaluate_structures(structures, sevennet, stress=True, precision="float32")
    de, df, ds = _errors(frames, results, "f32")
    assert de < F32_ENERGY_PER_ATOM and df < F32_FORCE and ds < F32_STRESS, (de, df, ds)


def test_float32_within_targets(sevennet, reference):
    """molopt float32 against sevenn float32: every third reference structure here (the
    float64 tests cover all 171), all of them with ``-m slow``."""
    _float32_within_targets(sevennet, reference[::3])


@pytest.mark.slow
def test_float32_within_targets_on_every_structure(sevennet, reference):
    _float32_within_targets(sevennet, reference)


@pytest.mark.parametrize("precision", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
def test_sevennet_l3i5_within_targets(precision):
    """SevenNet-l3i5 (features to l = 3, polynomial envelope) converts with the same code:
    six structures against sevenn's float32 calculator (data/sevennet/make_reference_l3i5.py;
    measured in float64: 1.1e-6 eV/atom, 1.1e-5 eV/A, 2.7e-7 eV/A^3)."""
    frames = ase.io.read(ROOT / "data" / "sevennet" / "reference-l3i5.extxyz", ":")
    potential = registry.load("sevennet-l3i5").potential
    results = evaluate_structures(
        [structure_from_atoms(a) for a in frames], potential, precision=precision
    )
    de, df, ds = _errors(frames, results, "f32")
    assert de < F32_ENERGY_PER_ATOM and df < F32_FORCE and ds < F32_STRESS, (de, df, ds)


#: the default suite's share of the relaxation comparison (one of each kind: an oxide, a
#: metal, a molecule); all ten run with ``-m slow`` (the same code: 110 s against 25 s of CI)
QUICK_RELAXATIONS = ("rocksalt-MgO", "fcc-Cu", "molecule-H2O")


def _relaxations_equal_ase_fire_with_sevenn(labels=None):
    import molopt

    frames = ase.io.read(ROOT / "data" / "sevennet" / "relax_reference.extxyz", ":")
    pairs = [
        (start, minimum)
        for start, minimum in zip(frames[0::2], frames[1::2], strict=True)
        if labels is None or start.info["label"] in labels
    ]
    assert len(pairs) == (10 if labels is None else len(labels))
    starts = [start for start, _ in pairs]
    relaxed = molopt.relax(starts, potential="sevennet-0", optimizer="fire", fmax=0.005)
    for (start, theirs), mine in zip(pairs, relaxed, strict=True):
        shift = mine.positions - theirs.positions
        shift -= shift.mean(axis=0)
        rmsd = np.sqrt((shift**2).sum(axis=1).mean())
        de = (mine.get_potential_energy() - theirs.info["f32_energy"]) / len(start)
        label = start.info["label"]
        assert mine.info["molopt_steps"] == theirs.info["steps"], label
        assert rmsd < 1e-5 and abs(de) < 1e-5, (label, rmsd, de)


def test_relaxations_equal_ase_fire_with_sevenn():
    """From the same rattled starts, molopt's FIRE with SevenNet-0 in float64 and ASE's FIRE
    with sevenn's calculator (data/sevennet/make_relax_reference.py) take the same number of
    steps to fmax 0.005 eV/A and end at the same minimum: an oxide, a metal and a molecule
    here, all ten structures under ``-m slow``."""
    _relaxations_equal_ase_fire_with_sevenn(QUICK_RELAXATIONS)


@pytest.mark.slow
def test_all_relaxations_equal_ase_fire_with_sevenn():
    """All ten structures of the reference (oxides, a fluoride, a semiconductor, a metal, a
    slab with an adsorbate, molecules). Measured: RMSD <= 1.3e-6 A, |dE| <= 4.7e-7 eV/atom
    (the issue's targets: 1e-3 A, 1e-4 eV/atom)."""
    _relaxations_equal_ase_fire_with_sevenn()


def test_rotation_and_translation_invariance(sevennet):
    """Energy invariant, forces and stress rotate with the structure (equivariance of the
    spherical-harmonic features, checked away from the reference file)."""
    atoms = bulk("ZnO", "wurtzite", a=3.25, c=5.21).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=3)
    angle = np.deg2rad(37.0)
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    turned = atoms.copy()
    turned.set_cell(atoms.cell[:] @ rot.T, scale_atoms=False)
    turned.positions = atoms.positions @ rot.T + np.array([0.3, -1.1, 2.0])
    (e0, f0, s0), (e1, f1, s1) = evaluate_structures(
        [structure_from_atoms(atoms), structure_from_atoms(turned)], sevennet
    )
    assert abs(e1 - e0) < 1e-10
    np.testing.assert_allclose(f1, f0 @ rot.T, atol=1e-9)
    np.testing.assert_allclose(s1, rot @ s0 @ rot.T, atol=1e-10)


def test_relax_an_oxide_with_cell_from_the_command_line(tmp_path):
    """`molopt relax --potential sevennet-0 --relax-cell` on a strained, rattled MgO file:
    converges, says which potential, and lands near MgO's PBE lattice constant (4.26 A here;
    MPtrj's PBE gives about 4.25)."""
    import json

    from typer.testing import CliRunner

    from molopt.cli import app

    atoms = bulk("MgO", "rocksalt", a=4.4)
    atoms.rattle(0.03, seed=5)
    ase.io.write(tmp_path / "mgo.extxyz", atoms)
    args = ["relax", str(tmp_path / "mgo.extxyz"), "--potential", "sevennet-0", "--relax-cell"]
    result = CliRunner().invoke(app, args + ["--json", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert record["status"] == "converged" and record["potential"] == "sevennet-0"
    relaxed = ase.io.read(tmp_path / "out" / "mgo.extxyz")
    a = relaxed.cell.lengths()[0] * np.sqrt(2.0)  # primitive fcc cell -> cubic constant
    assert 4.22 < a < 4.30, a


def test_element_outside_the_model_is_a_clear_error(tmp_path):
    """Po (84) is not among SevenNet-0's 89 elements: that structure fails alone, named."""
    from typer.testing import CliRunner

    from molopt.cli import app

    ase.io.write(tmp_path / "po.xyz", Atoms("Po2", positions=[[0, 0, 0], [2.8, 0, 0]]))
    result = CliRunner().invoke(
        app,
        ["relax", str(tmp_path / "po.xyz"), "--potential", "sevennet-0", "-o", str(tmp_path)],
    )
    assert result.exit_code == 1
    assert "po.xyz" in result.output and "Po" in result.output
    assert "Traceback" not in result.output


def test_modified_weights_are_refused(tmp_path):
    for suffix in (".toml", ".npz"):
        shutil.copy(ROOT / "potentials" / f"sevennet-0{suffix}", tmp_path)
    weights = tmp_path / "sevennet-0.npz"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(PotentialError, match="corrupt or modified"):
        _ = registry.load(tmp_path / "sevennet-0.toml").potential


def test_sevennet_is_never_chosen_implicitly():
    with pytest.raises(PotentialError, match="no shipped potential covers"):
        registry.choose([11, 17])


def test_converter_without_sevenn_says_how_to_install(tmp_path):
    """Run with a Python that cannot import sevenn (an empty module path for it)."""
    blocker = tmp_path / "sevenn.py"
    blocker.write_text("raise ImportError('blocked for this test')\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "data" / "sevennet" / "convert.py")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode != 0
    assert "pip install sevenn" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.sevenn
def test_live_against_sevenn_calculator(sevennet):
    """With sevenn installed: its ASE calculator on fresh structures, float32 targets."""
    calculator = pytest.importorskip("sevenn.calculator")
    calc = calculator.SevenNetCalculator("7net-0", device="cpu")
    frames = [bulk("MgO", "rocksalt", a=4.2).repeat(2), bulk("Si", "diamond", a=5.43)]
    for k, atoms in enumerate(frames):
        atoms.rattle(0.05, seed=k)
    mine = evaluate_structures([structure_from_atoms(a) for a in frames], sevennet)
    for atoms, (energy, forces, stress) in zip(frames, mine, strict=True):
        atoms.calc = calc
        assert abs(energy - atoms.get_potential_energy()) / len(atoms) < F32_ENERGY_PER_ATOM
        assert np.abs(forces - atoms.get_forces()).max() < F32_FORCE
        assert np.abs(stress - atoms.get_stress(voigt=False)).max() < F32_STRESS


def test_fine_tuning_from_sevennet_0_lowers_held_out_errors(tmp_path):
    """`molopt train --init sevennet-0` on a user's labelled data (GFN2-xTB molecules, far
    from SevenNet-0's PBE crystals): the energy zero levels are refitted per element, the
    fitted weights move and the architecture's constants do not, and the written potential
    (a SevenNet card + .npz beside it, with provenance) loads and has lower force errors than
    SevenNet-0 on a molecule never trained on (measured: 274 -> 169 meV/A after 3 epochs).
    data/sevennet/finetune.py is the full example."""
    import json
    import tomllib

    from typer.testing import CliRunner

    from molopt.cli import app
    from molopt.training.data import read_labelled
    from molopt.training.evaluate import errors

    data = read_labelled([ROOT / "data" / "neural" / "gfn2-chno" / "test.extxyz.gz"])
    by_molecule: dict = {}
    for d in data:  # 8 configurations of each molecule, in order
        key = (d.structure.n_atoms, tuple(np.bincount(d.structure.numbers, minlength=9)))
        by_molecule.setdefault(key, []).append(d)
    molecules = sorted(by_molecule)
    frames = {}
    # training on the two smallest, C2H2O and C2H4O2 (5 and 8 atoms: one neighbour-slot rung,
    # one compiled training step), testing on C3H6O
    for name, picked in (("train", molecules[:2]), ("held", molecules[3:4])):
        frames[name] = []
        for key in picked:
            for d in by_molecule[key]:
                atoms = Atoms(d.structure.numbers, d.structure.positions)
                atoms.info["energy"] = d.energy
                atoms.arrays["forces"] = d.forces
                frames[name].append(atoms)
        ase.io.write(tmp_path / f"{name}.extxyz", frames[name])
    assert {el for a in frames["train"] for el in a.symbols} == {"H", "C", "O"}
    assert {el for a in frames["held"] for el in a.symbols} == {"H", "C", "O"}
    config = tmp_path / "ft.toml"
    config.write_text(
        'name = "ft"\nreference_method = "GFN2-xTB"\nepochs = 3\nbatch_atoms = 64\n'
        "batch_structures = 8\nlearning_rate = 1e-3\nfinal_learning_rate = 1e-4\n"
        "warmup_steps = 1\nforce_weight = 10.0\nrefit_energy_offsets = true\n"
        'keep = "last"\nvalid_fraction = 0.2\nprecision = "float32"\n'
    )
    out = tmp_path / "out"
    args = ["train", str(tmp_path / "train.extxyz"), "-c", str(config), "--init", "sevennet-0"]
    args += ["-o", str(out), "--test", str(tmp_path / "held.extxyz"), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    card = tomllib.loads((out / "ft.toml").read_text())
    assert card["kind"] == "sevennet" and card["training"]["init"]["potential"] == "sevennet-0"
    assert card["provenance"]["package"] == "sevenn" and "MIT" in card["provenance"]["licence"]
    offsets = card["training"]["init"]["energy_offsets_eV"]
    assert set(offsets) == {"H", "C", "O"} and min(offsets.values()) < -10.0  # GFN2 zero level
    tuned = registry.load(out / "ft.toml").potential
    base = registry.load("sevennet-0").potential
    for key, value in base.weights.items():
        mine = np.asarray(tuned.weights[key])
        if key.startswith(("w3j/", "act/")) or key.endswith("/denominator"):
            assert np.array_equal(mine, value), key
    rows = [k for k, z in enumerate(base.elements) if z not in (1, 6, 8)]
    for key in ("embedding", "shift", "scale"):  # elements absent from the data: untouched
        assert np.array_equal(
            np.asarray(tuned.weights[key])[rows], np.asarray(base.weights[key])[rows]
        )
    assert not np.array_equal(tuned.weights["0/radial/0"], base.weights["0/radial/0"])
    held = read_labelled([tmp_path / "held.extxyz"])
    before, after = errors(base, held, "float32"), card["errors"]
    assert after["force_mae_meV_per_A"] < 0.8 * before["force_mae_meV_per_A"], (before, after)
    # energies on the zero level of the data after the refit (two compositions cannot fix
    # three elements' offsets for another molecule: checked on the training molecules)
    history = json.loads((out / "checkpoints" / "state.json").read_text())["history"]
    assert history[-1]["valid_energy_mae_meV_per_atom"] < 100.0
    assert before["energy_mae_meV_per_atom"] > 10_000.0  # SevenNet-0's own zero level


def _frame(reference, label):
    (atoms,) = [a for a in reference if a.info["label"] == label]
    return atoms


def test_calculator_and_fixed_atoms_with_sevennet(reference):
    """MoloptCalculator("sevennet-0") gives sevenn's float64 results; a slab with its bottom
    layer fixed (FixAtoms) relaxes with molopt's L-BFGS step for step as ASE's LBFGS with that
    calculator, and the fixed atoms never move."""
    from ase.constraints import FixAtoms
    from ase.optimize import LBFGS

    import molopt
    from molopt.ase import MoloptCalculator

    calc = MoloptCalculator("sevennet-0")
    molecule = _frame(reference, "molecule-CH3CH2OH")
    atoms = Atoms(molecule.numbers, molecule.positions)
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    assert abs(energy - molecule.info["f64_energy"]) / len(atoms) < F64_ENERGY_PER_ATOM
    assert np.abs(forces - molecule.arrays["f64_forces"]).max() < F64_FORCE

    frame = _frame(reference, "slab-Pt111-O")
    slab = Atoms(frame.numbers, frame.positions, cell=frame.cell, pbc=frame.pbc)
    bottom = slab.positions[:, 2] < slab.positions[:, 2].min() + 1.0
    assert 0 < bottom.sum() < len(slab) - 1
    slab.set_constraint(FixAtoms(mask=bottom))
    theirs = slab.copy()
    theirs.calc = calc
    optimizer = LBFGS(theirs, logfile=None)
    optimizer.run(fmax=0.01, steps=500)
    mine = molopt.relax(slab, "sevennet-0", "lbfgs", fmax=0.01)
    assert mine.info["molopt_status"] == "converged"
    assert mine.info["molopt_steps"] == optimizer.nsteps
    np.testing.assert_allclose(mine.positions, theirs.positions, atol=1e-6)
    np.testing.assert_array_equal(mine.positions[bottom], slab.positions[bottom])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fire2", "bfgs"])
def test_other_optimizers_with_sevennet_as_ase(reference, name):
    """FIRE2 and BFGS with SevenNet-0 step for step as ASE's with MoloptCalculator (FIRE runs
    against sevenn itself in the relaxation tests, L-BFGS in the FixAtoms test)."""
    from ase.optimize import BFGS
    from ase.optimize.fire2 import FIRE2

    import molopt
    from molopt.ase import MoloptCalculator

    frame = _frame(reference, "molecule-CH3CH2OH")
    atoms = Atoms(frame.numbers, frame.positions)
    theirs = atoms.copy()
    theirs.calc = MoloptCalculator("sevennet-0")
    optimizer = {"fire2": FIRE2, "bfgs": BFGS}[name](theirs, logfile=None)
    optimizer.run(fmax=0.01, steps=1000)
    mine = molopt.relax(atoms, "sevennet-0", name, fmax=0.01)
    assert mine.info["molopt_steps"] == optimizer.nsteps
    np.testing.assert_allclose(mine.positions, theirs.positions, atol=1e-5)


@pytest.mark.slow
def test_hessian_and_implicit_gradients_through_sevennet(tmp_path, sevennet, reference):
    """`molopt hessian -p sevennet-0` on relaxed water gives ASE's finite-difference
    frequencies (Vibrations with MoloptCalculator), and the implicit derivative of its O-H
    bond length with respect to a network weight equals a central difference of two
    relaxations."""
    import json

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from ase.optimize import BFGS
    from ase.vibrations import Vibrations
    from typer.testing import CliRunner

    from molopt.analysis.implicit import relax_implicit
    from molopt.ase import MoloptCalculator
    from molopt.cli import app

    frame = _frame(reference, "molecule-H2O")
    water = Atoms(frame.numbers, frame.positions)
    water.calc = MoloptCalculator("sevennet-0")
    BFGS(water, logfile=None).run(fmax=1e-5)
    vib = Vibrations(water, name=str(tmp_path / "vib"), delta=0.005, nfree=4)
    vib.run()
    reference_cm1 = np.real(vib.get_frequencies())[-3:]  # the three vibrations
    ase.io.write(tmp_path / "water.xyz", water)
    result = CliRunner().invoke(
        app, ["hessian", str(tmp_path / "water.xyz"), "-p", "sevennet-0", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_imaginary"] == 0
    np.testing.assert_allclose(data["frequencies_cm1"][-3:], reference_cm1, rtol=2e-3)

    start = structure_from_atoms(Atoms(frame.numbers, frame.positions))
    key = "readout/energy"

    def bond(model):
        (r,) = relax_implicit(model, [start], fmax=1e-7)
        return jnp.linalg.norm(r.positions[1] - r.positions[0])

    def with_weight(value):
        weights = dict(sevennet.weights)
        weights[key] = weights[key].at[3, 0].set(value)
        return eqx.tree_at(lambda m: m.weights, sevennet, weights)

    grad = float(jax.grad(bond)(sevennet).weights[key][3, 0])
    w0 = float(sevennet.weights[key][3, 0])
    h = 1e-3
    fd = (float(bond(with_weight(w0 + h))) - float(bond(with_weight(w0 - h)))) / (2 * h)
    assert abs(grad) > 1e-6
    assert grad == pytest.approx(fd, rel=1e-3)


@pytest.mark.slow
def test_thirty_relaxations_with_and_without_cell_reach_sevenns_minima():
    """Thirty structures at fixed cell and thirty crystals with the cell relaxed, from the
    same starts: molopt's FIRE with SevenNet-0 (float64) reaches the minima of ASE's FIRE (+
    FrechetCellFilter) with sevenn's float32 calculator within the issue's targets
    (data/sevennet/relax_parity.py prints the table)."""
    sys.path.insert(0, str(ROOT / "data" / "sevennet"))
    from relax_parity import compare

    rows = compare()
    assert sum(not r["relax_cell"] for r in rows) == 30 and sum(r["relax_cell"] for r in rows) == 30
    for r in rows:
        assert r["status"] == "converged" and r["ase_converged"], r
        assert r["rmsd_A"] <= 1e-3 and r["cell_A"] <= 1e-3, r
        assert abs(r["dE_eV_per_atom"]) <= 1e-4, r
