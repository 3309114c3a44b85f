"""``import ase.io`` without the SciPy import it does not need: 0.35 s -> 0.04 s per process.

``ase.io`` imports ``ase.constraints`` and ``ase.spacegroup.spacegroup``; through them the
*package initializers* of ``ase.dft`` (``from scipy.integrate import trapezoid``, for DOS
integrals) and ``ase.spacegroup`` (its ``xtal`` module, SciPy's spatial tools) run, and
importing SciPy is about 0.3 s of every ``molopt relax`` on this 2-core machine (SciPy parses
hundreds of docstrings as it loads). What ``ase.io`` actually uses from those packages lives
in their submodules (``ase.dft.kpoints``, ``ase.spacegroup.spacegroup``), which import fine
without the package initializer.

So, before the first ``import ase.io`` of a process, those two packages are registered with
their initializer deferred: the package module exists (its ``__path__`` is real, so its
submodules import normally), and the first attribute it does not have yet -- ``DOS``,
``crystal``, ``get_spacegroup``, ``__all__`` ... -- runs the real initializer into that same
module, once, under a lock. Code that uses those names gets exactly what a plain import
gives, only later. Nothing happens when ``ase.io`` (or either package) was imported already.
"""

from __future__ import annotations

import importlib.util
import sys
import threading

#: ASE packages whose initializer ``ase.io`` runs but never needs (each pulls SciPy).
DEFERRED = ("ase.dft", "ase.spacegroup")


def _defer_initializer(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    module = importlib.util.module_from_spec(spec)
    lock = threading.Lock()

    def __getattr__(attr: str):
        with lock:
            if module.__dict__.get("__getattr__") is __getattr__:
                del module.__getattr__
                spec.loader.exec_module(module)
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    module.__getattr__ = __getattr__
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


def ase_io():
    """The ``ase.io`` module, imported with :data:`DEFERRED` package initializers deferred
    when this is the process's first import of it."""
    if "ase.io" not in sys.modules:
        import ase

        for name in DEFERRED:
            if name not in sys.modules:
                _defer_initializer(name)
        del ase
    import ase.io

    return ase.io
