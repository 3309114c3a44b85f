"""How the engine relaxes: one frozen value (units: eV, A, eV/A^3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from molopt.optimizers import optimizer_class


@dataclass(frozen=True)
class EngineSettings:
    """How to relax: optimizer name and options, fmax (eV/A), max steps, variable cell and
    pressure (eV/A^3), precision, neighbour skin (A), steps per jit call, batch limits, the
    trajectory sampling interval (0: first and last frames only) and whether periodic
    structures get their final stress."""

    optimizer: str = "fire"
    optimizer_options: tuple = ()
    fmax: float = 0.05
    steps: int = 10_000
    relax_cell: bool = False
    pressure: float = 0.0
    #: variable-cell options (:mod:`molopt.optimizers.cell`): free strain components, six
    #: Voigt booleans (None: all; only periodic directions are ever free), a target stress,
    #: six Voigt values in eV/A^3 (positive = tensile; None: none), ASE's hydrostatic_strain
    #: and constant_volume
    cell_mask: tuple | None = None
    stress: tuple | None = None
    hydrostatic: bool = False
    constant_volume: bool = False
    precision: str = "float64"
    #: None: the potential's ``default_skin``
    skin: float | None = None
    chunk: int = 64
    batch_size: int = 1024
    #: None: the potential's on this device (``PotentialMethods.batch_atoms``)
    max_batch_atoms: int | None = None
    trajectory_interval: int = 1
    final_stress: bool = True
    #: a structure whose energy per atom falls below -explode_energy (eV) has exploded: no
    #: physical energy is that low (a learned potential's hole), so it stops there
    explode_energy: float = 1000.0
    #: bytes a batch may need (:mod:`molopt.engine.memory`'s estimate); None: a safe share of
    #: the device's memory. A structure that alone needs more fails with the reason.
    max_memory: int | None = None

    @property
    def dtype(self):
        return np.float64 if self.precision == "float64" else np.float32

    def make_optimizer(self):
        return optimizer_class(self.optimizer)(**dict(self.optimizer_options))


def chunk_for(n_atoms: int, requested: int) -> int:
    """Steps per jit call so that the frame buffer stays under ~256 MB."""
    per_step = max(n_atoms, 1) * 3 * 8 * 2
    return int(max(1, min(requested, 2 ** math.floor(math.log2(max(1, 2**28 // per_step))))))
