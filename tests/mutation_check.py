"""A small mutation check of the core: plausible bugs put into the code one at a time, and
whether the test suite notices each one.

    python tests/mutation_check.py              # every mutant (about 30-60 minutes on 2 cores)
    python tests/mutation_check.py -k fire      # mutants whose name contains "fire"
    python tests/mutation_check.py --list

Each mutant replaces one exact piece of source text (it must occur where stated, so a mutant
whose target has been rewritten is reported as stale instead of silently passing). The tree
is copied to a temporary directory (tracked and untracked, not ignored, files), the mutant
applied there, and the test files that exercise the mutated code are run against the copy
(``PYTHONPATH`` first, so the copy's ``molopt`` is imported, not the installed one) with
``-x``: a mutant is *caught* when some test fails, *survived* when all pass. The score is
caught / tried. Hand-written (rather than ``mutmut``) because the interesting bugs here are
physics rules (a sign, a factor, an off-by-one in a step rule) chosen from ASE's semantics,
not every operator swap, and because each mutant must run only the tests that exercise it to
fit this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OPTIMIZER_TESTS = ("tests/test_optimizers.py", "tests/test_batch.py")
CLI_TESTS = ("tests/test_cli.py",)
CELL_OPTION_TESTS = ("tests/test_cell_options.py::test_parity_with_ase_filter_options",)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    occurrence: int = 0  # which occurrence of ``old`` (they are counted and must exist)


MUTANTS = [
    # -- FIRE / FIRE2 step rules (ASE's ase.optimize.FIRE, FIRE2) -----------------------
    Mutant(
        "fire: dt grows after n_min positive steps, not n_min + 1",
        "molopt/optimizers/fire.py",
        "grow = positive & (state.n_positive > self.n_min)",
        "grow = positive & (state.n_positive >= self.n_min)",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "fire: dt not decreased on uphill power",
        "molopt/optimizers/fire.py",
        "dt = jnp.where(reset, state.dt * self.fdec, dt)",
        "dt = jnp.where(reset, state.dt, dt)",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "fire: velocity not zeroed on uphill power",
        "molopt/optimizers/fire.py",
        "v = jnp.where(rows.expand(reset), 0.0, v)\n",
        "v = v\n",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "fire: mixing uses the new alpha instead of the old",
        "molopt/optimizers/fire.py",
        "a = rows.expand(state.alpha)",
        "a = rows.expand(alpha)",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "fire: maxstep caps each component instead of the step's norm",
        "molopt/optimizers/fire.py",
        "    return dr * rows.expand(scale)\n",
        "    return jnp.clip(dr, -maxstep, maxstep)\n",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "fire2: dt may fall below dtmin",
        "molopt/optimizers/fire.py",
        "dt = jnp.where(reset, jnp.maximum(state.dt * self.fdec, self.dtmin), dt)",
        "dt = jnp.where(reset, state.dt * self.fdec, dt)",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "fire2: steps back a whole step instead of half",
        "molopt/optimizers/fire.py",
        "back = -0.5 * rows.expand(dt) * v",
        "back = -1.0 * rows.expand(dt) * v",
        OPTIMIZER_TESTS,
    ),
    # -- L-BFGS (ase.optimize.LBFGS) ----------------------------------------------------
    Mutant(
        "lbfgs: gradient difference with the wrong sign",
        "molopt/optimizers/lbfgs.py",
        "y_new = state.f0 - forces",
        "y_new = forces - state.f0",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "lbfgs: initial inverse Hessian 1 instead of 1/alpha",
        "molopt/optimizers/lbfgs.py",
        "z = q / self.alpha",
        "z = q",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "lbfgs: step scaled by the whole step's norm, not the largest row",
        "molopt/optimizers/lbfgs.py",
        "longest = rows.max_norm(direction)",
        "longest = jnp.sqrt(rows.dot(direction, direction))",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "lbfgs: one pair too many in the first loop",
        "molopt/optimizers/lbfgs.py",
        "valid = t < n_pairs\n            a_t",
        "valid = t <= n_pairs\n            a_t",
        OPTIMIZER_TESTS,
    ),
    # -- variable cell (ase.filters.FrechetCellFilter) ------------------------------------
    Mutant(
        "cell: the target stress (pressure) enters with the wrong sign",
        "molopt/optimizers/cell.py",
        "virial = -(dE_dstrain - volume[:, None, None] * reference.stress)",
        "virial = -(dE_dstrain + volume[:, None, None] * reference.stress)",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "cell: cell forces not divided by exp_cell_factor",
        "molopt/optimizers/cell.py",
        "cell_rows = log_forces / reference.factor[:, None, None]",
        "cell_rows = log_forces",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "cell: atom forces use F transposed",
        "molopt/optimizers/cell.py",
        'atom_rows = jnp.einsum("ax,axy->ay", forces, F[system_of_atom])',
        'atom_rows = jnp.einsum("ax,ayx->ay", forces, F[system_of_atom])',
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "cell: hydrostatic_strain ignored",
        "molopt/optimizers/cell.py",
        "virial = jnp.where(reference.hydrostatic[:, None, None], _diagonal_trace(virial), virial)",
        "virial = virial",
        CELL_OPTION_TESTS,
    ),
    Mutant(
        "cell: constant_volume does not remove the trace",
        "molopt/optimizers/cell.py",
        "        log_forces - _diagonal_trace(log_forces),\n",
        "        log_forces,\n",
        CELL_OPTION_TESTS,
    ),
    Mutant(
        "cell: steps outside a block mask are kept",
        "molopt/optimizers/cell.py",
        "free = jnp.where(reference.roundtrip[:, None, None], 1.0, reference.mask)",
        "free = jnp.ones_like(reference.mask)",
        CELL_OPTION_TESTS,
    ),
    Mutant(
        "cell: U not read back from the masked cell",
        "molopt/optimizers/cell.py",
        "u = jnp.where(reference.roundtrip[:, None, None], jax.vmap(_logm)(masked), u)",
        "u = u",
        CELL_OPTION_TESTS,
    ),
    Mutant(
        "cell: a slab's vacuum direction is free",
        "molopt/optimizers/cell_options.py",
        "return given & np.outer(periodic, periodic)",
        "return given",
        CELL_OPTION_TESTS,
    ),
    # -- the engine's convergence and constraint rules ------------------------------------
    Mutant(
        "convergence: fmax ignores the cell rows (stops cell relaxations early)",
        "molopt/engine/kernel.py",
        "fmax = rows.max_norm(generalized)",
        "fmax = rows.max_norm(jnp.where(jnp.arange(generalized.shape[0])[:, None]"
        " < forces.shape[0], generalized, 0.0))",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "convergence: max_steps allows one step more",
        "molopt/engine/kernel.py",
        "(n_steps >= targets.max_steps)",
        "(n_steps > targets.max_steps)",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "convergence: fmax <= target instead of <",
        "molopt/engine/kernel.py",
        "(fmax < targets.fmax)",
        "(fmax <= targets.fmax)",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "constraints: FixAtoms ignored",
        "molopt/engine/kernel.py",
        "constrained = jnp.where(batch.fixed[:, None], 0.0, forces)",
        "constrained = forces",
        OPTIMIZER_TESTS,
    ),
    Mutant(
        "trajectory: the last frame is not always written",
        "molopt/engine/reporting.py",
        "        if final:\n            keep[-1] = True\n",
        "",
        ("tests/test_h5md.py", "tests/test_cli.py"),
    ),
    # -- Lennard-Jones ----------------------------------------------------------------------
    Mutant(
        "lj: shift added instead of subtracted",
        "molopt/potentials/lennard_jones.py",
        "energy = energy - 4.0 * eps * (c6_rc * c6_rc - c6_rc)",
        "energy = energy + 4.0 * eps * (c6_rc * c6_rc - c6_rc)",
        ("tests/test_lennard_jones.py",),
    ),
    Mutant(
        "lj: sigma mixed geometrically (not Lorentz-Berthelot)",
        "molopt/potentials/lennard_jones.py",
        "sig = 0.5 * (self.sigma[:, None] + self.sigma[None, :])",
        "sig = jnp.sqrt(self.sigma[:, None] * self.sigma[None, :])",
        ("tests/test_lennard_jones.py",),
    ),
    Mutant(
        "lj: force derivative with c12 instead of 2 c12",
        "molopt/potentials/lennard_jones.py",
        "d_energy_d_r2 = -12.0 * eps * (2.0 * c12 - c6) / r2_safe",
        "d_energy_d_r2 = -12.0 * eps * (c12 - c6) / r2_safe",
        ("tests/test_lennard_jones.py",),
    ),
    Mutant(
        "lj: strain derivative (stress) doubled",
        "molopt/potentials/lennard_jones.py",
        "half = 0.5 * scale",
        "half = scale",
        ("tests/test_lennard_jones.py",),
    ),
    Mutant(
        "lj: energy-only path counts each pair twice",
        "molopt/potentials/lennard_jones.py",
        "atom_energy = 0.5 * jnp.sum(pair_energy, axis=0)\n        return system_sum",
        "atom_energy = jnp.sum(pair_energy, axis=0)\n        return system_sum",
        ("tests/test_lennard_jones.py",),
    ),
    # -- resume, shard, the command line ----------------------------------------------------
    Mutant(
        "resume: the run identity ignores the settings",
        "molopt/io/results.py",
        '"settings": settings,',
        '"settings": None,',
        ("tests/test_resume.py", "tests/test_cli.py"),
    ),
    Mutant(
        "resume: a partial output (extxyz without trajectory) counts as done",
        "molopt/run.py",
        'if same and state == "complete" and not settings.overwrite:',
        "if same and not settings.overwrite:",
        ("tests/test_resume.py", "tests/test_cli.py"),
    ),
    Mutant(
        "shard: every file goes to shard 0",
        "molopt/run.py",
        "return [p for k, p in enumerate(paths) if k % n == i]",
        "return [p for k, p in enumerate(paths) if i == 0]",
        CLI_TESTS,
    ),
    Mutant(
        "cli: --pressure not converted from GPa",
        "molopt/run.py",
        "pressure=settings.pressure * GPA,",
        "pressure=settings.pressure,",
        CLI_TESTS,
    ),
    Mutant(
        "cli: --skin not passed to the engine",
        "molopt/run.py",
        "skin=settings.skin,",
        "",
        CLI_TESTS,
    ),
    Mutant(
        "cli: --max-batch-atoms not passed to the engine",
        "molopt/run.py",
        "max_batch_atoms=settings.max_batch_atoms,",
        "",
        CLI_TESTS,
    ),
    Mutant(
        "cli: --maxstep dropped",
        "molopt/config.py",
        "    if not options:\n        return settings",
        "    if True:\n        return settings",
        CLI_TESTS,
    ),
    Mutant(
        "cli: --recursive searches only the top folder",
        "molopt/io/read.py",
        'pattern = "**/*" if recursive else "*"',
        'pattern = "*"',
        CLI_TESTS,
    ),
    Mutant(
        "plot: the energy curves are not drawn",
        "molopt/io/plot.py",
        'ax_e.plot(data["step"], energy, lw=1.2, label=label)',
        "ax_e.plot([], [], lw=1.2, label=label)",
        ("tests/test_results.py",),
    ),
    # -- H5MD writer ------------------------------------------------------------------------
    Mutant(
        "h5md: kJ/mol force conversion inverted",
        "molopt/io/h5md.py",
        'np.asarray(data["forces"], np.float32) * np.float32(EV_TO_KJ_PER_MOL)',
        'np.asarray(data["forces"], np.float32) / np.float32(EV_TO_KJ_PER_MOL)',
        ("tests/test_h5md.py",),
    ),
    Mutant(
        "h5md: every axis written as periodic",
        "molopt/io/h5md.py",
        'b"periodic" if p else b"none"',
        'b"periodic"',
        ("tests/test_h5md.py",),
    ),
]


def copy_tree(destination: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def apply(tree: Path, mutant: Mutant) -> str | None:
    """The original text of the mutated file, or None when the target is missing."""
    path = tree / mutant.path
    text = path.read_text()
    parts = text.split(mutant.old)
    if len(parts) <= mutant.occurrence + 1:
        return None
    k = mutant.occurrence
    mutated = mutant.old.join(parts[: k + 1]) + mutant.new + mutant.old.join(parts[k + 1 :])
    path.write_text(mutated)
    return text


def run(tree: Path, mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    original = apply(tree, mutant)
    if original is None:
        return "stale", 0.0, f"target text not found in {mutant.path}"
    env = dict(
        os.environ,
        PYTHONPATH=str(tree),
        MOLOPT_CACHE_DIR=os.environ.get("MOLOPT_CACHE_DIR", str(ROOT / ".molopt-cache")),
    )
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
        )
        outcome = "survived" if proc.returncode == 0 else "caught"
        failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
        detail = failed[0][7:] if failed else proc.stdout.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        outcome, detail = "caught", "timed out (the mutant hangs)"
    finally:
        (tree / mutant.path).write_text(original)
    return outcome, time.perf_counter() - t, str(detail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=1200.0)
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.path}; {' '.join(m.tests)}]")
        return 0
    tally: dict[str, list[Mutant]] = {"caught": [], "survived": [], "stale": []}
    with tempfile.TemporaryDirectory(prefix="molopt-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for m in chosen:
            outcome, seconds, detail = run(tree, m, args.timeout)
            tally[outcome].append(m)
            print(f"{outcome:8s} {seconds:6.0f} s  {m.name}  -- {detail}", flush=True)
    tried = len(tally["caught"]) + len(tally["survived"])
    print(f"\nmutation score: {len(tally['caught'])} caught / {tried} tried", flush=True)
    for m in tally["survived"]:
        print(f"  survived: {m.name}")
    for m in tally["stale"]:
        print(f"  stale (target text changed): {m.name}")
    return 1 if tally["stale"] else 0


if __name__ == "__main__":
    sys.exit(main())
