"""How much memory a structure and a batch will need, estimated before anything is built.

A batch's arrays are dominated by its neighbour list and what the potential computes per
neighbour slot: the list is dense, ``A`` padded atoms times ``K`` slots, where ``K`` is the
largest number of neighbours any atom of the batch has within the cutoff plus the skin. So a
structure too dense for its potential's cutoff (thousands of atoms on a 0.5 A grid) needs
``A x K`` of tens of millions, and one such structure in a batch makes every atom pay its
``K``. The estimate (host arithmetic, no neighbour search):

* ``K`` from the number density: periodic structures ``N / V``; molecules and clusters
  their atoms over the volume of their bounding box (each side at least 1 A), doubled (a
  cluster fills about half its box), and never more than ``N - 1``;
* bytes per neighbour slot, per potential (:attr:`slot_bytes`, from XLA's memory analysis of
  its compiled force call: Lennard-Jones about 120, EMT about 250, the PaiNN networks about
  1,500), and per atom for the optimizer state and the step buffer;
* times a margin of 2 (XLA's temporaries, the host copies).

It is an estimate meant to stop what cannot fit before it starts (and to keep batches
under ``--max-memory``), not an accounting.
"""

from __future__ import annotations

import math
import os

import numpy as np

#: bytes per neighbour slot when a potential does not say
DEFAULT_SLOT_BYTES = 4096
#: per atom: the optimizer state (L-BFGS's 100 pairs dominate) and positions and forces of
#: 64 buffered steps, in float64
ATOM_BYTES = 2 * 100 * 3 * 8 + 2 * 64 * 3 * 8
MARGIN = 2.0


def neighbours_per_atom(structure, reach: float) -> float:
    """Estimated neighbours of an atom within ``reach`` A (cutoff + skin)."""
    n = structure.n_atoms
    sphere = 4.0 / 3.0 * math.pi * reach**3
    if structure.pbc.all() and structure.volume > 0:
        return n / structure.volume * sphere
    positions = np.asarray(structure.positions)
    with np.errstate(invalid="ignore"):
        sides = np.ptp(positions, axis=0) if n else np.zeros(3)
    sides = np.where(np.isfinite(sides), np.maximum(sides, 1.0), 1.0)  # NaN input: fails later
    if structure.pbc.any():  # periodic directions: the cell's extent
        lengths = np.linalg.norm(structure.cell, axis=1)
        sides = np.where(structure.pbc, np.maximum(lengths, 1.0), sides)
    density = 2.0 * n / float(np.prod(sides))
    estimate = density * sphere
    return estimate if structure.pbc.any() else min(estimate, max(n - 1, 0))


def slot_bytes(potential, dtype) -> float:
    per_slot = float(getattr(potential, "slot_bytes", DEFAULT_SLOT_BYTES))
    return per_slot * np.dtype(dtype).itemsize / 8


def batch_bytes(structures, potential, skin: float, dtype) -> int:
    """Estimated bytes of a batch of ``structures`` (their atoms padded up the bucket
    ladder by up to half)."""
    if not structures:
        return 0
    reach = float(potential.cutoff) + skin
    slots = max(neighbours_per_atom(s, reach) for s in structures)
    return bytes_for(sum(s.n_atoms for s in structures), slots, potential, dtype)


def bytes_for(n_atoms: int, neighbours: float, potential, dtype) -> int:
    """Estimated bytes of a batch of ``n_atoms`` atoms with at most ``neighbours`` per atom."""
    itemsize = np.dtype(dtype).itemsize / 8
    per_atom = (neighbours + 1) * slot_bytes(potential, dtype) + ATOM_BYTES * itemsize
    return int(MARGIN * 1.5 * n_atoms * per_atom)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is XLA's out-of-memory error (a GPU's, usually)."""
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def default_limit() -> int:
    """A safe share of the device's memory: 80% of an accelerator's, or half of the memory
    the operating system says is available (the host arrays and XLA's share it)."""
    from molopt._jax import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # pragma: no cover - a backend without statistics
            stats = {}
        if stats.get("bytes_limit"):
            return int(0.8 * stats["bytes_limit"])
    return int(0.5 * available_host_memory())


def available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def describe(n_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{n_bytes / 2**10:.3g} KiB"
