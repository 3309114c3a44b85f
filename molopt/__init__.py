"""molopt: relax atomic structures with differentiable JAX potentials.

Python API (imports JAX on first use):

    molopt.relax(atoms_or_list, potential="argon", optimizer="fire", fmax=0.05)
    molopt.load_potential("argon")
    molopt.read_trajectory("result.h5md")
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "relax", "load_potential", "read_trajectory"]


def __getattr__(name):
    if name in ("relax", "load_potential", "read_trajectory"):
        from molopt import api

        return getattr(api, name)
    raise AttributeError(f"module 'molopt' has no attribute {name!r}")
