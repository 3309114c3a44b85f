"""The engine's host-side parts on their own: declared field scopes, admission into a batch,
the repack policy, and the transplant of systems between batches."""

from collections import deque
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from molopt.batch import plan_layout
from molopt.engine import policy, transplant
from molopt.engine.state import RelaxState
from molopt.optimizers import LBFGS
from molopt.scopes import ATOM, GLOBAL, NESTED, ROW, SYSTEM, batched_state, scope_of, scoped


def test_a_state_field_without_a_scope_is_refused():
    with pytest.raises(TypeError, match="velocity"):

        @batched_state
        class Broken:
            velocity: np.ndarray
            dt: np.ndarray = scoped(SYSTEM)

    with pytest.raises(ValueError):
        scoped("per-molecule")


def test_relax_state_declares_every_scope():
    assert scope_of(RelaxState, "x") == (ROW, 0)
    assert scope_of(RelaxState, "positions") == (ATOM, 0)
    assert scope_of(RelaxState, "status") == (SYSTEM, 0)
    assert scope_of(RelaxState, "pending") == (GLOBAL, 0)
    assert scope_of(RelaxState, "opt") == (NESTED, 0)
    from molopt.optimizers.lbfgs import LbfgsState

    assert scope_of(LbfgsState, "s") == (ROW, 1) and scope_of(LbfgsState, "rho") == (SYSTEM, 1)


def item(n, periodic=False):
    return SimpleNamespace(structure=SimpleNamespace(n_atoms=n, pbc=np.array([periodic] * 3)))


def test_admission_bounds_structures_atoms_and_kinds():
    queue = deque([item(10), item(10), item(10), item(50), item(5)])
    assert [it.structure.n_atoms for it in policy.admit(queue, [], 2, 1000)] == [10, 10]
    assert [it.structure.n_atoms for it in policy.admit(queue, [], 9, 55)] == [10]
    assert [it.structure.n_atoms for it in policy.admit(queue, [], 9, 40)] == [50]  # alone
    keep = [item(3)]
    assert [it.structure.n_atoms for it in policy.admit(queue, keep, 9, 40)] == [3, 5]
    mixed = deque([item(4, True), item(4, False)])
    assert len(policy.admit(mixed, [], 9, 100)) == 1 and len(mixed) == 1


def test_repack_refills_when_a_quarter_is_free():
    layout = plan_layout([16] * 8)
    assert layout.n_padded_atoms == 128
    free = lambda target: 0.0  # noqa: E731
    repack, _ = policy.should_repack(layout, [16] * 7, True, 1, 0.0, policy.Idle(), 1.0, free)
    assert not repack  # one of eight systems done, 7/8 of the atoms busy
    repack, _ = policy.should_repack(layout, [16] * 6, True, 1, 0.0, policy.Idle(), 1.0, free)
    assert repack  # a quarter of the atoms free
    repack, _ = policy.should_repack(
        layout, [16, 16, 16, 16, 16, 8], True, 2, 0.0, policy.Idle(), 1.0, free
    )
    assert repack  # a quarter of the systems done


def test_refill_waits_until_the_free_atoms_have_wasted_a_start():
    """With structures waiting, a batch with a quarter free refills once the device time
    its free atoms wasted reaches what a start costs (rent or buy): at once when starts are
    cheap, after a few chunks when a start compiles, and never while under a quarter free."""
    layout = plan_layout([16] * 8)  # 128 padded atoms
    decisions = []
    idle = policy.Idle()
    for _ in range(5):  # half the atoms free, each chunk 1 s: 0.5 s wasted per chunk
        repack, idle = policy.should_repack(
            layout, [16] * 4, True, 4, 1.0, idle, 1.0, lambda t: 1.2
        )
        decisions.append(repack)
    # the first chunk ran before the batch had room; then 0.5 s, 1.0 s, 1.5 s wasted
    assert decisions == [False, False, False, True, True]
    repack, _ = policy.should_repack(
        layout, [16] * 4, True, 4, 1.0, policy.Idle(), 1.0, lambda t: 0
    )
    assert repack
    idle = policy.Idle(wasted_s=100.0, fraction=0.1)
    repack, _ = policy.should_repack(layout, [16] * 7, True, 1, 1.0, idle, 1.0, lambda t: 0.0)
    assert not repack  # one of eight done: no room yet, whatever was wasted
    alone = plan_layout([5])  # one structure in 8 padded atoms, nothing done yet
    repack, _ = policy.should_repack(alone, [5], True, 0, 1.0, idle, 1.0, lambda t: 0.0)
    assert not repack  # its padding is no room: repacking would rebuild the same batch
    # idle atoms that cost a fifth of a running one's (their rows skipped) waste a fifth
    for cost, first in ((1.0, 1), (0.2, 5)):
        idle, decisions = policy.Idle(), []
        for _ in range(8):
            repack, idle = policy.should_repack(
                layout, [16] * 4, True, 4, 1.0, idle, cost, lambda t: 0.45
            )
            decisions.append(repack)
        assert decisions.index(True) == first, cost


