"""Files that appear whole or not at all: every output is written under a temporary name
beside its final one and renamed into place. The temporary name says which process wrote it
(``.<name>.<host>-<pid>.tmp``), so that a later run can tell the leftovers of a dead process
(kill -9, power loss) from the files of a live one and remove only those."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
#: ``.<anything>.<host>-<pid>.tmp`` (the host has no dots; the pid is the digits after its
#: last "-")
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[^.]*?)-(?P<pid>\d+)\.tmp$")


def owner_tag() -> str:
    """``<host>-<pid>`` of this process."""
    return f"{_HOST}-{os.getpid()}"


def temporary_path(final: Path) -> Path:
    """Where ``final`` is written before it is renamed into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.{owner_tag()}.tmp")


def write_atomically(final: Path, write) -> Path:
    """``write(tmp)`` writes the file under its temporary name, then it is renamed to
    ``final``; on any error the temporary file is removed and the error raised."""
    final = Path(final)
    tmp = temporary_path(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def save_figure(fig, final: Path, **savefig) -> Path:
    """A matplotlib figure written atomically, in the format of ``final``'s extension (the
    temporary name's own would be ``.tmp``)."""
    final = Path(final)
    fmt = final.suffix.lstrip(".").lower() or None
    return write_atomically(final, lambda tmp: fig.savefig(tmp, format=fmt, **savefig))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_dead_leftover(path: Path) -> bool:
    """Whether ``path`` is a temporary file of a process of this host that no longer runs.
    Files of other hosts are never judged (their processes cannot be seen from here)."""
    match = _TEMPORARY.match(Path(path).name)
    if match is None or match["host"] != _HOST:
        return False
    pid = int(match["pid"])
    return pid != os.getpid() and not _alive(pid)


def remove_dead_leftovers(directory: Path, recursive: bool = False) -> list[Path]:
    """Remove the temporary files of dead processes of this host in ``directory``; the paths
    removed. Unreadable directories and files that vanish meanwhile are passed over."""
    removed = []
    try:
        found = Path(directory).rglob(".*.tmp") if recursive else Path(directory).glob(".*.tmp")
        entries = list(found)
    except OSError:
        return removed
    for path in entries:
        if is_dead_leftover(path):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


class TemporaryIndex:
    """Every temporary file of each output, of any process, from one scan of its directory:
    looking for one structure's temporaries by a glob reads the whole directory each time,
    which over a directory of N outputs is N^2 (20,000 outputs: 8 ms per look). A directory's
    scan is reused for ``max_age`` seconds; a file found is checked again when it is used."""

    def __init__(self, max_age: float = 5.0):
        self.max_age = max_age
        self._scans: dict = {}  # directory -> (monotonic time, {final name: [paths]})

    def _scan(self, directory: Path) -> dict:
        index: dict = {}
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(".") and name.endswith(".tmp"):
                        match = _TEMPORARY.match(name)
                        if match is not None:
                            final = name[1 : match.start("host") - 1]
                            index.setdefault(final, []).append(directory / name)
        except OSError:
            pass
        return index

    def of(self, final: Path) -> list[Path]:
        """The temporary files of ``final`` (for a structure whose claim this process holds:
        no other process can be writing it)."""
        final = Path(final)
        directory = final.parent
        now = time.monotonic()
        seen = self._scans.get(directory)
        if seen is None or now - seen[0] > self.max_age:
            seen = (now, self._scan(directory))
            self._scans[directory] = seen
        return list(seen[1].get(final.name, []))
