"""Event intake: what the observer noticed and what scans found -> settled, ready files.

    intake = Intake(Path("inbox"), wcfg, batch_size=32)
    intake.start()                       # the observer thread + a first full scan
    while ...:
        intake.drain(timeout)            # notices -> candidates (lstat, never following links)
        intake.step(time.monotonic())    # settle checks, periodic rescan
        if intake.tracker.ready:
            files = intake.take(now)     # [(rel, ready_at)], still the file that settled
    intake.stop()

No model, no outbox, no claim here: the daemon decides when a batch goes and claims what
:meth:`Intake.take` hands out (watcher.spool). The rules themselves (ignored names, settling,
batch readiness) are pure functions in watcher.policy; the notices come from watcher.observer.
A file that could not be claimed is :meth:`hold`-ed (not offered again) until the next rescan.
"""
from __future__ import annotations

import logging
import os
import queue
import stat
import time
from pathlib import Path
from typing import Callable

from engine.text import shown
from watcher.config import WatcherSettings
from watcher.observer import COMPLETE, DIR, DIR_GONE, Notice, start_observer
from watcher.policy import Tracker, is_ignored, signature

log = logging.getLogger("pawcam.watch")

MAX_NOTICES_PER_TURN = 20_000


class Intake:
    """The inbox's candidates: fed by notices (observer thread) and scans, settled by the
    :class:`~watcher.policy.Tracker`, handed out oldest first by :meth:`take`.

    ``watch=False`` (``pawcam watch --once``): no observer, only scans.
    ``on_inbox_gone``: called when a notice says the inbox folder itself was removed or moved.
    """

    def __init__(self, inbox: Path, wcfg: WatcherSettings, batch_size: int, *,
                 watch: bool = True, on_inbox_gone: Callable[[], None] | None = None) -> None:
        self.inbox = inbox
        self.wcfg = wcfg
        self.batch_size = batch_size
        self.watch = watch
        self.on_inbox_gone = on_inbox_gone
        self.notices: queue.SimpleQueue[Notice] = queue.SimpleQueue()
        self.tracker = self._new_tracker()
        self.blocked: set[str] = set()      # could not be claimed; offered again at rescan
        self.observer = None
        self.attached = False               # the inbox is there and watched
        self.next_rescan = 0.0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the observer (unless ``watch=False``) and scan the whole inbox."""
        if self.watch:
            self.observer = start_observer(str(self.inbox), self.wcfg.observer,
                                           self.wcfg.poll_seconds, self.notices)
        self.attached = True
        self.scan("")
        self.next_rescan = time.monotonic() + self._rescan_every()

    def stop(self, wait: bool = True) -> None:
        """Stop the observer thread (``wait``: and join it, at most 2 s)."""
        if self.observer is None:
            return
        try:
            self.observer.stop()
            if wait:
                self.observer.join(timeout=2)
        except Exception:  # noqa: BLE001 - a dead observer is replaced anyway
            log.debug("stopping the observer failed", exc_info=True)
        if wait:
            self.observer = None

    def join(self) -> None:
        if self.observer is not None:
            self.observer.join(timeout=2)
            self.observer = None

    def detach(self) -> None:
        """The inbox is gone: stop watching, forget every candidate."""
        self.stop()
        self.attached = False
        self.tracker = self._new_tracker()

    def reattach(self) -> None:
        """A (new) inbox folder at the same path: a new observer, a full scan soon."""
        self.stop()
        self.tracker = self._new_tracker()
        if self.watch:
            self.observer = start_observer(str(self.inbox), self.wcfg.observer,
                                           self.wcfg.poll_seconds, self.notices)
        self.attached = True
        self.rescan_soon()

    def configure(self, wcfg: WatcherSettings, batch_size: int) -> None:
        """New settings (SIGHUP reload): settle time, batch size, max wait, ignore, rescan."""
        self.wcfg, self.batch_size = wcfg, batch_size
        t = self.tracker
        t.settle_s, t.max_wait_s, t.batch_size = (wcfg.settle_ms / 1000, wcfg.max_wait_ms / 1000,
                                                  batch_size)
        self.next_rescan = min(self.next_rescan, time.monotonic() + self._rescan_every())

    def _new_tracker(self) -> Tracker:
        return Tracker(self.wcfg.settle_ms / 1000, self.batch_size, self.wcfg.max_wait_ms / 1000)

    def _rescan_every(self) -> float:
        return self.wcfg.rescan_seconds or float("inf")    # 0: no periodic rescan

    # -- one turn of the loop -----------------------------------------------------------------
    def step(self, now: float) -> None:
        """Stat the files whose settle time has come; rescan the inbox when that is due."""
        for rel in self.tracker.due_checks(now):
            self.look(rel, now, complete=False)
        if now >= self.next_rescan and self.attached:
            self.next_rescan = now + self._rescan_every()
            self.blocked.clear()
            self.scan("")

    def rescan_soon(self) -> None:
        """Rescan at the next turn, offering held files again."""
        self.blocked.clear()
        self.next_rescan = 0.0

    def next_wake(self) -> float | None:
        """Monotonic time something is due here (a settle check or the rescan); None: nothing."""
        times = [t for t in (self.tracker.next_check(),
                             self.next_rescan if self.attached else None) if t is not None]
        return min(times) if times else None

    # -- notices and scans -> candidates ------------------------------------------------------
    def rel(self, path: str) -> str | None:
        """Inbox-relative path of a notice's ``path``; None when it is not input (outside the
        inbox, ignored, or in the processing area)."""
        try:
            rel = os.path.relpath(path, self.inbox)
        except ValueError:
            return None
        if rel == "." or rel.startswith("../") or rel == "..":
            return None
        rel = rel.replace(os.sep, "/")
        return None if self.skipped(rel) else rel

    def skipped(self, rel: str) -> bool:
        """Not input: an ignored name, or anything in the processing area (always, whatever
        ``ignore`` says: its lock file, manifests and claimed files are the daemon's own)."""
        return (rel.split("/", 1)[0] == self.wcfg.processing_dir
                or is_ignored(rel, self.wcfg.ignore))

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for notices, then take all waiting ones (the last notice of
        each path wins) and look at each path once."""
        latest: dict[str, str] = {}
        try:
            notice = self.notices.get(timeout=timeout) if timeout > 0 else self.notices.get_nowait()
        except queue.Empty:
            return
        latest[notice.path] = notice.kind
        for _ in range(MAX_NOTICES_PER_TURN):
            try:
                notice = self.notices.get_nowait()
            except queue.Empty:
                break
            latest.pop(notice.path, None)
            latest[notice.path] = notice.kind
        now = time.monotonic()
        for path, kind in latest.items():
            if kind == DIR_GONE and os.path.abspath(path) == os.path.abspath(self.inbox):
                if self.on_inbox_gone is not None:
                    self.on_inbox_gone()         # the inbox itself: the daemon looks at once
                continue
            rel = self.rel(path)
            if rel is None:
                continue
            if kind == DIR:
                self.scan(rel)
            elif kind == DIR_GONE:
                self.tracker.forget_under(rel)
                self.look(rel, now, complete=False)
            else:
                self.look(rel, now, complete=kind == COMPLETE)

    def look(self, rel: str, now: float, complete: bool) -> None:
        """lstat ``rel`` (never following links) and tell the tracker what is there."""
        try:
            st = os.lstat(self.inbox / rel)
        except OSError:
            self.tracker.forget(rel)
            return
        if stat.S_ISDIR(st.st_mode):
            self.tracker.forget(rel)
            self.scan(rel)
            return
        if rel in self.blocked:
            return
        self.tracker.observe(rel, st, now, time.time(), complete=complete)

    def scan(self, rel_dir: str) -> None:
        """Walk a folder of the inbox (never through symlinks) for files not tracked yet."""
        stack = [rel_dir]
        now = time.monotonic()
        while stack:
            current = stack.pop()
            folder = self.inbox / current if current else self.inbox
            try:
                with os.scandir(folder) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            except OSError as exc:
                if current:
                    log.debug("cannot list %s: %s", shown(current), exc)
                else:
                    log.error("cannot list the inbox %s: %s", self.inbox, exc.strerror or exc)
                continue
            for name, is_dir in sorted(entries):
                rel = f"{current}/{name}" if current else name
                if self.skipped(rel):
                    continue
                if is_dir:
                    stack.append(rel)
                elif rel not in self.tracker.candidates:
                    self.look(rel, now, complete=False)

    # -- handing files out --------------------------------------------------------------------
    def take(self, now: float) -> list[tuple[str, float]]:
        """Up to a batch of ready files, oldest first, as ``(rel, ready_at)``; each is checked
        once more: a file gone meanwhile is dropped, one written to since it looked complete
        settles again."""
        wall = time.time()
        out = []
        for cand in self.tracker.take():
            try:
                st = os.lstat(self.inbox / cand.rel)
            except OSError:
                continue  # vanished meanwhile: nothing to do
            if signature(st) != cand.sig:  # written to since it looked complete: settle again
                self.tracker.observe(cand.rel, st, now, wall)
                continue
            out.append((cand.rel, cand.ready_at or now))
        return out

    def hold(self, rels: list[str]) -> None:
        """Files that could not be claimed: not offered again until the next rescan (no spin);
        one that is gone needs nothing."""
        self.blocked.update(rel for rel in rels if os.path.lexists(self.inbox / rel))

    @property
    def depth(self) -> int:
        """Files seen and not handed out yet."""
        return self.tracker.depth
