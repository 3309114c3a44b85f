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
``crystal``, ``get_spacegroup``, ``__all__``, ``dir()`` ... -- runs the real initializer into
that same module, once. Other threads asking meanwhile wait for it, as they would for a plain
import; if it fails, the error propagates and the next access tries again. Code that uses
those names gets exactly what a plain import gives, only later. Nothing happens when
``ase.io`` (or either package) was imported already.
"""

from __future__ import annotations

import importlib.util
import sys
import threading

#: ASE packages whose initializer ``ase.io`` runs but never needs (each pulls SciPy).
DEFERRED = ("ase.dft", "ase.spacegroup")

_SETUP = threading.Lock()


def _defer_initializer(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    module = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    state = {"done": False, "running": False}

    def initialize() -> None:
        with lock:  # other threads wait here until the initializer has run
            if state["done"] or state["running"]:
                return  # done, or this thread is inside it (names it sets come from __dict__)
            state["running"] = True
            try:
                spec.loader.exec_module(module)
            finally:
                state["running"] = False
            state["done"] = True
            for hook in ("__getattr__", "__dir__"):
                module.__dict__.pop(hook, None)

    def __getattr__(attr: str):
        initialize()
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    def __dir__():
        initialize()
        return sorted(module.__dict__)

    module.__getattr__ = __getattr__
    module.__dir__ = __dir__
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


def ase_io():
    """The ``ase.io`` module, imported with :data:`DEFERRED` package initializers deferred
    when this is the process's first import of it."""
    if "ase.io" not in sys.modules:
        with _SETUP:
            if "ase.io" not in sys.modules:
                import ase

                for name in DEFERRED:
                    if name not in sys.modules:
                        _defer_initializer(name)
                del ase
                import ase.io  # noqa: F401  (under the lock: one set of deferred modules)
    import ase.io

    return ase.io
