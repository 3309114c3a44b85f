"""Claims on structures, so that several ``molopt relax`` processes on one output directory
share the work instead of each doing all of it.

A claim is an exclusive ``flock`` on ``.<stem>.molopt-claim`` beside the structure's outputs.
The operating system drops it when its process ends, however it ends (kill -9 included), so a
claim never outlives its owner. When the owner is done with a structure it writes the outcome
into the claim file, removes the file and lets go; a process that was waiting for that claim
reads the outcome through its own open descriptor. An empty claim file whose lock is free is a
structure whose owner died before finishing it.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from molopt.io.atomic import owner_tag


def claim_path(out_dir: Path, stem: str) -> Path:
    target = Path(out_dir) / stem
    return target.with_name(f".{target.name}.molopt-claim")


@dataclass
class Outcome:
    """What the owner of a claim wrote when it let go: ``status`` (a record status, or ""
    when it ended without saying: it died), ``owner`` (``host-pid``), ``error``."""

    status: str
    owner: str = ""
    error: str = ""


class Claims:
    """This process's claims in ``out_dir``, by stem. Not thread-safe for one stem; different
    stems may be released from another thread (the writer's)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.held: dict[str, int] = {}

    def try_claim(self, stem: str) -> bool:
        """Claim ``stem`` if no live process holds it."""
        fd = self._open(stem)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        return self._hold(stem, fd)

    def wait(self, stem: str) -> tuple[Outcome, bool]:
        """Block until the process holding ``stem`` lets go; return what it wrote (``status``
        "" if it ended without finishing) and whether this process now holds the claim."""
        while True:
            fd = self._open(stem)
            fcntl.flock(fd, fcntl.LOCK_EX)
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            held = self._hold(stem, fd)
            status, _, rest = text.partition("\t")
            owner, _, error = rest.partition("\t")
            outcome = Outcome(status.strip(), owner.strip(), error.strip())
            if outcome.status or held:
                return outcome, held

    def _open(self, stem: str) -> int:
        path = claim_path(self.out_dir, stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def _hold(self, stem: str, fd: int) -> bool:
        # the file may have been removed by its previous owner after we opened it: then the
        # lock is on an orphan and another process may hold a new file; take the new one
        try:
            same = os.fstat(fd).st_ino == os.stat(claim_path(self.out_dir, stem)).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return self.try_claim(stem)
        self.held[stem] = fd
        return True

    def release(self, stem: str, status: str = "", error: str = "") -> None:
        """Let go of ``stem``, leaving ``status`` for a process that waits for it."""
        fd = self.held.pop(stem, None)
        if fd is None:
            return
        try:
            if status:
                line = f"{status}\t{owner_tag()}\t{' '.join(error.split())}"
                os.ftruncate(fd, 0)
                os.pwrite(fd, line.encode(), 0)
            claim_path(self.out_dir, stem).unlink(missing_ok=True)
        except OSError:
            pass  # a full disk must not keep the claim: letting go below is what matters
        finally:
            os.close(fd)

    def release_all(self) -> None:
        for stem in list(self.held):
            self.release(stem)
