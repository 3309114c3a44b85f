"""ASE's optimizer benchmark with molopt: the same systems, the same optimizers, EMT.

    python bench/ase_optimizer_benchmark.py [--optimizers fire,lbfgs,bfgs] [--fmax 0.02]
                                            [--systems NAME,...] [--steps 1000] [--together]

The systems are ASE's own, ``ase.optimize.test.systems.get_systems()`` (ASE 3.29; the file
``ase/optimize/test/systems.py``), the ones ASE's ``ase/optimize/test/test.py`` relaxes with
``ase.calculators.emt.EMT`` to fmax 0.02 eV/A and counts force calls on: H2, shaken bulk Cu,
a distorted Cu(111) surface, CO on Au(111), pentane, C on Cu(100) and an Al cluster (EMT
covers every element of all seven; three carry FixAtoms). Each is relaxed from the same
start by ASE's optimizer with ASE's EMT and by molopt's optimizer of the same name (ASE's
defaults and step rules) with molopt's ``emt``, in float64, each system alone as ASE's
benchmark runs them (``--together``: molopt relaxes all seven in one batch).

Prints a markdown table: optimizer steps (ASE's ``nsteps``; ASE's test.py counts force
calls, one more than the steps for these optimizers) and final energies of both, and their
difference; then the same in the README's form, a line per system.

The rows are checked by tests/test_emt.py (a few of the fast ones).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FMAX = 0.02  # eV/A, ase/optimize/test/test.py's run_test
MAX_STEPS = 1000


def systems(names=None) -> list[tuple[str, object]]:
    """(description, Atoms) of ASE's benchmark, in its order; ``names`` selects by
    description."""
    from ase.optimize.test.systems import get_systems

    found = [(description, atoms) for atoms, description in get_systems()]
    if names:
        known = {d for d, _ in found}
        unknown = sorted(set(names) - known)
        if unknown:
            raise SystemExit(f"unknown system(s) {unknown}; known: {sorted(known)}")
        found = [(d, a) for d, a in found if d in names]
    return found


def ase_optimizer(name: str):
    import ase.optimize

    return {"fire": ase.optimize.FIRE, "lbfgs": ase.optimize.LBFGS, "bfgs": ase.optimize.BFGS}[name]


def ase_relax(atoms, name: str, fmax: float, steps: int) -> dict:
    from ase.calculators.emt import EMT

    atoms = atoms.copy()
    atoms.calc = EMT()
    optimizer = ase_optimizer(name)(atoms, logfile=None)
    start = time.perf_counter()
    converged = optimizer.run(fmax=fmax, steps=steps)
    return dict(
        steps=optimizer.nsteps,
        energy=atoms.get_potential_energy(),
        converged=bool(converged),
        seconds=time.perf_counter() - start,
    )


def molopt_relax(named_atoms, name: str, fmax: float, steps: int, together: bool) -> list[dict]:
    """molopt's optimizer ``name`` with molopt's emt on each system: one relaxation per
    system (as ASE's benchmark runs them), or all in one batch with ``together``."""
    from molopt.engine import EngineSettings, relax_structures
    from molopt.io.read import from_atoms
    from molopt.potentials.registry import load

    potential = load("emt").potential
    settings = EngineSettings(optimizer=name, fmax=fmax, steps=steps)
    jobs = [(d, from_atoms(a, source=d)) for d, a in named_atoms]
    groups = [jobs] if together else [[job] for job in jobs]
    found = {}
    for group in groups:
        start = time.perf_counter()
        for result in relax_structures(group, potential, settings):
            found[result.key] = (result, time.perf_counter() - start)
    return [
        dict(
            steps=found[d][0].steps,
            energy=found[d][0].energy,
            converged=found[d][0].status == "converged",
            seconds=found[d][1],
        )
        for d, _ in named_atoms
    ]


def available_optimizers() -> tuple[str, ...]:
    """fire, lbfgs, and bfgs when molopt has it."""
    from molopt.optimizers import NAMES

    return tuple(n for n in ("fire", "lbfgs", "bfgs") if n in NAMES)


def rows(
    optimizers, fmax: float = FMAX, names=None, steps: int = MAX_STEPS, together: bool = False
) -> list[dict]:
    """One row per (optimizer, system): ASE's and molopt's steps, energies, convergence."""
    named = systems(names)
    out = []
    for name in optimizers:
        ours = molopt_relax(named, name, fmax, steps, together)
        for (description, atoms), mine in zip(named, ours, strict=True):
            theirs = ase_relax(atoms, name, fmax, steps)
            fixed = sum(len(c.index) for c in atoms.constraints)
            out.append(
                dict(
                    optimizer=name,
                    system=description,
                    atoms=len(atoms),
                    fixed=fixed,
                    ase=theirs,
                    molopt=mine,
                    delta_energy=abs(mine["energy"] - theirs["energy"]),
                )
            )
    return out


def markdown(table: list[dict], fmax: float) -> str:
    def steps(r):
        return str(r["steps"]) if r["converged"] else f"{r['steps']} (not converged)"

    lines = [
        "| optimizer | system | atoms (fixed) | ASE steps | molopt steps | ASE energy (eV) "
        "| molopt energy (eV) | abs. difference (eV) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['optimizer']} | {r['system']} | {r['atoms']} ({r['fixed']}) "
            f"| {steps(r['ase'])} | {steps(r['molopt'])} | {r['ase']['energy']:.10f} "
            f"| {r['molopt']['energy']:.10f} | {r['delta_energy']:.1e} |"
        )
    same = sum(r["ase"]["steps"] == r["molopt"]["steps"] for r in table)
    worst = max(r["delta_energy"] for r in table)
    lines.append("")
    lines.append(
        f"fmax {fmax} eV/A, float64: {same} of {len(table)} rows take the same number of "
        f"steps; largest energy difference {worst:.1e} eV."
    )
    return "\n".join(lines)


def summary(table: list[dict]) -> str:
    """The README's form: one line per system, steps as ASE / molopt for each optimizer,
    and the largest energy difference over the optimizers."""
    optimizers = list(dict.fromkeys(r["optimizer"] for r in table))
    by_system: dict[str, dict] = {}
    for r in table:
        by_system.setdefault(r["system"], {"atoms": r["atoms"], "fixed": r["fixed"]})
        by_system[r["system"]][r["optimizer"]] = r
    head = " | ".join(f"{name.upper()} steps ASE / molopt" for name in optimizers)
    lines = [
        f"| system | atoms (fixed) | {head} | largest abs. energy difference (eV) |",
        "|---|---|" + "---:|" * (len(optimizers) + 1),
    ]
    for system, entry in by_system.items():
        cells = []
        for name in optimizers:
            r = entry[name]
            mark = "" if r["ase"]["converged"] and r["molopt"]["converged"] else " (not conv.)"
            cells.append(f"{r['ase']['steps']} / {r['molopt']['steps']}{mark}")
        worst = max(entry[name]["delta_energy"] for name in optimizers)
        lines.append(
            f"| {system} | {entry['atoms']} ({entry['fixed']}) | {' | '.join(cells)} "
            f"| {worst:.0e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default=",".join(available_optimizers()))
    parser.add_argument("--fmax", type=float, default=FMAX)
    parser.add_argument("--steps", type=int, default=MAX_STEPS)
    parser.add_argument("--systems", default="", help="comma-separated descriptions")
    parser.add_argument(
        "--together", action="store_true", help="molopt relaxes all systems in one batch"
    )
    args = parser.parse_args(argv)
    import molopt._jax  # noqa: F401  (float64 on)

    names = [s for s in args.systems.split(",") if s] or None
    optimizers = [o for o in args.optimizers.split(",") if o]
    missing = sorted(set(optimizers) - set(available_optimizers()))
    if missing:
        raise SystemExit(f"molopt has no optimizer {missing}")
    table = rows(optimizers, args.fmax, names, args.steps, args.together)
    print(markdown(table, args.fmax))
    print()
    print(summary(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
