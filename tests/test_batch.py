"""The batched engine: batch == alone, refills, recompilation, fault isolation."""

import dataclasses

import jax
import numpy as np
import pytest
from ase.build import bulk
from conftest import rattled_cluster, structure_from_atoms

from molopt import engine as E
from molopt.engine import EngineSettings, relax_structures
from molopt.potentials.base import Potential
from molopt.potentials.lennard_jones import LennardJones
from molopt.structure import Structure


def compact_cluster(radius, seed):
    """fcc argon within ``radius`` of an atom, rattled: relaxes in well under 100 steps."""
    from ase import Atoms

    crystal = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(4)
    center = crystal.positions[np.argmin(np.linalg.norm(crystal.positions - 10.5, axis=1))]
    keep = np.linalg.norm(crystal.positions - center, axis=1) <= radius
    atoms = Atoms(numbers=crystal.numbers[keep], positions=crystal.positions[keep] - center)
    atoms.rattle(0.1, seed=seed)
    return structure_from_atoms(atoms)


def mixed_structures():
    out = [compact_cluster(r, seed=k) for k, r in enumerate((3.8, 5.3, 6.5, 7.5, 8.0))]
    for a, seed in ((5.2, 1), (5.4, 2)):
        crystal = bulk("Ar", "fcc", a=a, cubic=True).repeat((2, 2, 1))
        crystal.rattle(0.1, seed=seed)
        out.append(structure_from_atoms(crystal))
    slab = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 2))
    slab.pbc = [True, True, False]
    slab.rattle(0.1, seed=3)
    out.append(structure_from_atoms(slab))
    return out


