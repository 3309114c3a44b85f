"""Memory: estimated before anything is built, checked against XLA's own accounting; a
structure too big fails alone, batches stay under --max-memory, and a device out-of-memory
error splits the batch instead of ending the run."""

from collections import deque

import numpy as np
import pytest
from ase.build import bulk
from conftest import rattled_cluster

from molopt import config
from molopt._jax import jax
from molopt.engine import EngineSettings, memory, policy, relax_structures
from molopt.engine import scheduler as sched
from molopt.engine.kernel import evaluate_once
from molopt.engine.packing import neighbor_lists, pack_structures
from molopt.engine.reporting import Item
from molopt.io.read import from_atoms
from molopt.potentials.registry import load
from molopt.run import relax_files
from molopt.structure import make_structure


def grid(side: int, spacing: float):
    """``side``^3 argon atoms on a cubic grid: absurdly dense for an 8.5 A cutoff."""
    ijk = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return make_structure([18] * len(ijk), ijk * spacing)


@pytest.mark.parametrize(
    "name, atoms",
    [
        ("argon", bulk("Ar", "fcc", a=5.26) * (5, 5, 5)),
        ("emt", bulk("Cu", "fcc", a=3.6) * (5, 5, 5)),
        ("nn-emt-metals", bulk("Cu", "fcc", a=3.6) * (5, 5, 5)),
        ("argon", None),  # a cluster: the bounding-box density
    ],
)
def test_the_estimate_bounds_what_xla_allocates(name, atoms):
    """The estimate is at least the compiled force-and-stress call's temporaries (XLA's
    memory analysis) and not wildly more."""
    potential = load(name).potential
    structure = rattled_cluster(200, seed=1) if atoms is None else from_atoms(atoms)
    batch, positions, cells, layout = pack_structures([structure], potential, np.float64)
    host = neighbor_lists(
        positions, cells, np.asarray(batch.pbc), layout, potential, 1.0, np.float64
    )
    compiled = (
        jax.jit(evaluate_once, static_argnames="stress")
        .lower(positions, cells, batch, host.to_device(), potential, stress=True)
        .compile()
    )
    actual = compiled.memory_analysis().temp_size_in_bytes
    estimate = memory.batch_bytes([structure], potential, 1.0, np.float64)
    assert actual <= estimate <= 30 * actual, (actual, estimate)
    # the neighbour estimate is of the order of what the list holds
    reach = potential.cutoff + 1.0
    assert 0.5 * host.capacity <= memory.neighbours_per_atom(structure, reach) + 1
    assert memory.neighbours_per_atom(structure, reach) <= 2.5 * host.capacity


def test_a_structure_too_dense_fails_alone_before_anything_is_built(tmp_path):
    import ase.io
    from ase import Atoms

    dense = grid(20, 0.5)  # 8,000 atoms, every one within the cutoff of all the others
    ase.io.write(tmp_path / "dense.xyz", Atoms(numbers=dense.numbers, positions=dense.positions))
    ok = rattled_cluster(13, seed=2)
    ase.io.write(tmp_path / "ok.xyz", Atoms(numbers=ok.numbers, positions=ok.positions))
    settings = config.build(None, potential="argon", out_dir=str(tmp_path / "o"), fmax=1e-3)
    summary = relax_files([str(tmp_path)], settings)  # the default limit
    by_name = {r["input"].rsplit("/", 1)[1]: r for r in summary.records}
    assert by_name["ok.xyz"]["status"] == "converged"
    failed = by_name["dense.xyz"]
    assert failed["status"] == "failed" and failed["stop_reason"] == "out_of_memory"
    assert "of memory" in failed["error"] and "--max-memory" in failed["error"]
    assert "neighbours per atom" in failed["error"]
    # an explicit limit: a smaller grid fails under 1G, relaxes its first step under 64G
    small = grid(12, 0.6)
    ase.io.write(tmp_path / "dense.xyz", Atoms(numbers=small.numbers, positions=small.positions))
    tight = config.build(
        None, potential="argon", out_dir=str(tmp_path / "o2"), max_memory="1G", steps=0
    )
    (rec, _) = sorted(relax_files([str(tmp_path)], tight).records, key=lambda r: r["input"])
    assert rec["status"] == "failed" and "more than the 1 GiB allowed" in rec["error"]
    roomy = config.build(
        None, potential="argon", out_dir=str(tmp_path / "o3"), max_memory="64G", steps=0
    )
    (rec, _) = sorted(relax_files([str(tmp_path)], roomy).records, key=lambda r: r["input"])
    assert rec["status"] == "not_converged"  # evaluated: it was allowed to run


def test_batches_stay_under_the_limit_and_give_the_same_results():
    argon = load("argon").potential
    structures = [rattled_cluster(10 + k % 7, seed=k) for k in range(12)]
    reach = argon.cutoff + 1.0
    one = memory.batch_bytes([structures[0]], argon, 1.0, np.float64)
    limit = int(3.5 * one)
    items = [Item(k, s) for k, s in enumerate(structures)]
    queue = deque(items)
    neighbours = {it.key: memory.neighbours_per_atom(it.structure, reach) for it in items}

    def fits(batch):
        atoms = sum(it.structure.n_atoms for it in batch)
        worst = max(neighbours[it.key] for it in batch)
        return memory.bytes_for(atoms, worst, argon, np.float64) <= limit

    while queue:
        chosen = policy.admit(queue, [], 1024, 32768, fits)
        assert len(chosen) == 1 or fits(chosen)
        assert len(chosen) < 12
    pairs = list(enumerate(structures))
    free = {r.key: r for r in relax_structures(pairs, argon, EngineSettings(fmax=1e-3))}
    bounded = {
        r.key: r
        for r in relax_structures(pairs, argon, EngineSettings(fmax=1e-3, max_memory=limit))
    }
    for k in free:
        assert bounded[k].steps == free[k].steps
        assert bounded[k].energy == pytest.approx(free[k].energy, abs=1e-12)


def test_device_out_of_memory_splits_the_batch(monkeypatch):
    argon = load("argon").potential
    pairs = [(k, rattled_cluster(10 + k % 5, seed=k)) for k in range(8)]
    expected = {r.key: r for r in relax_structures(pairs, argon, EngineSettings(fmax=1e-3))}
    launch = sched.Engine._launch
    sizes = []

    def tight_device(self, items, *args, **kwargs):
        sizes.append(len(items))
        if len(items) > 2 or any(it.key == 7 for it in items):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return launch(self, items, *args, **kwargs)

    monkeypatch.setattr(sched.Engine, "_launch", tight_device)
    results = {r.key: r for r in relax_structures(pairs, argon, EngineSettings(fmax=1e-3))}
    assert sizes[0] == 8 and max(sizes[1:]) < 8  # split, not ended
    assert results[7].status == "failed" and "ran out of memory" in results[7].error
    for k in range(7):  # the others relax as they would have
        assert results[k].status == "converged"
        assert results[k].steps == expected[k].steps
        assert results[k].energy == pytest.approx(expected[k].energy, abs=1e-12)


def test_max_memory_values():
    assert config.parse_memory("8G") == 8 * 2**30
    assert config.parse_memory("512M") == 512 * 2**20
    assert config.parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert config.parse_memory("2048") == 2048
    for bad in ("lots", "-1G", "0", "nanG"):
        with pytest.raises(ValueError):
            config.parse_memory(bad)
    with pytest.raises(Exception, match="max_memory"):
        config.build(None, max_memory="lots")
