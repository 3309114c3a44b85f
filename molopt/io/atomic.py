"""Files that appear whole or not at all: every output is written under a temporary name
beside its final one and renamed into place. The temporary name says which process wrote it
(``.<name>.<host>-<pid>.tmp``), so that a later run can tell the leftovers of a dead process
(kill -9, power loss) from the files of a live one and remove only those."""

from __future__ import annotations

import os
import re
import socket
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


def temporaries_of(final: Path) -> list[Path]:
    """Every temporary file of ``final``, of any process (for a structure whose claim this
    process holds: no other process can be writing it)."""
    final = Path(final)
    try:
        found = final.parent.glob(f".{glob_escape(final.name)}.*.tmp")
        return [p for p in found if _TEMPORARY.match(p.name)]
    except OSError:
        return []


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
