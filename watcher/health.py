"""The daemon's health: which faults are waited out, the degraded state and its backoff, the
probe that says when work can resume, and the watch on the inbox and outbox folders.

    health = Health()
    health.degrade("disk full", time.monotonic())   # -> "entered" (1 s), "changed"/"same" (x2)
    problem = probe(inbox, outbox, processing, csv_path, wcfg)   # None: writes succeed again
    fault = health.resume()                          # the next relapse starts where this ended

Nothing here rolls back work or writes the status file: the daemon does (watcher.daemon); this
module only knows the state and how to look at the disk.
"""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from engine.durable import write_atomic
from engine.errors import describe_os_error, is_storage_fault
from engine.text import utc_now
from watcher.config import WatcherSettings

BACKOFF_MIN_S = 1.0         # degraded: first retry after this long, doubling up to ...
BACKOFF_MAX_S = 60.0
FOLDER_CHECK_S = 1.0        # how often the inbox and outbox are checked for removal/replacement
#: errno values of folder trouble (a folder removed or replaced under the daemon): waited out
FOLDER_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE})


def transient(exc: BaseException) -> bool:
    """A fault of the storage or of a folder, to be waited out (not a bug, not a bad input)."""
    return isinstance(exc, OSError) and (is_storage_fault(exc) or exc.errno in FOLDER_ERRNOS)


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder at ``path`` (followed: the inbox may be a symlink)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def free_bytes(path: Path) -> tuple[int, int]:
    """(bytes available to us, file system size) of the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def space_problem(outbox: Path, wcfg: WatcherSettings) -> str | None:
    """Why the outbox's free space is below ``[watcher] min_free_mb`` (None: it is not)."""
    if wcfg.min_free_mb <= 0:
        return None
    free, size = free_bytes(outbox)
    floor = wcfg.free_space_floor(size)
    if free >= floor:
        return None
    return (f"only {free / 2**20:.1f} MiB free in {outbox}, below the floor of "
            f"{floor / 2**20:.1f} MiB ([watcher] min_free_mb = {wcfg.min_free_mb})")


def probe(inbox: Path, outbox: Path, processing: Path, csv_path: Path,
          wcfg: WatcherSettings) -> str | None:
    """What still stands in the way of working (None: nothing): the inbox, the outbox and
    the processing area exist (the latter two re-created), free space is above the floor,
    and a small write + fsync succeeds in the outbox and the processing area."""
    if identity(inbox) is None:
        return f"the inbox {inbox} does not exist (removed?); waiting for it"
    try:
        outbox.mkdir(parents=True, exist_ok=True)
        processing.mkdir(exist_ok=True)
        problem = space_problem(outbox, wcfg)
        if problem:
            return problem
        for folder in (outbox, processing):
            path = folder / f".pawcam-probe-{os.getpid()}"
            write_atomic(path, b"\0" * 4096, durable=True)
            os.unlink(path)
        if csv_path.exists():
            os.close(os.open(csv_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
    except OSError as exc:
        if not transient(exc):
            raise
        return describe_os_error(exc)
    return None


class Fault:
    """The degraded state: why, since when, when to try again."""

    def __init__(self, reason: str, backoff: float, now: float) -> None:
        self.reason = reason
        self.since = utc_now()
        self.backoff = backoff
        self.next_try = now + backoff


class Health:
    """None or a :class:`Fault`; the backoff doubles from BACKOFF_MIN_S to BACKOFF_MAX_S while
    degraded, and a relapse before the next successful commit starts where the last fault
    ended (a fault that comes back at once is not probed every second)."""

    def __init__(self) -> None:
        self.fault: Fault | None = None
        self._resumed_backoff: float | None = None

    def degrade(self, reason: str, now: float) -> str:
        """Enter the degraded state or back off further: "entered", "changed" (another
        reason) or "same"."""
        if self.fault is None:
            backoff = (min(BACKOFF_MAX_S, self._resumed_backoff * 2)
                       if self._resumed_backoff else BACKOFF_MIN_S)
            self.fault = Fault(reason, backoff, now)
            return "entered"
        f = self.fault
        f.backoff = min(BACKOFF_MAX_S, f.backoff * 2)
        f.next_try = now + f.backoff
        if reason != f.reason:
            f.reason = reason
            return "changed"
        return "same"

    def resume(self) -> Fault:
        """Leave the degraded state; returns the fault that ended."""
        f, self.fault = self.fault, None
        self._resumed_backoff = f.backoff
        return f

    def committed(self) -> None:
        """A commit went through: the next fault starts at BACKOFF_MIN_S again."""
        self._resumed_backoff = None

    def due(self, now: float) -> bool:
        """Degraded and time for the next try."""
        return self.fault is not None and now >= self.fault.next_try

    def retry_now(self) -> None:
        """Try to resume at the next turn, not after the backoff (a folder came back)."""
        if self.fault is not None:
            self.fault.next_try = time.monotonic()


@dataclass
class FolderChange:
    """What :meth:`Folders.check` found: ``inbox``/``outbox`` "gone", "back", "replaced" or ""."""

    inbox: str = ""
    outbox: str = ""
    inbox_id: tuple[int, int] | None = None


class Folders:
    """Every FOLDER_CHECK_S: is the inbox still the folder being watched, is the outbox there?
    (A removed and re-created folder, or a new mount, has another device/inode.)"""

    def __init__(self, inbox: Path, outbox: Path) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.inbox_id = identity(inbox)
        self.outbox_id = identity(outbox)
        self.next_check = 0.0

    def check(self, now: float) -> FolderChange | None:
        """None until the next check is due or when nothing changed. The outbox's identity is
        taken at once; the inbox's is only taken by :meth:`watched` (after re-attaching)."""
        if now < self.next_check:
            return None
        self.next_check = now + FOLDER_CHECK_S
        change = FolderChange()
        inbox = identity(self.inbox)
        if inbox != self.inbox_id:
            change.inbox_id = inbox
            change.inbox = ("gone" if inbox is None else
                            "back" if self.inbox_id is None else "replaced")
            if inbox is None:
                self.inbox_id = None
        outbox = identity(self.outbox)
        if outbox != self.outbox_id:
            self.outbox_id = outbox
            change.outbox = "gone" if outbox is None else "replaced"
        return change if (change.inbox or change.outbox) else None

    def watched(self, inbox_id: tuple[int, int] | None) -> None:
        """The inbox folder now being watched."""
        self.inbox_id = inbox_id

    def check_soon(self) -> None:
        self.next_check = 0.0
