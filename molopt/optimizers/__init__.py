"""Gradient-based optimizers as pure ``init``/``step`` pairs over a flat batch of rows.

A *row* is one 3-vector degree of freedom: an atom, or (variable cell) one of the three
rows of a system's log-deformation. Every reduction is per system, so each system in a batch
follows exactly the trajectory it would follow alone.
"""

from molopt.optimizers.fire import FIRE, FIRE2
from molopt.optimizers.gd import GradientDescent
from molopt.optimizers.lbfgs import LBFGS

OPTIMIZERS = {"fire": FIRE, "fire2": FIRE2, "lbfgs": LBFGS, "gd": GradientDescent}

__all__ = ["FIRE", "FIRE2", "LBFGS", "GradientDescent", "OPTIMIZERS"]