def test_compaction_waits_until_the_waste_pays_for_the_move():
    layout = plan_layout([100] * 16)
    idle = policy.Idle()
    decisions = []
    for _ in range(5):  # one system of 16 left: sparse; each chunk 1 s of device time
        repack, idle = policy.should_repack(layout, [100], False, 15, 1.0, idle, 1.0, lambda t: 2.5)
        decisions.append(repack)
    # the first chunk ran before the batch was known to be sparse; then ~0.9 s per chunk
    assert decisions == [False, False, False, True, True]
    # where idle systems cost little (rows skipped), fewer systems in as many atoms is no
    # reason to move (it would relaunch the same program forever)
    one = plan_layout([8])
    padded = type(one)(one.offsets, one.n_padded_atoms, 64)
    idle = policy.Idle(wasted_s=100.0, fraction=0.5)
    for cost in (0.2, 1.0):
        repack, _ = policy.should_repack(padded, [8], False, 0, 1.0, idle, cost, lambda t: 0.0)
        assert repack == (cost == 1.0), cost
    assert policy.compaction_cost(layout, set(), {"new": 3.0, "known": 1.0}) == 3.0
    seen = {(layout.n_padded_atoms, layout.n_systems, (), 0)}
    assert policy.compaction_cost(layout, seen, {"new": 3.0, "known": 1.0}) == 1.0
    assert policy.compaction_cost(layout, seen, {"new": 3.0}, override=7.0) == 7.0
    # row-form lists: known only where a program of as many atoms, at least the systems and
    # between the rows needed and row_reuse times as many ran before
    A, S = layout.n_padded_atoms, layout.n_systems
    seen = {(A, S + 8, (0, 0, 160), 27)}
    cost = {"new": 10.0, "known": 0.5}
    for rows, expected in ((160, 0.5), (128, 0.5), (112, 10.0), (176, 10.0)):
        assert policy.compaction_cost(layout, seen, cost, rows=rows, row_reuse=1.25) == expected
    assert policy.compaction_cost(plan_layout([100] * 32), seen, cost, rows=160) == 10.0


@pytest.mark.parametrize("variable_cell", [False, True])
def test_transplant_moves_every_field_to_its_new_place(variable_cell):
    """A system cut out of one batch and written into another at a different place carries
    every per-row, per-atom and per-system entry, the optimizer's included; nothing else in
    the target batch changes."""

    rng = np.random.default_rng(0)
    source_layout = plan_layout([3, 5, 4])
    target_layout = plan_layout([2, 5, 6, 1])

    def state(layout, seed):
        A, S = layout.n_padded_atoms, layout.n_systems
        R = A + (3 * S if variable_cell else 0)
        r = np.random.default_rng(seed)
        opt = LBFGS(memory=4).init(R, S, np.float64)
        opt = type(opt)(**{k: r.normal(size=v.shape) for k, v in vars(opt).items()})
        return RelaxState(
            x=r.normal(size=(R, 3)),
            positions=r.normal(size=(A, 3)),
            cell=r.normal(size=(S, 3, 3)),
            forces=r.normal(size=(A, 3)),
            generalized=r.normal(size=(R, 3)),
            energy=r.normal(size=S),
            dE_dstrain=r.normal(size=(S, 3, 3)),
            fmax=r.normal(size=S),
            n_steps=r.integers(0, 9, S),
            status=r.integers(0, 3, S),
            completes=r.integers(0, 2, S).astype(bool),
            pending=np.asarray(False),
            opt=opt,
        )

    source, target = state(source_layout, 1), state(target_layout, 2)
    saved = transplant.extract(source, 1, source_layout, variable_cell)
    moved = jax.device_get(transplant.restore(target, {1: saved}, target_layout, variable_cell))
    del rng
    src_atoms, dst_atoms = source_layout.atoms_of(1), target_layout.atoms_of(1)

    def rows(layout, k):
        r = np.arange(layout.atoms_of(k).start, layout.atoms_of(k).stop)
        if variable_cell:
            A = layout.n_padded_atoms
            r = np.concatenate([r, np.arange(A + 3 * k, A + 3 * k + 3)])
        return r

    src_rows, dst_rows = rows(source_layout, 1), rows(target_layout, 1)
    for name in ("x", "generalized"):
        np.testing.assert_array_equal(
            getattr(moved, name)[dst_rows], getattr(source, name)[src_rows]
        )
    for name in ("positions", "forces"):
        np.testing.assert_array_equal(
            getattr(moved, name)[dst_atoms], getattr(source, name)[src_atoms]
        )
    for name in ("cell", "energy", "dE_dstrain", "fmax", "n_steps", "status", "completes"):
        np.testing.assert_array_equal(getattr(moved, name)[1], getattr(source, name)[1])
    np.testing.assert_array_equal(moved.opt.s[:, dst_rows], source.opt.s[:, src_rows])
    np.testing.assert_array_equal(moved.opt.rho[:, 1], source.opt.rho[:, 1])
    np.testing.assert_array_equal(moved.opt.iteration[1], source.opt.iteration[1])
    # the other systems of the target are untouched
    others = np.setdiff1d(np.arange(len(target.x)), dst_rows)
    np.testing.assert_array_equal(moved.x[others], target.x[others])
    np.testing.assert_array_equal(moved.energy[[0, 2, 3]], target.energy[[0, 2, 3]])
    np.testing.assert_array_equal(moved.opt.s[:, others], np.asarray(target.opt.s)[:, others])


def test_one_table_of_optimizers():
    """The command line's choices, the settings' checks and the engine read one table; each
    optimizer's options are its dataclass fields."""
    from molopt import config
    from molopt.cli import OptimizerName
    from molopt.errors import ConfigError
    from molopt.optimizers import NAMES, optimizer_class, option_names

    assert (
        [m.value for m in OptimizerName] == list(NAMES) == ["fire", "fire2", "lbfgs", "bfgs", "gd"]
    )
    for name in NAMES:
        assert optimizer_class(name).name == name
    assert option_names("fire") >= {"dt", "maxstep", "astart", "a"}
    assert option_names("lbfgs") == {"maxstep", "memory", "damping", "alpha"}
    config.validate({"optimizer": "fire2", "optimizer_options": {"dtmin": 0.01}})
    with pytest.raises(ConfigError, match="dtmin"):
        config.validate({"optimizer": "fire", "optimizer_options": {"dtmin": 0.01}})
