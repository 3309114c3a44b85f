"""Gradient-based optimizers as pure ``init``/``step`` pairs over a flat batch of rows.

A *row* is one 3-vector degree of freedom: an atom, or (variable cell) one of the three
rows of a system's log-deformation. Every reduction is per system, so each system in a batch
follows exactly the trajectory it would follow alone.

This table is the one list of optimizers: the command line's choices, the settings' check
of names and options (an optimizer's options are its dataclass fields) and the engine all
read it. The classes are imported on first use, so that naming them needs no JAX.
"""

from __future__ import annotations

import dataclasses
import importlib

#: name -> (module in this package, class)
_CLASSES = {
    "fire": ("fire", "FIRE"),
    "fire2": ("fire", "FIRE2"),
    "lbfgs": ("lbfgs", "LBFGS"),
    "bfgs": ("bfgs", "BFGS"),
    "gd": ("gd", "GradientDescent"),
}

#: every optimizer's name, as ``--optimizer`` and config files take it
NAMES = tuple(_CLASSES)


def optimizer_class(name: str) -> type:
    """The optimizer class called ``name`` (KeyError for an unknown name)."""
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(f"molopt.optimizers.{module}"), cls)


def option_names(name: str) -> frozenset[str]:
    """The options optimizer ``name`` takes: the fields of its dataclass (except those
    marked ``metadata={"option": False}``, which the engine sets)."""
    fields = dataclasses.fields(optimizer_class(name))
    return frozenset(f.name for f in fields if f.metadata.get("option", True))


def __getattr__(attr: str):
    for name, (_, cls) in _CLASSES.items():
        if attr == cls:
            return optimizer_class(name)
    raise AttributeError(f"module 'molopt.optimizers' has no attribute {attr!r}")


__all__ = [
    "BFGS",
    "FIRE",
    "FIRE2",
    "LBFGS",
    "GradientDescent",
    "NAMES",
    "optimizer_class",
    "option_names",
]
