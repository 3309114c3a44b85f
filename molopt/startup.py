"""What molopt does to its own Python process, and why.

A `molopt relax` of a few structures should cost its relaxation, not the imports and the
teardown around it, and a long-lived process (a notebook, a test session) should not die
of the code it has compiled. The tricks that serve this touch the interpreter itself (import
machinery, environment, exit), so they are gathered here: each section below says what the
trick does, the measured reason it exists, and the test that fails without it.

This module imports only the standard library: it runs before JAX, ASE, vesin and Equinox are
imported, and decides how they are.

1. vesin without PyTorch and CuPy -- :func:`standalone`, :func:`vesin`, :func:`neighbor_list`.
   vesin's module imports ``torch`` and ``cupy`` when they are installed, to accept their
   tensors. molopt hands it numpy arrays only, and on a machine with both (the usual GPU
   machine) that import was 2-3 s of a `molopt relax` whose relaxation took 1 s (profiled on
   an H100 machine: PyTorch 1.4 s of pure Python module execution, CuPy 0.45 s, plus their
   shared libraries). In the ``molopt`` program (the console entry point calls
   :func:`standalone`) nothing else uses vesin, so vesin is imported with the two refused: a
   finder at the front of ``sys.meta_path`` answers ``ModuleNotFoundError`` for them while
   vesin's module runs and is removed right after; vesin takes its own no-PyTorch path. A
   library user's process is left alone (the refusal would also be seen by their own later
   use of vesin with PyTorch tensors), and a package already imported is not refused.
   Test: tests/test_cli.py::test_the_program_imports_vesin_without_torch_or_cupy.

2. ``ase.io`` without SciPy -- :func:`ase_io`. ``ase.io`` imports ``ase.constraints`` and
   ``ase.spacegroup.spacegroup``; through them the *package initializers* of ``ase.dft``
   (``from scipy.integrate import trapezoid``) and ``ase.spacegroup`` (SciPy's spatial tools)
   run, and importing SciPy was about 0.3 s of every `molopt relax` on a 2-core machine
   (``import ase.io``: 0.35 s with it, 0.04 s without). What ``ase.io`` uses from those
   packages lives in submodules that import fine without the package initializer. So before
   a process's first ``import ase.io`` the two packages are registered with their initializer
   deferred: the package module exists (its real ``__path__`` lets submodules import), and
   the first attribute it does not have yet (``DOS``, ``crystal``, ``__all__``, ``dir()``...)
   runs the real initializer into that same module, once; other threads wait for it as for a
   plain import; a failure propagates and the next access tries again. Nothing happens when
   ``ase.io`` or either package was imported already.
   Test: tests/test_io.py::test_ase_io_import_defers_only_what_it_does_not_use.

3. XLA flags by jaxlib release -- :func:`configure_xla`, called by :mod:`molopt._jax` before
   it imports JAX. XLA:CPU in jaxlib 0.10 hands reductions to YNNPACK by default; for the
   neighbour-slot reductions of big batches that made each optimizer step 2.3 times slower
   (profiled), so YNNPACK fusions are turned off. An unknown flag aborts XLA when its backend
   starts, so the flag is set only for releases known to have it, and a fusion type the user
   chose in ``XLA_FLAGS`` is kept.
   Tests: tests/test_startup.py::test_xla_flags_follow_the_jaxlib_release and
   ::test_an_unknown_xla_flag_aborts_jax (why the flag is gated by release).

4. Compiled code dropped near the memory-mapping cap -- :func:`relieve_mapping_pressure`,
   called at the start of every relaxation. XLA:CPU keeps each compiled executable in memory
   mappings of its own (a PaiNN relaxation program takes thousands). A process that compiles
   many programs reaches Linux's ``vm.max_map_count`` (65530 by default), and the next
   compilation then kills it inside XLA (SIGSEGV or SIGABRT: seen in a test session of jaxlib
   0.10.2). Past a fraction of the cap JAX's in-memory caches are cleared; programs are
   compiled again, or reloaded from the persistent cache, when next needed.
   Tests: tests/test_batch.py::test_compiled_code_dropped_near_the_mapping_limit,
   tests/test_startup.py::test_relax_drops_compiled_code_at_the_mapping_cap; the autouse
   fixture of tests/conftest.py applies it between tests.

5. Exit without the interpreter's teardown -- :func:`leave`, the last call of the console
   entry point. Once a command has computed, every output is written, closed and renamed
   (the writer thread has been joined), and what the interpreter's normal teardown would
   still do is free JAX's backends, XLA's thread pools and every module: 0.3 s of each
   `molopt relax` (a third of a small run). With JAX imported and no other thread alive,
   the standard streams are flushed and the process ends with ``os._exit``; otherwise it
   exits as usual.
   Tests: tests/test_startup.py::test_the_program_skips_teardown_once_jax_has_run;
   tests/test_resume.py::test_exit_codes_and_complete_output_of_the_process (nothing that
   teardown would have written is lost).

6. Classes built on first use -- :func:`build_on_first_use`. The Equinox ``Potential`` base
   of :mod:`molopt.potentials.base` needs ``import equinox`` (0.12 s of every `molopt
   relax` on a 2-core machine), which Lennard-Jones relaxations do not use, so the class is
   made when first asked for, once, under a lock.
   Test: tests/test_lennard_jones.py::test_lennard_jones_is_a_pytree_without_equinox;
   tests/test_startup.py::test_build_on_first_use_makes_one_object_for_all_threads.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

# -- 1. vesin without PyTorch and CuPy -------------------------------------------------------

#: Optional array libraries vesin imports at module load; molopt passes numpy only.
REFUSED = ("torch", "cupy")

_vesin_lock = threading.Lock()
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


def vesin():
    """The vesin module, imported on first use (in the program: without PyTorch and CuPy)."""
    module = sys.modules.get("vesin")
    if module is not None and hasattr(module, "NeighborList"):
        return module
    with _vesin_lock:
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


def neighbor_list(**options):
    """``vesin.NeighborList(**options)``, vesin imported as by :func:`vesin`."""
    return vesin().NeighborList(**options)


# -- 2. ase.io without SciPy -----------------------------------------------------------------

#: ASE packages whose initializer ``ase.io`` runs but never needs (each pulls SciPy).
DEFERRED = ("ase.dft", "ase.spacegroup")

_ase_lock = threading.Lock()


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
        with _ase_lock:
            if "ase.io" not in sys.modules:
                import ase

                for name in DEFERRED:
                    if name not in sys.modules:
                        _defer_initializer(name)
                del ase
                import ase.io  # noqa: F401  (under the lock: one set of deferred modules)
    import ase.io

    return ase.io


# -- 3. XLA flags by jaxlib release ----------------------------------------------------------

#: jaxlib releases (version prefixes) whose XLA:CPU knows the YNNPACK fusion flag.
YNN_RELEASES = ("0.10.",)
#: An empty fusion type: XLA:CPU fuses nothing into YNNPACK.
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def xla_flags(release: str | None, flags: str) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) with YNNPACK fusions off when jaxlib ``release`` is
    known to have that flag and ``flags`` does not choose a fusion type already."""
    if release is None or not release.startswith(YNN_RELEASES) or "ynn_fusion_type" in flags:
        return flags
    return f"{flags} {YNN_OFF}".strip()


