"""Neural potentials: derivatives, invariances, padding, files, training, shipped models."""

import json
import shutil
from pathlib import Path

import ase.io
import jax
import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.cluster import Icosahedron
from conftest import structure_from_atoms
from typer.testing import CliRunner

from molopt import testing
from molopt.cli import app
from molopt.engine import evaluate_structures
from molopt.errors import PotentialError
from molopt.potentials.neural.io import save_neural
from molopt.potentials.neural.painn import PaiNN
from molopt.potentials.registry import load

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def small_model():
    return PaiNN(
        [29, 79],
        cutoff=4.5,
        n_features=16,
        n_radial=8,
        n_layers=2,
        key=jax.random.PRNGKey(3),
        reference=[-0.1, -0.2],
        scale=0.5,
    )


def alloy_cell():
    atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1))
    atoms.numbers[[1, 2]] = 79
    atoms.rattle(0.1, seed=1)
    return structure_from_atoms(atoms)


def cluster():
    atoms = Icosahedron("Cu", 2, latticeconstant=3.6)
    atoms.numbers[:4] = 79
    atoms.rattle(0.1, seed=2)
    return structure_from_atoms(atoms)


@pytest.mark.parametrize("make", [alloy_cell, cluster])
def test_finite_difference_forces(small_model, make):
    assert testing.finite_difference_forces(make(), small_model, atoms=range(3)) < 1e-7


def test_finite_difference_stress(small_model):
    assert testing.finite_difference_stress(alloy_cell(), small_model) < 1e-8


@pytest.mark.parametrize("make", [alloy_cell, cluster])
def test_invariances(small_model, make):
    assert max(testing.invariance(make(), small_model).values()) < 1e-10


def test_batch_equals_single_and_padding(small_model):
    structures = [alloy_cell(), cluster(), alloy_cell()]
    assert testing.batch_versus_single(structures, small_model) < 1e-11
    import jax.numpy as jnp

    from molopt import batch as B
    from molopt import neighbors as N

    s = cluster()
    batch, pos, cells, layout = B.pack([s], small_model.species_of(s.numbers), np.float64)
    assert layout.n_padded_atoms > s.n_atoms
    nbrs = N.build(pos, cells, np.asarray(batch.pbc), layout, small_model.cutoff, 0.5)
    ev = small_model.evaluate(jnp.asarray(pos), jnp.asarray(cells), batch, nbrs.to_device(), True)
    assert np.all(np.asarray(ev.forces)[s.n_atoms :] == 0.0)
    atomic = small_model.atomic_energies(
        jnp.asarray(pos), jnp.asarray(cells), batch, nbrs.to_device()
    )
    assert np.all(np.asarray(atomic)[s.n_atoms :] == 0.0)


