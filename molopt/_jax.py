"""Import JAX configured for molopt: float64 available (ASE users expect it) and a
persistent compilation cache so that a second run of the same command does not compile.

Every module that uses JAX imports it through here. The process-level tricks it applies
(XLA flags chosen by jaxlib release; compiled code dropped near the memory-mapping cap) live
in :mod:`molopt.startup`, with their reasons.
"""

from __future__ import annotations

import os
from pathlib import Path

from molopt import startup
from molopt.startup import relieve_mapping_pressure

startup.configure_xla()  # before JAX starts its backend (molopt.startup, section 3)

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


__all__ = [
    "jax",
    "enable_compilation_cache",
    "cache_directory",
    "relieve_mapping_pressure",
]
