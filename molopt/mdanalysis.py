"""MDAnalysis reads molopt's trajectories with their atoms named, typed and with elements.

MDAnalysis reads the coordinates, forces, box and observables of an H5MD file by itself, but
it has no topology reader for H5MD: without one its atoms have no names, types, elements or
masses (selections by element fail, and it warns on every open). Importing this module
registers a topology reader for the ``H5MD`` format that takes them from the file
(``/particles/trajectory/species``, and ``mass`` and ``charge`` where present)::

    import MDAnalysis as mda
    import molopt.mdanalysis  # noqa: F401  (registers the reader)

    u = mda.Universe("results/ar108-fcc.h5md")
    u.select_atoms("element Ar")

Files written by other H5MD writers without ``species`` keep MDAnalysis's minimal topology.
"""

from __future__ import annotations

import h5py
import numpy as np
from ase.data import atomic_masses, chemical_symbols
from MDAnalysis.core.topology import Topology
from MDAnalysis.core.topologyattrs import (
    Atomids,
    Atomnames,
    Atomtypes,
    Charges,
    Elements,
    Masses,
    Resids,
    Resnums,
    Segids,
)
from MDAnalysis.topology.base import TopologyReaderBase
from MDAnalysis.topology.MinimalParser import MinimalParser


class MoloptH5MDParser(TopologyReaderBase):
    """Topology of an H5MD trajectory from its species (atomic numbers)."""

    format = "H5MD"

    def parse(self, **kwargs):
        with h5py.File(self.filename, "r") as f:
            traj = f.get("particles/trajectory")
            if traj is None or "species" not in traj:
                return MinimalParser(self.filename).parse(**kwargs)
            numbers = np.asarray(traj["species"][()], np.int64)
            masses = traj["mass"][()] if "mass" in traj else atomic_masses[numbers]
            charges = traj["charge"][()] if "charge" in traj else None
        symbols = np.array([chemical_symbols[z] for z in numbers], dtype=object)
        n = len(numbers)
        attrs = [
            Atomids(np.arange(1, n + 1)),
            Atomnames(symbols.copy()),
            Atomtypes(symbols.copy()),
            Elements(symbols.copy()),
            Masses(np.asarray(masses, np.float64)),
            Resids(np.array([1])),
            Resnums(np.array([1])),
            Segids(np.array(["SYSTEM"], dtype=object)),
        ]
        if charges is not None:
            attrs.append(Charges(np.asarray(charges, np.float64)))
        return Topology(n, 1, 1, attrs=attrs)
