"""``ase.io`` for molopt's readers and writers, imported without the SciPy it does not
need: the trick and its reason are :mod:`molopt.startup`, section 2."""

from __future__ import annotations

from molopt.startup import DEFERRED, ase_io

__all__ = ["DEFERRED", "ase_io"]