def configure_xla() -> None:
    """Set this process's ``XLA_FLAGS`` by :func:`xla_flags` for the installed jaxlib. Takes
    effect when called before JAX starts its backend (its first computation)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("jaxlib")
    except PackageNotFoundError:  # pragma: no cover
        return
    flags = os.environ.get("XLA_FLAGS", "")
    chosen = xla_flags(release, flags)
    if chosen != flags:
        os.environ["XLA_FLAGS"] = chosen


# -- 4. compiled code dropped near the memory-mapping cap ------------------------------------


def _count_lines(path: str) -> int | None:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return None


def _map_limit() -> int | None:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def relieve_mapping_pressure(fraction: float = 0.5) -> bool:
    """Drop JAX's in-memory compiled code when this process holds more than ``fraction`` of
    Linux's ``vm.max_map_count`` memory mappings. Returns whether it did. Linux only
    (elsewhere, and in a process without JAX, a no-op returning False)."""
    limit = _map_limit()
    if not limit:
        return False
    count = _count_lines("/proc/self/maps")
    if count is None or count < fraction * limit:
        return False
    jax = sys.modules.get("jax")
    if jax is None:  # nothing compiled in this process
        return False
    import gc

    jax.clear_caches()
    gc.collect()
    return True


# -- 5. exit without the interpreter's teardown ----------------------------------------------


def leave(code: int) -> NoReturn:
    """End the process with exit status ``code``: with ``os._exit`` after flushing the
    standard streams when JAX has been imported and no other thread is alive (the command's
    outputs are complete by then), with ``sys.exit`` otherwise."""
    jax = sys.modules.get("jax")
    if jax is None or threading.active_count() > 1:
        sys.exit(code)
    jax.effects_barrier()  # (nothing is in flight; what JAX's own exit handler waits for)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (molopt ... | head): nothing to keep
            pass
    os._exit(code)


# -- 6. classes built on first use -----------------------------------------------------------


def build_on_first_use(module_name: str, **builders: Callable[[], object]) -> Callable:
    """A module-level ``__getattr__`` for ``module_name`` that makes each name of ``builders``
    when first asked for: the builder runs once, under a lock (whichever thread asks first),
    and its result is stored in the module, so later reads are plain attribute reads. Other
    names raise ``AttributeError`` as usual."""
    lock = threading.Lock()

    def __getattr__(name: str):
        build = builders.get(name)
        if build is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        namespace = sys.modules[module_name].__dict__
        with lock:
            if name not in namespace:
                namespace[name] = build()
        return namespace[name]

    return __getattr__
