"""``import vesin`` without PyTorch and CuPy in the command-line program.

vesin's module imports ``torch`` and ``cupy`` when they are installed, so that it can accept
their tensors. molopt hands it numpy arrays only, and on a machine with both (the usual GPU
machine: every TorchSim or MACE user has PyTorch) that import was 2-3 s of a `molopt relax`
whose relaxation took 1 s (profiled with cProfile on an H100 machine, W2: PyTorch 1.4 s of
pure Python module execution, CuPy 0.45 s, plus their shared libraries).

In the ``molopt`` process (:func:`standalone`, called by the CLI entry point) nothing else
will use vesin, so vesin is imported with those two refused: a finder at the front of
``sys.meta_path`` answers ``ModuleNotFoundError`` for them while vesin's module runs, and is
removed right after; vesin then takes its own no-PyTorch, no-CuPy path. A library user's
process is left alone (vesin is imported as usual there): the refusal would also be seen by
their own later use of vesin with PyTorch tensors. A package already imported is not
refused (vesin gets it as usual, at no cost).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

#: Optional array libraries vesin imports at module load; molopt passes numpy only.
REFUSED = ("torch", "cupy")

_lock = threading.Lock()
_standalone = False


def standalone() -> None:
    """Mark this process as the molopt program: vesin may be imported without PyTorch/CuPy."""
    global _standalone
    _standalone = True


class _Refuse(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(
                f"{fullname} is not loaded for vesin by molopt", name=fullname
            )
        return None


def neighbor_list(**options):
    """``vesin.NeighborList(**options)``, vesin imported on first use as above."""
    return vesin().NeighborList(**options)


def vesin():
    """The vesin module (imported on first use; see the module docstring)."""
    module = sys.modules.get("vesin")
    if module is not None and hasattr(module, "NeighborList"):
        return module
    with _lock:
        refused = [name for name in REFUSED if name not in sys.modules] if _standalone else []
        finder = _Refuse(refused) if refused else None
        if finder is not None:
            sys.meta_path.insert(0, finder)
        try:
            import vesin as module
        finally:
            if finder is not None:
                sys.meta_path.remove(finder)
    return module
