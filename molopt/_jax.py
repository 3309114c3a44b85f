"""Import JAX configured for molopt: float64 available (ASE users expect it) and a
persistent compilation cache so that a second run of the same command does not compile.

Every module that uses JAX imports it through here.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import weakref
from pathlib import Path


def _cpu_flags() -> None:
    """XLA:CPU hands reductions to YNNPACK by default; for the (K, A) neighbour reductions of
    big batches that was 2.3x slower (W3: 18 -> 8 ms per step, profiled). The flag is only
    set for jaxlib releases known to have it: an unknown flag aborts XLA."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("jaxlib")
    except PackageNotFoundError:  # pragma: no cover
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if release.startswith("0.10.") and "ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=".strip()


_cpu_flags()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def cache_directory() -> Path:
    configured = os.environ.get("MOLOPT_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "molopt" / "jax"


def enable_compilation_cache(directory: Path | None = None) -> Path | None:
    """Turn on JAX's persistent cache (every compiled computation is kept). Returns the
    directory, or None when disabled with MOLOPT_NO_CACHE=1 or not writable."""
    if os.environ.get("MOLOPT_NO_CACHE"):
        return None
    directory = Path(directory or cache_directory())
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    global _executables
    _executables = directory / "executables"
    return directory


# --- compiled programs kept by call signature --------------------------------------------------

#: where :class:`Precompiled` keeps executables; set by :func:`enable_compilation_cache`
_executables: Path | None = None
_digest: str | None = None


def _environment_digest() -> str:
    """What, besides the call signature, decides the compiled program: molopt's own source
    (every module of the package), the JAX/jaxlib releases, the backend and device, XLA's
    flags and the JAX settings that change numerics."""
    global _digest
    if _digest is None:
        h = hashlib.sha256()
        package = Path(__file__).resolve().parent
        for path in sorted(package.rglob("*.py")):
            h.update(path.relative_to(package).as_posix().encode() + b"\0")
            h.update(path.read_bytes())
        device = jax.devices()[0]
        from importlib.metadata import version

        for part in (
            jax.__version__,
            version("jaxlib"),
            device.platform,
            getattr(device, "device_kind", ""),
            os.environ.get("XLA_FLAGS", ""),
            str(jax.config.jax_enable_x64),
            str(jax.config.jax_default_matmul_precision),
        ):
            h.update(str(part).encode() + b"\0")
        _digest = h.hexdigest()
    return _digest


def _aval(x):
    a = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
    return (tuple(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False)))


