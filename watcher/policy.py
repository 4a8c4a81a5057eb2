"""Pure policy: which names are input, when a file is complete, when a batch goes out.

Nothing here touches the file system or the clock: callers pass ``now`` (monotonic seconds),
``wall`` (epoch seconds) and ``lstat`` results in, so every decision is unit-testable.
"""
from __future__ import annotations

import fnmatch
import itertools
import stat
from dataclasses import dataclass, field
from typing import Sequence


def is_ignored(rel: str, patterns: Sequence[str]) -> bool:
    """True when any component of the inbox-relative path matches an ignore pattern.

    ``is_ignored("a/photo.jpg.part", DEFAULT_IGNORE)`` -> True; ``".pawcam-processing/x"``
    -> True (dot folder); ``"cats/tom.jpg"`` -> False. An empty path is ignored.
    """
    parts = [p for p in rel.split("/") if p]
    if not parts:
        return True
    for part in parts:
        if part in (".", ".."):
            return True
        for pattern in patterns:
            if fnmatch.fnmatchcase(part, pattern):
                return True
    return False


def settled(now: float, since: float, age_at_first_sight: float, settle_s: float) -> bool:
    """Size and mtime unchanged long enough?

    ``since`` is when (monotonic) the current size+mtime were first seen; ``age_at_first_sight``
    is how old the mtime was at that moment (wall clock minus mtime, clipped at 0): a file whose
    mtime is already older than ``settle_s`` is not being written, so files found at start-up or
    by a rescan need not wait a whole settle period.
    """
    return (now - since) + max(0.0, age_at_first_sight) >= settle_s


def batch_ready(now: float, first_ready: float | None, count: int, batch_size: int,
                max_wait_s: float) -> bool:
    """Send a batch when it is full, or ``max_wait_s`` after its first file became ready."""
    if count <= 0 or first_ready is None:
        return False
    return count >= batch_size or now - first_ready >= max_wait_s


def batch_deadline(first_ready: float | None, max_wait_s: float) -> float | None:
    """When the pending partial batch must go out (None: nothing pending)."""
    return None if first_ready is None else first_ready + max_wait_s


Signature = tuple[int, int, int]  # (file type bits, size, mtime_ns)


def signature(st) -> Signature:
    return (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)


def complete_by_nature(st) -> bool:
    """Symlinks, FIFOs, sockets, devices have no content still being written: take at once."""
    return not stat.S_ISREG(st.st_mode)


@dataclass
class Candidate:
    """A file seen in the inbox and not claimed yet."""

    rel: str
    sig: Signature
    since: float                 # monotonic: when ``sig`` was first seen
    age: float                   # wall - mtime at that moment (>= 0)
    complete: bool = False       # closed after writing, renamed in, or not a regular file
    ready_at: float | None = None  # monotonic: when it became ready


@dataclass
class Tracker:
    """Candidates from events and scans; hands out complete files in arrival order.

    Feed it with :meth:`observe` (a fresh lstat of a path, plus what the event said) and
    :meth:`forget`; ask :meth:`due_checks` which unsettled files to stat again, and
    :meth:`take` for a batch once :meth:`batch_due` says so.
    """

    settle_s: float
    batch_size: int
    max_wait_s: float
    candidates: dict[str, Candidate] = field(default_factory=dict)
    ready: dict[str, None] = field(default_factory=dict)  # insertion order = arrival order
    #: candidates not ready yet (so settle checks never walk a big ready queue)
    settling: dict[str, None] = field(default_factory=dict)

    def observe(self, rel: str, st, now: float, wall: float, complete: bool = False) -> None:
        """Record a fresh ``lstat`` of ``rel``; ``complete`` when the event proves it (closed,
        renamed in). A changed size or mtime restarts settling, even for a file that was
        ready (a writer re-opened it)."""
        sig = signature(st)
        complete = complete or complete_by_nature(st)
        cand = self.candidates.get(rel)
        if cand is None or cand.sig != sig:
            if cand is not None and cand.sig != sig and not complete:
                self._unready(rel)
            age = max(0.0, wall - st.st_mtime_ns / 1e9)
            cand = Candidate(rel, sig, now, age, complete=complete or (
                cand is not None and cand.complete and cand.sig == sig))
            self.candidates[rel] = cand
            self.settling[rel] = None
        elif complete:
            cand.complete = True
        self._update(cand, now)

    def _update(self, cand: Candidate, now: float) -> None:
        if cand.ready_at is None and (cand.complete or
                                      settled(now, cand.since, cand.age, self.settle_s)):
            cand.ready_at = now
            self.ready[cand.rel] = None
            self.settling.pop(cand.rel, None)

    def _unready(self, rel: str) -> None:
        self.ready.pop(rel, None)

    def forget(self, rel: str) -> None:
        self.candidates.pop(rel, None)
        self.ready.pop(rel, None)
        self.settling.pop(rel, None)

    def forget_under(self, folder: str) -> None:
        prefix = folder.rstrip("/") + "/"
        for rel in [r for r in self.candidates if r.startswith(prefix)]:
            self.forget(rel)

    def due_checks(self, now: float) -> list[str]:
        """Unsettled candidates whose settle time has come: stat them again."""
        cands = (self.candidates[rel] for rel in self.settling)
        return [c.rel for c in cands if settled(now, c.since, c.age, self.settle_s)]

    def next_check(self) -> float | None:
        """Monotonic time of the earliest settle check (None: nothing is settling)."""
        times = [c.since + max(0.0, self.settle_s - c.age)
                 for c in (self.candidates[rel] for rel in self.settling)]
        return min(times) if times else None

    def first_ready(self) -> float | None:
        for rel in self.ready:
            return self.candidates[rel].ready_at
        return None

    def batch_due(self, now: float) -> bool:
        return batch_ready(now, self.first_ready(), len(self.ready), self.batch_size,
                           self.max_wait_s)

    def deadline(self) -> float | None:
        return batch_deadline(self.first_ready(), self.max_wait_s)

    def take(self, limit: int | None = None) -> list[Candidate]:
        """Remove and return up to ``limit`` (default batch_size) ready candidates, oldest first."""
        limit = self.batch_size if limit is None else limit
        rels = list(itertools.islice(self.ready, limit))   # not a copy of all of ``ready``
        out: list[Candidate] = []
        for rel in rels:
            out.append(self.candidates.pop(rel))
            del self.ready[rel]
        return out

    @property
    def depth(self) -> int:
        return len(self.candidates)
