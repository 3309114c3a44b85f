"""vesin for molopt's neighbour lists, imported without PyTorch and CuPy in the molopt
program: the trick and its reason are :mod:`molopt.startup`, section 1."""

from __future__ import annotations

from molopt.startup import REFUSED, neighbor_list, standalone, vesin

__all__ = ["REFUSED", "neighbor_list", "standalone", "vesin"]
