"""Ctrl-C and SIGTERM for long commands: the handler only records the request and the work
loops act on it at safe points (between compiled chunks of optimizer steps, between input
files, after the last write).

Raising ``KeyboardInterrupt`` from the handler itself is not safe: Python runs a handler
wherever the main thread happens to be, and inside JAX's garbage-collection callback the
exception is swallowed ("Exception ignored in _xla_gc_callback"), so the interrupt was lost
and the run went on to the end (seen in about one in thirty interrupted runs). A second
signal raises at once, for a user who does not want to wait for the current chunk.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

_requested: int | None = None


def check() -> None:
    """Raise ``KeyboardInterrupt`` here if an interrupt was requested."""
    if _requested is not None:
        raise KeyboardInterrupt


def requested() -> bool:
    return _requested is not None


def _handler(signum, frame):
    global _requested
    if _requested is not None:
        raise KeyboardInterrupt
    _requested = signum


@contextmanager
def deferred():
    """Within the block, SIGINT and SIGTERM are recorded and acted on by :func:`check`.
    The previous handlers come back on exit. Main thread only (a no-op elsewhere)."""
    global _requested
    _requested = None
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested = None