# (CI time: FIRE2's refills run with -m slow; its state moves as FIRE's, same transplant code)
@pytest.mark.parametrize(
    "optimizer", ["fire", "lbfgs", pytest.param("fire2", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("relax_cell", [False, True])
def test_refilled_batches_equal_relaxing_alone(argon, optimizer, relax_cell):
    structures = mixed_structures()
    if relax_cell:  # four crystals, each converging at a different step
        structures = []
        for a, seed in ((5.2, 1), (5.4, 2), (5.0, 4), (5.6, 5)):
            crystal = bulk("Ar", "fcc", a=a, cubic=True).repeat((2, 2, 1))
            crystal.rattle(0.1, seed=seed)
            structures.append(structure_from_atoms(crystal))
    items = list(enumerate(structures))
    settings = EngineSettings(
        optimizer=optimizer, fmax=1e-3, relax_cell=relax_cell, batch_size=3, chunk=4
    )  # systems leave and new ones take their places (short chunks: not all at once)
    engine = E.Engine(argon, settings)
    engine.compaction_cost = 0.0  # refill as soon as there is room
    batched = {r.key: r for r in engine.run(items)}
    assert engine.repacks >= 1  # running systems moved on with new ones
    alone_settings = dataclasses.replace(settings, batch_size=1)
    for key, s in items:
        (alone,) = relax_structures([(key, s)], argon, alone_settings)
        got = batched[key]
        assert got.status == alone.status == "converged"
        assert got.steps == alone.steps
        assert got.energy == pytest.approx(alone.energy, abs=1e-9)
        np.testing.assert_allclose(got.structure.positions, alone.structure.positions, atol=1e-7)


@pytest.mark.parametrize("cost", [0.0, float("inf")])
def test_tail_compaction_keeps_results_exact(argon, cost):
    """With no structure waiting, a batch whose systems are mostly done moves to a smaller
    bucket once the time it wastes reaches ``compaction_cost`` (0: at once; inf: never). Either
    way each structure follows the path it follows alone."""
    structures = [compact_cluster(3.8, seed=k) for k in range(7)] + [rattled_cluster(40, seed=9)]
    items = list(enumerate(structures))
    settings = EngineSettings(fmax=1e-3, chunk=8)
    engine = E.Engine(argon, settings)
    engine.compaction_cost = cost
    results = {r.key: r for r in engine.run(items)}
    assert (len(engine.shapes_seen) > 1) == (cost == 0.0)
    for key, s in items:
        (alone,) = relax_structures([(key, s)], argon, settings)
        assert results[key].status == alone.status == "converged"
        assert results[key].steps == alone.steps
        np.testing.assert_allclose(
            results[key].structure.positions, alone.structure.positions, atol=1e-10
        )


@pytest.mark.parametrize("cost, compacts", [(2.0, True), (1e6, False)])
def test_tail_compaction_waits_for_its_cost(argon, cost, compacts):
    """The idle device time of a sparse tail is counted chunk by chunk (a fake clock: each
    reading one second later, so each chunk computes for one second) until it reaches the
    cost of a move; a move that costs more than the whole tail wastes never happens."""
    structures = [compact_cluster(3.8, seed=k) for k in range(7)] + [rattled_cluster(40, seed=9)]
    items = list(enumerate(structures))
    settings = EngineSettings(fmax=1e-3, chunk=4)
    engine = E.Engine(argon, settings)
    engine.compaction_cost = cost
    ticks = iter(range(10**6))
    engine.clock = lambda: float(next(ticks))
    results = {r.key: r for r in engine.run(items)}
    assert (len(engine.shapes_seen) > 1) == compacts
    (alone,) = relax_structures([(7, structures[7])], argon, settings)
    assert results[7].steps == alone.steps
    np.testing.assert_allclose(
        results[7].structure.positions, alone.structure.positions, atol=1e-10
    )


def test_a_compaction_into_the_program_it_left_is_not_repeated(argon, monkeypatch):
    """A compaction that lands a batch in the very program it left (a bigger program seen
    before takes it) would land there again at every move: the batch then finishes where it
    is. Here the policy asks for a move after every chunk; one lone cluster moves once, then
    converges on the path it follows alone (without the guard it relaunched forever)."""
    from molopt.engine import policy, scheduler

    monkeypatch.setattr(scheduler.policy, "should_repack", lambda *a, **k: (True, policy.Idle()))
    structure = rattled_cluster(20, seed=4)
    settings = EngineSettings(fmax=1e-3, chunk=4)
    engine = E.Engine(argon, settings)
    launch = engine._launch

    def bounded(*args, **kwargs):
        assert engine.starts < 5, "relaunched again and again"
        return launch(*args, **kwargs)

    engine._launch = bounded
    (result,) = engine.run([(0, structure)])
    assert engine.starts == 2 and engine.compiles == 1
    (alone,) = relax_structures([(0, structure)], argon, settings)
    assert result.status == alone.status == "converged"
    assert result.steps == alone.steps
    np.testing.assert_allclose(result.structure.positions, alone.structure.positions, atol=1e-10)


def test_tail_compaction_counts_chunks_the_host_waited_for(argon, monkeypatch):
    """The device time of a chunk passes while the host reads its frame count (inside the
    step), not while it reads the statuses afterwards (already computed): a fake clock that
    moves one second only there, per chunk, still brings a sparse tail to its compaction
    (before this was counted, a slow potential's last structure stepped on in the full batch)."""
    from molopt.engine import scheduler

    structures = [compact_cluster(3.8, seed=k) for k in range(7)] + [rattled_cluster(40, seed=9)]
    settings = EngineSettings(fmax=1e-3, chunk=4)
    engine = E.Engine(argon, settings)
    engine.compaction_cost = 2.0
    now = [0.0]

    class Waits:
        def __init__(self, value):
            self.value = value

        def __int__(self):
            now[0] += 1.0  # the host waits here for the chunk
            return int(self.value)

    real = scheduler.advance

    def advance(*args):
        state, frames, n_frames, stale = real(*args)
        return state, frames, Waits(n_frames), stale

    monkeypatch.setattr(scheduler, "advance", advance)
    engine.clock = lambda: now[0]
    results = {r.key: r for r in engine.run(list(enumerate(structures)))}
    assert len(engine.shapes_seen) > 1  # compacted
    (alone,) = relax_structures([(7, structures[7])], argon, settings)
    assert results[7].steps == alone.steps


def test_tail_compaction_prices_the_batch_it_would_build():
    """The idle fraction a compaction would save is measured against the bucket the
    compacted batch would really get (the fine ladder, as ``plan_layout`` builds it)."""
    from molopt.batch import bucket, plan_layout
    from molopt.engine import policy

    sizes = [1000, 1000, 1000, 1000, 1000]  # 5,000 atoms still running in a 32,768-atom batch
    layout = plan_layout([1000] * 32)
    A = layout.n_padded_atoms
    repack, idle = policy.should_repack(
        layout, sizes, False, 0, 0.0, policy.Idle(), 1.0, lambda target: float("inf")
    )
    assert not repack
    target = plan_layout(sizes).n_padded_atoms
    assert target != bucket(sum(sizes))  # (5,120 on the fine ladder, 6,144 on the coarse)
    assert idle.fraction == pytest.approx(1.0 - target / A)


def count_traces(monkeypatch, *targets) -> list:
    """A list that grows by one each time one of ``targets`` ((owner, attribute name)
    pairs of functions a program runs only while it is traced) is called: traces, not calls
    of compiled programs."""
    traced: list = []
    for owner, name in targets:
        original = getattr(owner, name)

        def counting(*args, _original=original, **kwargs):
            traced.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    return traced


def test_new_mix_in_same_bucket_does_not_recompile(argon, monkeypatch):
    """A new mix of sizes in the same bucket traces none of the programs again (a trace of
    the initial state builds the optimizer state, one of the loop evaluates)."""
    from molopt.engine import kernel
    from molopt.optimizers import FIRE

    traced = count_traces(monkeypatch, (kernel, "_evaluate"), (FIRE, "init"))
    settings = EngineSettings(fmax=1e-2)
    first = [(k, rattled_cluster(n, seed=k)) for k, n in enumerate((10, 12, 9))]
    second = [(k, rattled_cluster(n, seed=10 + k)) for k, n in enumerate((11, 8, 13))]
    jax.clear_caches()
    relax_structures(first, argon, settings)
    assert traced  # (the counter sees traces)
    traced.clear()
    relax_structures(second, argon, settings)
    assert not traced


def test_nan_in_one_system_leaves_others_bit_identical(argon):
    good = [rattled_cluster(13, seed=1), rattled_cluster(19, seed=2)]
    broken = rattled_cluster(13, seed=3)
    positions = broken.positions.copy()
    positions[4] = np.nan
    broken = Structure(broken.numbers, positions, broken.cell, broken.pbc, broken.fixed)
    settings = EngineSettings(fmax=1e-3)
    # same batch layout and schedule: the third structure leaves the batch at step 0 either
    # way (already relaxed, or NaN), so the others see identical batches
    (healthy,) = relax_structures([(0, rattled_cluster(13, seed=3))], argon, settings)
    healthy = healthy.structure
    clean = {
        r.key: r
        for r in relax_structures([(0, good[0]), (2, healthy), (1, good[1])], argon, settings)
    }
    mixed = {
        r.key: r
        for r in relax_structures([(0, good[0]), (2, broken), (1, good[1])], argon, settings)
    }
    assert mixed[2].status == "failed"
    for key in (0, 1):
        assert mixed[key].steps == clean[key].steps
        assert mixed[key].energy == clean[key].energy
        assert np.array_equal(mixed[key].structure.positions, clean[key].structure.positions)


class CollapsingKrypton(Potential):
    """Argon LJ, plus for Kr-Kr pairs a strong attraction and a log(r^2 - 9) term that is
    NaN once the pair is closer than 3 A: a Kr dimer relaxes into NaN after a few steps."""

    lj: LennardJones

    def energy(self, positions, cell, batch, nbrs):
        import jax.numpy as jnp

        from molopt.batch import system_sum
        from molopt.neighbors import pair_vectors

        dx, dy, dz = pair_vectors(positions, cell, batch.system_idx, nbrs)
        r2 = dx * dx + dy * dy + dz * dz
        krypton = (batch.numbers[None, :] == 36) & (batch.numbers[nbrs.index] == 36) & nbrs.mask
        r2_safe = jnp.where(krypton, r2, 16.0)
        extra = jnp.where(krypton, -10.0 / jnp.sqrt(r2_safe) + jnp.log(r2_safe - 9.0), 0.0)
        per_atom = 0.5 * jnp.sum(extra, axis=0)
        return self.lj.energy(positions, cell, batch, nbrs) + system_sum(
            per_atom, batch.system_idx, cell.shape[0]
        )


def test_explosion_mid_run_fails_alone(argon):
    potential = CollapsingKrypton(elements=(), cutoff=8.5, lj=argon)
    dimer = Structure(
        np.array([36, 36]),
        np.array([[0.0, 0, 0], [4.0, 0, 0]]),
        np.zeros((3, 3)),
        np.zeros(3, bool),
        np.zeros(2, bool),
    )
    cluster = compact_cluster(5.3, seed=4)
    settings = EngineSettings(fmax=1e-3, steps=5000)
    results = {
        r.key: r
        for r in relax_structures([("dimer", dimer), ("cluster", cluster)], potential, settings)
    }
    (alone,) = relax_structures([("cluster", cluster)], potential, settings)
    assert results["dimer"].status == "failed" and "non-finite" in results["dimer"].error
    assert 0 < results["dimer"].steps < 100
    assert results["cluster"].status == "converged"
    assert results["cluster"].steps == alone.steps
    np.testing.assert_allclose(
        results["cluster"].structure.positions, alone.structure.positions, atol=1e-10
    )


def test_neighbour_list_rebuilds_keep_results_exact(argon):
    """A tiny skin forces many rebuilds; the minimum and path match a generous skin."""
    crystal = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(3)
    crystal.rattle(0.2, seed=5)
    s = structure_from_atoms(crystal)
    (a,) = relax_structures([(0, s)], argon, EngineSettings(fmax=1e-3, skin=0.05))
    (b,) = relax_structures([(0, s)], argon, EngineSettings(fmax=1e-3, skin=2.0))
    assert a.steps == b.steps
    assert a.energy == pytest.approx(b.energy, abs=1e-10)


def test_costly_potentials_skip_stale_evaluations_with_the_same_results(argon, monkeypatch):
    """A ``costly`` potential's step evaluates only when every list is valid (a lax.cond);
    a cheap one evaluates and selects. Forced to rebuild often (a tiny skin, the cell
    relaxed), both paths give the same steps, energies and cells, the same as a skin that
    never goes stale; and the costly path evaluates fewer times."""
    from dataclasses import dataclass, fields

    from molopt.engine import kernel
    from molopt.potentials.base import static_pytree

    @static_pytree
    @dataclass(frozen=True, eq=False)
    class CostlyArgon(LennardJones):
        costly = True

    costly = CostlyArgon(**{f.name: getattr(argon, f.name) for f in fields(argon)})
    crystal = bulk("Ar", "fcc", a=5.4, cubic=True).repeat(2)
    crystal.rattle(0.2, seed=6)
    s = structure_from_atoms(crystal)
    settings = dict(fmax=1e-3, relax_cell=True)
    evaluations = []
    real = kernel._evaluate

    def counting(*args):
        jax.debug.callback(lambda: evaluations.append(1))
        return real(*args)

    monkeypatch.setattr(kernel, "_evaluate", counting)
    results, counts = {}, {}
    for potential in (argon, costly):
        evaluations.clear()
        (results[potential],) = relax_structures(
            [(0, s)], potential, EngineSettings(skin=0.05, **settings)
        )
        counts[potential] = len(evaluations)
    (wide,) = relax_structures([(0, s)], argon, EngineSettings(skin=3.0, **settings))
    for r in (results[costly], wide):
        assert r.steps == results[argon].steps
        assert r.energy == pytest.approx(results[argon].energy, abs=1e-10)
        np.testing.assert_allclose(r.structure.cell, results[argon].structure.cell, atol=1e-9)
    assert counts[costly] < counts[argon]


def test_compiled_code_dropped_near_the_mapping_limit(argon, monkeypatch):
    """XLA:CPU maps compiled code into memory; near Linux's per-process mapping cap the next
    compilation would crash the process, so relax_structures() drops compiled code first."""
    import molopt.startup as J

    if J._map_limit() is None:
        pytest.skip("no /proc/sys/vm/max_map_count on this system")
    from molopt.engine import kernel

    # compiled code is there when a relaxation does not trace its programs again
    traced = count_traces(monkeypatch, (kernel, "_evaluate"))
    settings = EngineSettings(fmax=1e-2)
    items = [(0, rattled_cluster(10, seed=4))]
    (before,) = relax_structures(items, argon, settings)
    assert not J.relieve_mapping_pressure()  # far below the cap: nothing dropped
    traced.clear()
    relax_structures(items, argon, settings)
    assert not traced  # the compiled programs were kept
    monkeypatch.setattr(J, "_map_limit", lambda: 10)  # as if at the cap
    assert J.relieve_mapping_pressure()
    (after,) = relax_structures(items, argon, settings)  # compiled again, same result
    assert traced
    assert after.steps == before.steps and after.energy == before.energy


def test_bucket_ladder_bounds_padding():
    from molopt.batch import bucket, plan_layout

    sizes = range(1, 300_000, 7)
    for fine in (False, True):
        padded = [bucket(n, fine=fine) for n in sizes]
        assert all(p >= n for p, n in zip(padded, sizes, strict=True))
        assert padded == sorted(padded)  # monotone: a bigger input never gets a smaller bucket
        worst = max(p / n for p, n in zip(padded, sizes, strict=True) if n > 4096)
        assert worst <= (1.125 if fine else 1.5)
    assert len({bucket(n) for n in sizes}) < len({bucket(n, fine=True) for n in sizes}) < 80
    # one large structure and batches of several get the fine ladder
    assert plan_layout([100_920]).n_padded_atoms == 106_496
    assert plan_layout([50_000, 50_920]).n_padded_atoms == 106_496
    assert plan_layout([40] * 241 + [20]).n_padded_atoms == 10_240


def test_accelerator_reductions_equal_segment_reductions(argon, monkeypatch):
    """On an accelerator per-system sums and maxima are one-hot contractions: the same sums
    (to rounding) and maxima as the segment reductions, padding rows (index S) dropped, an
    empty system at ``empty``, NaN kept; a batched relaxation with them takes the same steps
    to the same energies (forced here on the CPU)."""
    import jax.numpy as jnp

    from molopt import batch as B

    rng = np.random.default_rng(5)
    S, R = 4, 50
    system_idx = jnp.asarray(np.sort(rng.choice([0, 1, 3, 4], size=R)))  # system 2 empty
    values = jnp.asarray(rng.normal(size=(R, 3, 3)))
    row = jnp.asarray(rng.normal(size=R)).at[3].set(jnp.nan)
    segment = (B.system_sum(values, system_idx, S), B.system_max(row, system_idx, S, -7.0))
    monkeypatch.setattr(B, "_dense_reductions", lambda rows, systems: True)
    dense = (B.system_sum(values, system_idx, S), B.system_max(row, system_idx, S, -7.0))
    np.testing.assert_allclose(dense[0], segment[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(dense[1], segment[1])
    assert float(dense[1][2]) == -7.0 and np.isnan(dense[1][int(system_idx[3])])
    # a non-finite row stays in its own system (a product with 0/1 would spread it), and a
    # padding row (index S) is dropped whatever it holds
    padded_idx = system_idx.at[-1].set(S)
    poisoned = values.at[3].set(jnp.nan).at[-1].set(jnp.inf)
    got = B.system_sum(poisoned, padded_idx, S)
    monkeypatch.setattr(B, "_dense_reductions", lambda rows, systems: False)
    want = B.system_sum(poisoned, padded_idx, S)
    wide = B.system_max(values[:, :, 0], system_idx, S, -7.0)  # (R, 3): trailing dimensions
    monkeypatch.setattr(B, "_dense_reductions", lambda rows, systems: True)
    bad = int(system_idx[3])
    assert np.all(np.isnan(got[bad])) and np.all(np.isfinite(np.delete(np.asarray(got), bad, 0)))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(B.system_max(values[:, :, 0], system_idx, S, -7.0), wide)
    ints = jnp.arange(R, dtype=jnp.int32)
    assert np.array_equal(
        B.system_max(ints, system_idx, S),
        [int(ints[system_idx == s].max()) if (system_idx == s).any() else 0 for s in range(S)],
    )

    settings = EngineSettings(fmax=1e-3)
    structures = mixed_structures()[:3] + mixed_structures()[5:7]
    jax.clear_caches()  # traces made with the other reductions must not be reused
    forced = {r.key: r for r in relax_structures(list(enumerate(structures)), argon, settings)}
    monkeypatch.undo()
    jax.clear_caches()
    plain = {r.key: r for r in relax_structures(list(enumerate(structures)), argon, settings)}
    for key, result in plain.items():
        assert forced[key].status == result.status == "converged"
        assert forced[key].steps == result.steps
        assert forced[key].energy == pytest.approx(result.energy, rel=1e-10, abs=1e-10)
