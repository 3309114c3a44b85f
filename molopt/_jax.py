"""Import JAX configured for molopt: float64 available (ASE users expect it) and a
persistent compilation cache so that a second run of the same command does not compile.

Every module that uses JAX imports it through here.
"""

from __future__ import annotations

import os
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
    return directory


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
    gc.collect()
    return True


__all__ = [
    "jax",
    "enable_compilation_cache",
    "cache_directory",
    "relieve_mapping_pressure",
]