class Precompiled:
    """A jitted function whose compiled programs are kept on disk by call signature.

    JAX's persistent cache keys a program by its lowered HLO, so even a warm run traces and
    lowers every function to find its entry (W1: 0.3-0.6 s of a 3 s process; W3 about 1.5 s).
    Here the key is what decides that HLO without tracing it: the argument tree with its
    static node data, the leaves' shapes and dtypes, the static arguments' ``repr``, and
    :func:`_environment_digest` (molopt's source, JAX release, device, flags). A hit loads the
    serialized executable directly. The program is compiled over the flattened leaves (with
    the donated arguments' leaves donated) so that loading it needs no pytree node of
    molopt's, and the output tree is stored beside it. Anything unkeyable (a static value
    without a value-based ``repr``, a tree that does not pickle) takes the ordinary
    ``jax.jit`` path, as does every call while the compilation cache is off."""

    _instances: weakref.WeakSet = weakref.WeakSet()
    #: set once compiled code was dropped (:func:`relieve_mapping_pressure`): from then on
    #: this process takes the plain ``jax.jit`` path. XLA:CPU (jaxlib 0.10.2) executables
    #: loaded again after loaded ones were freed failed to find their kernels ("Function
    #: ... not found"); JAX's own cache reloads them safely.
    _cleared = False

    def __init__(self, fn, static_argnames=(), donate_argnames=()):
        self.fn = fn
        self.static = frozenset(static_argnames)
        self.donate = frozenset(donate_argnames)
        self.jitted = jax.jit(fn, static_argnames=static_argnames, donate_argnames=donate_argnames)
        self.names = list(inspect.signature(fn).parameters)
        self.qualname = f"{fn.__module__}.{fn.__qualname__}"
        self.memory: dict = {}
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        Precompiled._instances.add(self)

    def __call__(self, *args, **kwargs):
        directory = _executables
        if directory is None or Precompiled._cleared:
            return self.jitted(*args, **kwargs)
        named = dict(zip(self.names, args, strict=False))
        named.update(kwargs)
        static = tuple((k, named[k]) for k in self.names if k in self.static and k in named)
        dynamic = {k: v for k, v in named.items() if k not in self.static}
        leaves, tree = jax.tree.flatten(dynamic)
        try:
            signature = (tree, tuple(_aval(x) for x in leaves), static)
            entry = self.memory.get(signature)
        except TypeError:  # an unhashable static value
            return self.jitted(*args, **kwargs)
        if entry is None:
            entry = self._load_or_compile(directory, signature, dynamic)
            if entry is None:
                return self.jitted(*args, **kwargs)
            self.memory[signature] = entry
        executable, out_tree = entry
        return out_tree.unflatten(executable(*leaves))

    def _key(self, signature) -> str | None:
        tree, avals, static = signature
        described = repr(static)
        if " at 0x" in described:  # an object without a value-based repr
            return None
        try:
            tree_bytes = pickle.dumps(tree, protocol=5)
        except Exception:
            return None
        h = hashlib.sha256()
        for part in (self.qualname, _environment_digest(), repr(avals), described):
            h.update(part.encode() + b"\0")
        h.update(tree_bytes)
        return h.hexdigest()

    def _load_or_compile(self, directory: Path, signature, dynamic: dict):
        from jax.experimental import serialize_executable as serial

        key = self._key(signature)
        if key is None:
            return None
        path = directory / f"{key}.exe"
        try:
            payload, in_tree, flat_out, out_tree = pickle.loads(path.read_bytes())
            return serial.deserialize_and_load(payload, in_tree, flat_out), out_tree
        except Exception:  # missing, unreadable or stale: compile afresh (and replace it)
            pass
        tree, _, static = signature
        fn, static = self.fn, dict(static)
        out_trees = []

        def flat(*leaves):
            out = fn(**tree.unflatten(leaves), **static)
            out_leaves, out_tree = jax.tree.flatten(out)
            out_trees.append(out_tree)
            return out_leaves

        donated, position = [], 0
        for name in sorted(dynamic):  # a dict flattens in sorted key order
            n = len(jax.tree.leaves(dynamic[name]))
            if name in self.donate:
                donated.extend(range(position, position + n))
            position += n
        leaves = jax.tree.leaves(dynamic)
        lowered = jax.jit(flat, donate_argnums=tuple(donated)).lower(*leaves)
        # compiled afresh, never taken from JAX's persistent cache: an executable loaded from
        # there and serialized again could not find its kernels when loaded (jaxlib 0.10.2)
        before = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            compiled = lowered.compile()
        finally:
            jax.config.update("jax_enable_compilation_cache", before)
        out_tree = out_trees[-1]
        try:
            payload, in_tree, flat_out = serial.serialize(compiled)
            blob = pickle.dumps((payload, in_tree, flat_out, out_tree), protocol=5)
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
        except Exception:  # not serializable here, or a read-only cache: still usable now
            pass
        return compiled, out_tree

    def clear(self) -> None:
        self.memory.clear()

    def _cache_size(self) -> int:
        """Programs held in memory (``jax.jit``'s own count plus the loaded ones)."""
        return self.jitted._cache_size() + len(self.memory)


def precompiled(static_argnames=(), donate_argnames=()):
    """``jax.jit`` with :class:`Precompiled`'s on-disk executables (a decorator)."""

    def wrap(fn):
        return Precompiled(fn, static_argnames, donate_argnames)

    return wrap


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
    """Drop JAX's in-memory compiled code when this process holds too many memory mappings.

    XLA:CPU keeps each compiled executable in memory mappings of its own (a PaiNN relaxation
    program takes thousands). A long-lived process that compiles many programs (a notebook
    relaxing with many potentials, a test session) reaches Linux's ``vm.max_map_count``
    (65530 by default), and the next compilation then kills the process inside XLA (SIGSEGV
    or SIGABRT: seen in a test session of jaxlib 0.10.2). Past ``fraction`` of the limit
    the caches are cleared: programs are compiled again, or reloaded from the persistent
    cache, when next needed. Returns whether it cleared. Linux only; elsewhere a no-op.
    """
    limit = _map_limit()
    if not limit:
        return False
    count = _count_lines("/proc/self/maps")
    if count is None or count < fraction * limit:
        return False
    import gc

    jax.clear_caches()
    Precompiled._cleared = True
    for instance in list(Precompiled._instances):
        instance.clear()
    gc.collect()
    return True


__all__ = [
    "jax",
    "enable_compilation_cache",
    "cache_directory",
    "relieve_mapping_pressure",
    "precompiled",
]