@pytest.mark.parametrize("rows_per_group", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_message_slot_groups_equal_all_at_once(small_model, rows_per_group, monkeypatch):
    """On CPU large neighbour tables are summed over groups of slots in a checkpointed scan:
    the same energies, forces, dE/dstrain and parameter gradients of a force loss (the
    second-order derivative that training takes) as all slots at once."""
    import equinox as eqx
    import jax.numpy as jnp

    from molopt import batch as B
    from molopt import neighbors as N

    structures = [alloy_cell(), cluster()]
    species = {}
    for s in structures:
        species.update(small_model.species_of(s.numbers))
    batch, pos, cells, layout = B.pack(structures, species, np.float64)
    nbrs = N.build(pos, cells, np.asarray(batch.pbc), layout, small_model.cutoff, 0.5)
    nbrs = nbrs.to_device()
    K, A = nbrs.index.shape
    p, c = jnp.asarray(pos), jnp.asarray(cells)
    target = jnp.asarray(np.random.default_rng(0).normal(size=pos.shape))

    def run():
        evaluate_fn = eqx.filter_jit(lambda m, p, c: m.evaluate(p, c, batch, nbrs, True))

        def loss(m):
            return jnp.sum((m.evaluate(p, c, batch, nbrs, False).forces - target) ** 2)

        grads = eqx.filter_jit(eqx.filter_grad(loss))(small_model)
        return evaluate_fn(small_model, p, c), jax.tree.leaves(eqx.filter(grads, eqx.is_array))

    at_once, grads_at_once = run()
    monkeypatch.setattr(N.jax, "default_backend", lambda: "cpu")  # groups are a CPU layout
    monkeypatch.setattr(N, "SLOT_GROUP_ABOVE_BYTES", 0)
    monkeypatch.setattr(N, "SLOT_GROUP_BYTES", rows_per_group * A * 3 * small_model.n_features * 8)
    group = N.slot_group(K, A * 3 * small_model.n_features, 8)
    assert group <= rows_per_group < K and K % group == 0
    grouped, grads_grouped = run()
    # float64 weights with float32 coordinates: the group sums take the wider type
    mixed = small_model.evaluate(p.astype(jnp.float32), c.astype(jnp.float32), batch, nbrs, False)
    assert np.all(np.isfinite(np.asarray(mixed.forces)))
    np.testing.assert_allclose(grouped.energy, at_once.energy, rtol=1e-13)
    np.testing.assert_allclose(grouped.forces, at_once.forces, atol=1e-12)
    np.testing.assert_allclose(grouped.dE_dstrain, at_once.dE_dstrain, atol=1e-11)
    assert np.abs(np.asarray(at_once.forces)).max() > 1e-3
    for a, b in zip(grads_grouped, grads_at_once, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_save_load_round_trip_and_tampering(small_model, tmp_path):
    path = save_neural(small_model, tmp_path, "tiny", {"description": "test"})
    loaded = load(path).potential
    s = alloy_cell()
    ((e1, f1, _),) = evaluate_structures([s], small_model)
    ((e2, f2, _),) = evaluate_structures([s], loaded)
    assert e2 == pytest.approx(e1, abs=1e-5)  # weights are stored in float32
    np.testing.assert_allclose(f2, f1, atol=1e-5)
    # a card whose architecture does not fit its (intact) weights
    card = path.read_text()
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(card.replace("n_features = 16", "n_features = 32"))
    assert wrong.read_text() != card
    with pytest.raises(PotentialError, match="cannot be read"):
        _ = load(wrong).potential
    weights = tmp_path / "tiny.eqx"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PotentialError, match="corrupt or modified"):
        _ = load(path).potential
    weights.unlink()
    with pytest.raises(PotentialError, match="missing"):
        _ = load(path).potential


def test_shipped_emt_potential_matches_emt_and_refuses_argon(tmp_path):
    from ase.calculators.emt import EMT

    spec = load("nn-emt-metals")
    assert spec.kind == "neural" and spec.data["errors"]["force_mae_meV_per_A"] <= 30
    slab = fcc111("Cu", size=(2, 2, 3), a=3.61, vacuum=6.0)
    slab.numbers[-1] = 79
    slab.rattle(0.05, seed=3)
    ((energy, forces, _),) = evaluate_structures([structure_from_atoms(slab)], spec.potential)
    slab.calc = EMT()
    assert np.abs(forces - slab.get_forces()).mean() < 0.03
    assert (
        testing.finite_difference_forces(structure_from_atoms(slab), spec.potential, atoms=[0, 11])
        < 1e-6
    )
    ase.io.write(tmp_path / "ar.xyz", bulk("Ar", "fcc", a=5.26).repeat((2, 1, 1)))
    result = runner.invoke(
        app,
        [
            "relax",
            str(tmp_path / "ar.xyz"),
            "-p",
            "nn-emt-metals",
            "-o",
            str(tmp_path / "o"),
            "--json",
        ],
    )
    rec = json.loads(result.stdout.splitlines()[0])
    assert rec["status"] == "failed" and "Ar not covered" in rec["error"]


def test_relax_slab_and_cluster_with_shipped_potential(tmp_path):
    slab = fcc111("Pt", size=(2, 2, 3), a=3.92, vacuum=6.0)
    slab.rattle(0.05, seed=4)
    ase.io.write(tmp_path / "slab.extxyz", slab)
    cl = Icosahedron("Ag", 2, latticeconstant=4.09)
    cl.rattle(0.05, seed=5)
    ase.io.write(tmp_path / "cluster.xyz", cl)
    result = runner.invoke(
        app,
        [
            "relax",
            str(tmp_path / "slab.extxyz"),
            str(tmp_path / "cluster.xyz"),
            "-p",
            "nn-emt-metals",
            "-o",
            str(tmp_path / "o"),
            "--json",
            "--fmax",
            "0.01",
        ],
    )
    assert result.exit_code == 0, result.output
    assert {json.loads(x)["status"] for x in result.stdout.splitlines()} == {"converged"}


def test_potential_chosen_automatically_for_metals(tmp_path):
    cl = Icosahedron("Cu", 2, latticeconstant=3.61)
    ase.io.write(tmp_path / "cu13.xyz", cl)
    result = runner.invoke(app, ["relax", str(tmp_path / "cu13.xyz"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0 and "nn-emt-metals" in result.stderr


def readme_row(name: str) -> str:
    """The README's table row of the shipped potential ``name``."""
    rows = [r for r in (ROOT / "README.md").read_text().splitlines() if r.startswith(f"| `{name}`")]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("name", ["nn-emt-metals", "nn-gfn2-chno"])
def test_shipped_network_test_errors_equal_its_card(name):
    """The shipped networks' test-set errors, recomputed on the card's test data, equal the
    card's figures (which round to the README's). The evaluation is float64 and deterministic
    (it reproduces the cards to ~1e-14 meV); 0.01 meV/A and meV/atom leave room for another
    summation order and catch any change of the weights, the model or the data (about 35 s on
    2 cores for both)."""
    from molopt.training.data import read_labelled
    from molopt.training.evaluate import errors

    spec = load(name)
    card = spec.data["errors"]
    got = errors(spec.potential, read_labelled([ROOT / p for p in card["test_data"]]))
    assert (got["n_configurations"], got["n_atoms"]) == (
        card["n_configurations"],
        card["n_atoms"],
    )
    for key in (
        "energy_mae_meV_per_atom",
        "energy_rmse_meV_per_atom",
        "force_mae_meV_per_A",
        "force_rmse_meV_per_A",
    ):
        assert got[key] == pytest.approx(card[key], abs=0.01), key
    assert set(got["per_element"]) == set(card["per_element"])
    for symbol, figures in card["per_element"].items():
        mae = got["per_element"][symbol]["force_mae_meV_per_A"]
        assert mae == pytest.approx(figures["force_mae_meV_per_A"], abs=0.01), symbol
    # the README's claim, e.g. "4.3 meV/A (energy 4.5 meV/atom)", is the card's, rounded
    force, energy = card["force_mae_meV_per_A"], card["energy_mae_meV_per_atom"]
    assert f"| {force:.1f} meV/A (energy {energy:.1f} meV/atom) |" in readme_row(name)


# per structure, recomputed vs the shipped table (RMSD A, dE meV/atom). On one machine the
# rows reproduce to 1e-15 A and 1e-11 meV/atom (the engine relaxes each system as if alone, and
# tblite is deterministic here); what is left is rounding changed by later code or another
# machine, which moves a minimum at fmax 0.005 eV/A by up to ~F/k: recomputed in full on
# 2026-12-06, one row of the EMT table (alloy cluster 8) differed by 3e-4 A and 1e-3 meV/atom,
# the other 23 and all 24 GFN2 rows agreed to the 5 decimals compared. A 1% change of one weight
# matrix of nn-emt-metals, a 5% one of nn-gfn2-chno, or fmax 0.02, moves some row by more
VALIDATION_TOLERANCE = {"nn-emt-metals": (5e-4, 2e-3), "nn-gfn2-chno": (5e-4, 5e-3)}


def claimed_validation_medians(name: str) -> tuple[str, str]:
    """The README's claimed median RMSD (A) and median |dE| (meV/atom), as written."""
    import re

    found = re.search(
        r"median RMSD ([0-9.]+) A, median \\\|dE\\\| ([0-9.]+) meV/atom", readme_row(name)
    )
    assert found, readme_row(name)
    return found.group(1), found.group(2)


def rounds_to(value: float, claim: str) -> bool:
    return round(value, len(claim.split(".")[1])) == float(claim)


def recompute_validation(name: str, limit: int | None) -> tuple[dict, dict]:
    """Relax the first ``limit`` validation starts again (data/neural/validate.py) and hold
    them, row by row, to the shipped table; check the table holds the README's claims."""
    import sys

    sys.path.insert(0, str(ROOT / "data" / "neural"))
    import validate

    shipped = json.loads((ROOT / "potentials" / f"{name}.validation.json").read_text())
    rows = shipped["structures"]
    recomputed = validate.main(name, limit=limit, write=False)
    tol_rmsd, tol_de = VALIDATION_TOLERANCE[name]
    assert len(recomputed["structures"]) == (limit or 24)
    for got, expected in zip(recomputed["structures"], rows, strict=False):
        what = (got["structure"], got["formula"])
        assert what == (expected["structure"], expected["formula"])
        assert got["network_status"] == "converged", what
        assert got["rmsd_A"] == pytest.approx(expected["rmsd_A"], abs=tol_rmsd), what
        assert got["dE_meV_per_atom"] == pytest.approx(expected["dE_meV_per_atom"], abs=tol_de)
    # the shipped table: 24 held-out starts, all converged, at the script's fmax, medians of
    # its own rows, and those medians are the README's claims (as rounded there)
    assert shipped["n_structures"] == len(rows) == 24
    assert shipped["fmax_eV_per_A"] == validate.FMAX == 0.005
    assert {r["network_status"] for r in rows} == {"converged"}
    assert shipped["median_rmsd_A"] == np.median([r["rmsd_A"] for r in rows])
    assert shipped["median_abs_dE_meV_per_atom"] == np.median(
        [abs(r["dE_meV_per_atom"]) for r in rows]
    )
    claim_rmsd, claim_de = claimed_validation_medians(name)
    assert rounds_to(shipped["median_rmsd_A"], claim_rmsd), claim_rmsd
    assert rounds_to(shipped["median_abs_dE_meV_per_atom"], claim_de), claim_de
    return recomputed, shipped


@pytest.mark.parametrize("name", ["nn-emt-metals", "nn-gfn2-chno"])
def test_validation_table_recomputed_on_a_subset(name):
    """The first 4 of the 24 validation structures (one of each kind for EMT: cluster, slab,
    vacancy, alloy cluster), about 30 s each on 2 cores; all 24 in the slow test below (6 min
    for EMT, whose reference is ASE's Python EMT, 3.5 min for GFN2)."""
    if name == "nn-gfn2-chno":
        pytest.importorskip("tblite")
    recompute_validation(name, limit=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nn-emt-metals", "nn-gfn2-chno"])
def test_validation_medians_recomputed(name):
    """All 24 structures: the recomputed medians are the README's claims and the table's."""
    if name == "nn-gfn2-chno":
        pytest.importorskip("tblite")
    recomputed, shipped = recompute_validation(name, limit=None)
    claim_rmsd, claim_de = claimed_validation_medians(name)
    tol_rmsd, tol_de = VALIDATION_TOLERANCE[name]
    assert rounds_to(recomputed["median_rmsd_A"], claim_rmsd)
    assert rounds_to(recomputed["median_abs_dE_meV_per_atom"], claim_de)
    assert recomputed["median_rmsd_A"] == pytest.approx(shipped["median_rmsd_A"], abs=tol_rmsd)
    assert recomputed["median_abs_dE_meV_per_atom"] == pytest.approx(
        shipped["median_abs_dE_meV_per_atom"], abs=tol_de
    )


def write_emt_cuau(path: Path, count: int, amplitude: float, first_seed: int = 0) -> Path:
    """``count`` rattled Cu3Au cells labelled by ASE EMT (energy, forces, stress) as extxyz."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    images = []
    for seed in range(first_seed, first_seed + count):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.numbers[0] = 79
        atoms.rattle(amplitude, seed=seed)
        atoms.calc = EMT()
        results = {
            "energy": atoms.get_potential_energy(),
            "forces": atoms.get_forces(),
            "stress": atoms.get_stress(),
        }
        atoms.calc = SinglePointCalculator(atoms, **results)
        images.append(atoms)
    ase.io.write(path, images)
    return path


def tiny_train_toml(path: Path, extra: str = "") -> Path:
    path.write_text(
        'name = "tiny-cuau"\nreference_method = "EMT"\ncutoff = 4.0\n'
        "n_features = 8\nn_radial = 6\nn_layers = 1\nepochs = 2\n"
        "batch_atoms = 16\nbatch_structures = 4\ncheckpoint_every = 1\n" + extra
    )
    return path


def test_train_resume_evaluate_cli(tmp_path):
    write_emt_cuau(tmp_path / "data.extxyz", 12, 0.1)
    config = tiny_train_toml(tmp_path / "t.toml")
    out = tmp_path / "model"
    args = ["train", str(tmp_path / "data.extxyz"), "-c", str(config), "-o", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    card = (out / "tiny-cuau.toml").read_text()
    assert "weights_sha256" in card and "reference_method" in card
    written = (out / "tiny-cuau.eqx").read_bytes()
    # an earlier training there is never replaced silently
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    # training is seeded (initial weights, split, batch order): a second run into the same
    # directory with --overwrite starts over, ignores the checkpoints there and writes the
    # same weights byte for byte
    again = runner.invoke(app, args + ["--overwrite"])
    assert again.exit_code == 0, again.output
    assert (out / "tiny-cuau.eqx").read_bytes() == written
    resumed = runner.invoke(app, args + ["--resume", "--epochs", "3"])
    assert resumed.exit_code == 0, resumed.output
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 3
    # --resume continues from the checkpointed weights and Adam moments: 2 epochs + resume to
    # 3 is the 3-epoch run, bit for bit (all 9 steps are inside the 200-step warm-up, so the
    # learning rate does not depend on the planned number of epochs)
    straight = tmp_path / "straight"
    done = runner.invoke(app, args[:-1] + [str(straight), "--epochs", "3"])
    assert done.exit_code == 0, done.output
    assert_same_training(out, straight, "tiny-cuau")
    evaluated = runner.invoke(
        app,
        [
            "evaluate",
            str(out / "tiny-cuau.toml"),
            str(tmp_path / "data.extxyz"),
            "--json",
            "--plot",
            str(tmp_path / "parity.png"),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert set(metrics["per_element"]) == {"Cu", "Au"} and metrics["force_mae_meV_per_A"] > 0
    assert (tmp_path / "parity.png").stat().st_size > 1000
    shutil.rmtree(out)


def assert_same_training(one: Path, other: Path, name: str):
    """Two training output directories hold the same run: weights, best weights, optimizer
    state (bytes), written potential and per-epoch history (all but the wall time)."""
    for path in ("checkpoints/model.eqx", "checkpoints/optimizer.eqx", "checkpoints/best.eqx"):
        assert (one / path).read_bytes() == (other / path).read_bytes(), path
    assert (one / f"{name}.eqx").read_bytes() == (other / f"{name}.eqx").read_bytes()
    states = [json.loads((d / "checkpoints" / "state.json").read_text()) for d in (one, other)]
    for state in states:
        del state["elapsed_s"]
    assert states[0] == states[1]


def test_train_valid_and_test_files_cli(tmp_path):
    """--valid FILE is the validation set (all of DATA trains; the validation figures in the
    history are the best weights' errors on FILE), and --test FILE's errors in the model card
    are what ``molopt evaluate`` gives for the written potential on that file."""
    import tomllib

    from molopt.training.data import read_labelled
    from molopt.training.evaluate import errors

    data = write_emt_cuau(tmp_path / "data.extxyz", 12, 0.1)
    # larger rattles than the training data: errors on them stand apart from a split's
    valid = write_emt_cuau(tmp_path / "valid.extxyz", 4, 0.25, first_seed=100)
    test = write_emt_cuau(tmp_path / "test.extxyz", 5, 0.2, first_seed=200)
    config = tiny_train_toml(tmp_path / "t.toml")
    out = tmp_path / "model"
    result = runner.invoke(
        app,
        ["train", str(data), "--valid", str(valid), "--test", str(test), "-c", str(config)]
        + ["-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    written = out / "tiny-cuau.toml"
    card = tomllib.loads(written.read_text())
    assert (card["training"]["n_train"], card["training"]["n_valid"]) == (12, 4)
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    kept = state["history"][state["best_epoch"]]
    potential = load(str(written)).potential
    on_valid = errors(potential, read_labelled([valid]))
    on_data = errors(potential, read_labelled([data]))
    # training validates in float32, errors() in float64 (same float32 weights)
    for key in ("energy_mae_meV_per_atom", "force_mae_meV_per_A", "force_rmse_meV_per_A"):
        assert kept[f"valid_{key}"] == pytest.approx(on_valid[key], rel=1e-5), key
        assert abs(on_data[key] - on_valid[key]) > 0.1 * on_valid[key], key
    evaluated = runner.invoke(app, ["evaluate", str(written), str(test), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    measured = json.loads(evaluated.stdout)
    assert card["errors"]["test_data"] == [str(test)]
    assert measured["n_configurations"] == 5 and "stress_mae_meV_per_A3" in measured
    for key, value in measured.items():
        if isinstance(value, float):
            assert card["errors"][key] == pytest.approx(value, rel=1e-9), key
    for symbol, figures in measured["per_element"].items():
        for key, value in figures.items():
            assert card["errors"]["per_element"][symbol][key] == pytest.approx(value, rel=1e-9)
    assert measured["force_mae_meV_per_A"] != pytest.approx(on_valid["force_mae_meV_per_A"])


def test_fine_tuning_resume_continues_exactly_cli(tmp_path):
    """``--init X --resume`` continues an interrupted fine-tuning from its checkpoint (weights
    and Adam moments), not from X again: 2 epochs, then --resume to 3, is the 3-epoch run."""
    data = write_emt_cuau(tmp_path / "data.extxyz", 12, 0.1)
    config = tiny_train_toml(tmp_path / "t.toml")
    start = PaiNN(
        [29, 79], cutoff=4.0, n_features=8, n_radial=6, n_layers=1, key=jax.random.PRNGKey(5)
    )
    init = save_neural(start, tmp_path / "start", "start", {"description": "test"})
    args = ["train", str(data), "-c", str(config), "--init", str(init), "-o"]
    for extra in (["cut", "--epochs", "2"], ["cut", "--resume", "--epochs", "3"]):
        result = runner.invoke(app, args[:-1] + ["-o", str(tmp_path / extra[0]), *extra[1:]])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, args + [str(tmp_path / "straight"), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert_same_training(tmp_path / "cut", tmp_path / "straight", "tiny-cuau")
    # the resumed run did train: its weights are not the starting potential's
    import equinox as eqx

    tuned = load(str(tmp_path / "cut" / "tiny-cuau.toml")).potential
    pairs = zip(
        jax.tree.leaves(eqx.filter(tuned, eqx.is_array)),
        jax.tree.leaves(eqx.filter(load(str(init)).potential, eqx.is_array)),
        strict=True,
    )
    assert any(not np.array_equal(a, b) for a, b in pairs)


def emt_copper(count: int, amplitude: float):
    """Labelled rattled fcc Cu cells (ASE EMT): tiny training sets."""
    from ase.calculators.emt import EMT

    from molopt.training.data import Labelled

    data = []
    for seed in range(count):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(amplitude, seed=seed)
        atoms.calc = EMT()
        data.append(
            Labelled(structure_from_atoms(atoms), atoms.get_potential_energy(), atoms.get_forces())
        )
    return data


def tiny_config(**settings):
    from molopt.training.train import TrainConfig

    return TrainConfig(cutoff=4.0, n_features=8, n_radial=6, n_layers=1, **settings)


def test_training_is_reproducible(tmp_path):
    import equinox as eqx

    from molopt.errors import ConfigError
    from molopt.training.train import Trainer

    data = emt_copper(6, 0.1)
    config = tiny_config(epochs=2, batch_atoms=8, batch_structures=2)
    runs = []
    for k in range(2):
        trainer = Trainer(config, data, tmp_path / f"r{k}")
        trainer.run()
        runs.append(trainer.state["history"][-1]["train_loss"])
    assert runs[0] == runs[1]
    # a time budget far below one epoch's cost cuts the run to the minimum of two epochs,
    # fixed after epoch 1 and recorded in the state
    from dataclasses import replace

    trainer = Trainer(replace(config, epochs=50, time_budget_s=1e-6), data, tmp_path / "budget")
    state = trainer.run()
    assert state["epochs"] == 2 and len(state["history"]) == 2 and state["stopped"] == "epochs"
    # a learning rate far too high makes every epoch worse than the first: "best" keeps epoch
    # 1, keep = "last" ships the final epoch's model (the one in the last checkpoint)
    wild = replace(config, epochs=3, learning_rate=1.0, warmup_steps=1)
    kept = {}
    for keep in ("best", "last"):
        trainer = Trainer(replace(wild, keep=keep), data, tmp_path / keep)
        kept[keep] = trainer.run()["best_epoch"], trainer.best
    assert kept["best"][0] == 0 and kept["last"][0] == 2
    final = eqx.tree_deserialise_leaves(
        tmp_path / "last" / "checkpoints" / "model.eqx", kept["last"][1]
    )
    leaves = [jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (final, kept["last"][1])]
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(*leaves, strict=True))
    with pytest.raises(ConfigError, match="keep"):
        Trainer(replace(config, keep="worst"), data, tmp_path / "bad")


def test_exponential_moving_average_of_weights(tmp_path):
    """ema_decay > 0: the averaged weights (ramped decay min(d, (1 + step) / (10 + step)))
    are the ones validated, kept and checkpointed; the raw weights train on unchanged."""
    from dataclasses import replace

    import equinox as eqx

    from molopt.errors import ConfigError
    from molopt.training.train import Trainer

    data = emt_copper(6, 0.1)
    # one batch per epoch and a flat learning rate: the raw trajectory does not depend on
    # the number of epochs, so a one-epoch run gives the weights after step 1
    config = tiny_config(
        epochs=2, batch_atoms=64, batch_structures=8, learning_rate=1e-2,
        final_learning_rate=1e-2, warmup_steps=1, keep="last", ema_decay=0.5,
    )  # fmt: skip
    trainer = Trainer(config, data, tmp_path / "ema")
    assert trainer.steps_per_epoch() == 1
    init = trainer.initial_model()
    state = trainer.run()
    one = Trainer(replace(config, epochs=1, ema_decay=0.0), data, tmp_path / "one")
    one.run()
    raw2 = eqx.tree_deserialise_leaves(tmp_path / "ema" / "checkpoints" / "model.eqx", init)
    ema = eqx.tree_deserialise_leaves(tmp_path / "ema" / "checkpoints" / "ema.eqx", init)

    def leaves(m):
        return [np.asarray(x, np.float64) for x in jax.tree.leaves(eqx.filter(m, eqx.is_array))]

    d1, d2 = 1 / 10, 2 / 11
    for x0, x1, x2, e, kept in zip(
        leaves(init), leaves(one.best), leaves(raw2), leaves(ema), leaves(trainer.best),
        strict=True,
    ):  # fmt: skip
        e1 = d1 * x0 + (1 - d1) * x1
        np.testing.assert_allclose(e, d2 * e1 + (1 - d2) * x2, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(e, kept)
    assert any(not np.allclose(a, b) for a, b in zip(leaves(ema), leaves(raw2), strict=True))
    # the validation figures are the averaged model's
    b = trainer.valid_batches.make(trainer.valid_batches.plan(None)[0])
    from molopt.training.train import make_loss

    valid, _ = make_loss(config)[0](trainer.best, b)
    assert state["history"][-1]["valid_loss"] == pytest.approx(float(valid), rel=1e-5)
    with pytest.raises(ConfigError, match="ema_decay"):
        Trainer(replace(config, ema_decay=1.0), data, tmp_path / "bad")


def test_fine_tuning_starts_from_a_potential(tmp_path):
    """--init: training starts from a written potential's weights (fresh optimizer); the
    architecture comes from the potential and a config that contradicts it is refused."""
    import tomllib
    from dataclasses import replace

    import equinox as eqx

    from molopt.errors import ConfigError
    from molopt.potentials.registry import load
    from molopt.training.train import Trainer

    data = emt_copper(6, 0.1)
    config = tiny_config(
        epochs=30,
        batch_atoms=8,
        batch_structures=2,
        keep="last",
        learning_rate=1e-2,
        warmup_steps=1,
    )
    first = Trainer(config, data, tmp_path / "first")
    first.run()
    path = first.write_potential()
    spec = load(str(path))
    trained_mae = first.state["history"][-1]["valid_force_mae_meV_per_A"]
    # a learning rate of ~0: the fine-tuned run's first epoch is the written model
    still = replace(config, epochs=1, learning_rate=1e-12, final_learning_rate=1e-12)
    tuned = Trainer(still, data, tmp_path / "tuned", init=spec)
    start = jax.tree.leaves(eqx.filter(tuned.initial_model(), eqx.is_array))
    written = jax.tree.leaves(eqx.filter(spec.potential, eqx.is_array))
    assert all(np.allclose(a, b, rtol=1e-6) for a, b in zip(start, written, strict=True))
    tuned.run()
    tuned_mae = tuned.state["history"][0]["valid_force_mae_meV_per_A"]
    assert abs(tuned_mae - trained_mae) < 1e-3 * trained_mae
    fresh = Trainer(still, data, tmp_path / "fresh")
    fresh.run()
    assert fresh.state["history"][0]["valid_force_mae_meV_per_A"] > 1.5 * trained_mae
    card = tomllib.loads(tuned.write_potential().read_text())
    assert card["training"]["init"]["weights_sha256"] == spec.data["weights_sha256"]
    with pytest.raises(ConfigError, match="n_features = 16"):
        Trainer(replace(config, n_features=16), data, tmp_path / "bad", init=spec)
    with pytest.raises(ConfigError, match="only a neural"):
        Trainer(config, data, tmp_path / "bad", init=load("argon"))
    # an interrupted fine-tuning continues from its checkpoint with --resume and the same init
    again = Trainer(replace(still, epochs=2), data, tmp_path / "tuned", init=spec)
    state = again.run(resume=True)
    assert len(state["history"]) == 2 and state["history"][0] == tuned.state["history"][0]
    # a TOML that leaves the architecture out takes the potential's
    toml = tmp_path / "tune.toml"
    toml.write_text("epochs = 1\nbatch_atoms = 8\nbatch_structures = 2\n")
    from molopt.training.train import TrainConfig

    taken = Trainer(TrainConfig.from_toml(toml), data, tmp_path / "t", init=spec).config
    assert (taken.n_features, taken.n_layers, taken.cutoff) == (8, 1, 4.0)
    from ase.calculators.emt import EMT

    from molopt.training.data import Labelled

    gold = bulk("Au", "fcc", a=4.08, cubic=True)
    gold.calc = EMT()
    labelled = Labelled(structure_from_atoms(gold), gold.get_potential_energy(), gold.get_forces())
    with pytest.raises(ConfigError, match="Au, which --init .* does not cover"):
        Trainer(config, data + [labelled], tmp_path / "bad", init=spec)


def test_resumed_fine_tuning_keeps_its_refitted_offsets(tmp_path, monkeypatch):
    """With ``refit_energy_offsets``, the offsets are fitted once, when the fine-tuning
    starts: a resumed run continues from the checkpoint's weights without refitting (a pass
    over the training data), takes the same epochs as an uninterrupted run, and its card
    carries the offsets of the start."""
    import tomllib
    from dataclasses import replace

    from molopt.training.train import Trainer

    data = emt_copper(6, 0.1)
    start = PaiNN([29], cutoff=4.0, n_features=8, n_radial=6, n_layers=1, key=jax.random.PRNGKey(3))
    spec = load(str(save_neural(start, tmp_path / "start", "start", {"description": "test"})))
    config = tiny_config(epochs=1, batch_atoms=8, batch_structures=2, refit_energy_offsets=True)
    straight = Trainer(replace(config, epochs=2), data, tmp_path / "straight", init=spec)
    straight.run()
    offsets = straight.energy_offsets
    assert abs(offsets["Cu"]) > 1e-3  # a real refit: the untrained start is off
    Trainer(config, data, tmp_path / "cut", init=spec).run()

    def refit(self, model):
        raise AssertionError("refitted on resume")

    monkeypatch.setattr(Trainer, "_refit_energy_offsets", refit)
    resumed = Trainer(replace(config, epochs=2), data, tmp_path / "cut", init=spec)
    state = resumed.run(resume=True)
    assert state["history"] == straight.state["history"]
    card = tomllib.loads(resumed.write_potential().read_text())
    assert card["training"]["init"]["energy_offsets_eV"] == offsets


def test_prefetched_batches_keep_order_and_errors():
    """Training packs the next batches in a worker thread: same batches, same order, and an
    error in packing reaches the training loop at the batch that raised it."""
    from molopt.training.data import prefetched

    plan = [[k, k + 1] for k in range(7)]
    assert list(prefetched(plan, lambda m: tuple(m))) == [tuple(m) for m in plan]
    assert list(prefetched([], tuple)) == []
    made = []
    batches = prefetched(plan, lambda m: made.append(m[0]) or m[0], depth=2)
    assert next(batches) == 0
    batches.close()  # closed early: nothing beyond the batches already queued is built
    assert made[:1] == [0] and len(made) <= 3
    with pytest.raises(ValueError, match="depth"):
        list(prefetched(plan, tuple, depth=0))

    def make(members):
        if members[0] == 4:
            raise ValueError("bad batch 4")
        return members[0]

    seen = []
    with pytest.raises(ValueError, match="bad batch 4"):
        for value in prefetched(plan, make, depth=3):
            seen.append(value)
    assert seen == [0, 1, 2, 3]


def test_huber_force_loss(tmp_path):
    """force_loss = "huber": the MSE below huber_delta, linear (bounded gradient) above it."""
    from dataclasses import replace

    from molopt.errors import ConfigError
    from molopt.training.train import Trainer, make_loss

    data = emt_copper(4, 0.2)
    config = tiny_config(epochs=1, batch_atoms=16, batch_structures=4, valid_fraction=0.25)
    trainer = Trainer(config, data, tmp_path / "mse")
    model = trainer.initial_model()
    b = trainer.train_batches.make(trainer.train_batches.plan(None)[0])
    mse, (de, df, _) = make_loss(config)[0](model, b)
    n = 3 * int(np.sum(b.batch.atom_mask))
    energy_part = (
        config.energy_weight * np.sum(np.asarray(de) ** 2) / int(np.sum(b.batch.system_mask))
    )
    big = np.abs(np.asarray(df)).max()
    assert big > 0.01  # an untrained model: errors well above the small delta below
    wide, _ = make_loss(replace(config, force_loss="huber", huber_delta=10 * big))[0](model, b)
    assert float(wide) == pytest.approx(float(mse), rel=1e-6)  # all errors inside delta
    delta = 0.01
    narrow, _ = make_loss(replace(config, force_loss="huber", huber_delta=delta))[0](model, b)
    x = np.abs(np.asarray(df, np.float64))
    huber = np.where(x <= delta, x**2, 2 * delta * x - delta**2)  # 2 x optax.huber_loss
    expected = energy_part + config.force_weight * huber.sum() / n
    assert float(narrow) == pytest.approx(expected, rel=1e-5)
    assert float(narrow) < float(mse)
    huber_config = replace(config, force_loss="huber", huber_delta=delta)
    trained = Trainer(huber_config, data, tmp_path / "h")
    state = trained.run()
    assert np.isfinite(state["history"][-1]["train_loss"])
    # the validation loss that keep = "best" ranks by is the training loss's own form (Huber)
    (members,) = trained.valid_batches.plan(None)
    vb = trained.valid_batches.make(members)
    valid_value, _ = make_loss(huber_config)[0](trained.best, vb)
    assert state["history"][-1]["valid_loss"] == pytest.approx(float(valid_value), rel=1e-5)
    with pytest.raises(ConfigError, match="force_loss"):
        Trainer(replace(config, force_loss="l3"), data, tmp_path / "bad")


def test_batches_take_the_smallest_capacity_rung_that_holds_them():
    """Small molecules need fewer neighbour slots than big ones; a batch is padded to its own
    members' rung, every structure is in exactly one batch per pass, and the loss and its
    gradient do not depend on the rung (a batch padded to the top rung gives the same)."""
    import equinox as eqx
    from ase.build import molecule

    from molopt.training.data import Batcher, Labelled
    from molopt.training.train import TrainConfig, make_loss

    names = ["H2O", "CH4", "C6H6", "CH3CH2OH", "NH3", "C4H4O", "H2", "CH3COOH", "HCOOH"]
    rng = np.random.default_rng(0)
    data = []
    for name in names * 2:
        atoms = molecule(name)
        atoms.rattle(0.05, seed=int(rng.integers(1000)))
        n = len(atoms)
        data.append(Labelled(structure_from_atoms(atoms), -float(n), 0.1 * rng.normal(size=(n, 3))))
    elements = (1, 6, 7, 8)
    batcher = Batcher(data, elements, 5.0, 40, 4)
    assert min(batcher.need) == 8 and batcher.capacity > 8
    plan = batcher.plan(np.random.default_rng(1))
    assert sorted(k for members in plan for k in members) == list(range(len(data)))
    config = TrainConfig(force_weight=10.0)
    loss_fn, _ = make_loss(config)
    model = PaiNN(
        elements, cutoff=5.0, n_features=8, n_radial=6, n_layers=2, key=jax.random.PRNGKey(0)
    )
    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn, has_aux=True))
    top = batcher.capacity
    for members in plan:
        rungs = {batcher.need[k] for k in members}
        assert len(rungs) == 1
        b = batcher.make(members)
        assert b.nbrs.index.shape[0] == rungs.pop()
        for i in members:  # every pair of every member fits
            assert int(batcher.pairs[i][3].max()) <= b.nbrs.index.shape[0]
        if b.nbrs.index.shape[0] == top:
            continue
        saved = batcher.need
        batcher.need = [top] * len(data)
        padded = batcher.make(members)
        batcher.need = saved
        (value, _), g = grad(model, b)
        (value_top, _), g_top = grad(model, padded)
        assert float(value) == pytest.approx(float(value_top), rel=1e-6)
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_top), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def _graph_hash(atoms, rounds: int = 4) -> str:
    """Weisfeiler-Lehman hash of a molecule's bond graph (covalent radii x 1.2): equal for the
    same molecule in any geometry near its minimum, different for different molecules."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.2))
    labels = list(atoms.get_chemical_symbols())
    for _ in range(rounds):
        labels = [
            labels[a] + "(" + ",".join(sorted(labels[b] for b in j[i == a])) + ")"
            for a in range(len(atoms))
        ]
    return "|".join(sorted(labels))


def test_gfn2_test_molecules_never_seen_in_training():
    """The organic test set holds out whole molecules: no bond graph of a test molecule
    (taken from its least-strained configuration) occurs in the training set."""

    def molecules(path):
        best = {}
        from molopt.io.read import ase_read

        for atoms in ase_read(path, ":"):
            name = atoms.info["config_type"].split(" ", 1)[1]
            strain = np.abs(atoms.get_forces()).max()
            if name not in best or strain < best[name][0]:
                best[name] = (strain, atoms)
        return {name: _graph_hash(a) for name, (_, a) in best.items()}

    data = ROOT / "data" / "neural" / "gfn2-chno"
    train = molecules(data / "train.extxyz.gz")
    coverage = molecules(data / "train-coverage.extxyz.gz")
    assert len(coverage) >= 40 and not set(coverage) & set(train)
    train.update(coverage)
    extra = molecules(data / "train-extra.extxyz.gz")  # generate_gfn2.py extra 1 9 2000
    assert len(extra) >= 1900 and not set(extra) & set(train)
    train.update(extra)
    test = molecules(data / "test.extxyz.gz")
    assert len(train) >= 700 and len(test) >= 25
    shared = set(train.values()) & set(test.values())
    assert not shared, [n for n, h in test.items() if h in shared]
    # the hash tells molecules apart: isomers in the test set get distinct hashes
    assert len(set(test.values())) == len(test)


def test_refit_energy_offsets_recovers_the_data_zero_level(tmp_path, small_model):
    """``refit_energy_offsets`` (fine-tuning onto data from another code or method): labels
    that are the starting model's energies plus known per-element offsets give back those
    offsets by least squares, and the model then reproduces the labels."""
    from molopt.training.data import Labelled
    from molopt.training.train import TrainConfig, Trainer

    init = load(str(save_neural(small_model, tmp_path / "start", "start", {"description": "t"})))
    model = init.potential
    structures = []
    for n_gold in range(4):  # four compositions of a 4-atom fcc cell: Cu4 ... CuAu3
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
        atoms.numbers[:n_gold] = 79
        atoms.rattle(0.05, seed=n_gold)
        structures.append(structure_from_atoms(atoms))
    offsets = {29: 3.25, 79: -7.5}
    data = []
    for s, (energy, forces, _) in zip(
        structures, evaluate_structures(structures, model), strict=True
    ):
        shift = sum(offsets[int(z)] for z in s.numbers)
        data.append(Labelled(s, energy + shift, forces))
    config = TrainConfig(
        cutoff=4.5,
        n_features=16,
        n_radial=8,
        n_layers=2,
        precision="float64",
        refit_energy_offsets=True,
    )
    trainer = Trainer(config, data, tmp_path / "out", valid=data[:1], init=init)
    refitted = trainer.initial_model()
    assert trainer.energy_offsets == pytest.approx({"Cu": 3.25, "Au": -7.5}, abs=1e-4)
    for d, (energy, _, _) in zip(data, evaluate_structures(structures, refitted), strict=True):
        assert energy == pytest.approx(d.energy, abs=1e-4)
