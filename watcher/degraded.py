"""The daemon's degraded state: what it does when the storage or a folder fails, and how it
comes back. Mixed into :class:`watcher.daemon.Daemon` (it is that object's state, kept apart so
that the loop reads as a loop); the state itself, the backoff, the probe and the folder watch
are in watcher.health.

    self._storage_fault(exc)     # a write failed: roll back what is in flight, degraded
    self._degrade(reason)        # enter the degraded state, or back off further
    self._try_resume()           # when due: probe; on success settle what waits, rescan
    self._check_folders_now(now) # inbox/outbox removed, replaced or back

While degraded no new files are claimed; claimed files wait in the processing area (rolled back,
or committed and waiting to be moved); ``--once`` stops instead (exit code 4).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from engine.errors import PawcamError, describe_os_error
from engine.results import ResultsCsv
from watcher.batches import Batches
from watcher.config import WatcherSettings
from watcher.health import Fault, Folders, Health, identity, probe, space_problem, transient
from watcher.intake import Intake
from watcher.sdnotify import Notifier
from watcher.spool import Spool
from watcher.status import Status

log = logging.getLogger("pawcam.watch")

EXIT_STORAGE = 4            # --once stopped by a storage fault (as engine.cli.EXIT_STORAGE)


class Degradable:
    """The degraded-state half of the daemon (see the module docstring)."""

    # what it uses of the daemon (watcher.daemon.Daemon sets these)
    inbox: Path
    outbox: Path
    wcfg: WatcherSettings
    once: bool
    stop_requested: bool
    exit_code: int
    health: Health
    folders: Folders
    intake: Intake
    spool: Spool
    batches: Batches | None
    csv: ResultsCsv | None
    clf: Any
    status: Status
    notifier: Notifier
    _lock_fd: int | None

    @property
    def fault(self) -> Fault | None:
        """Why the daemon is degraded (None: it is not)."""
        return self.health.fault

    def _write_state(self, state: str) -> None:   # (the daemon's)
        raise NotImplementedError

    # -- faults: degraded, backoff, resume ---------------------------------------------------
    def _storage_fault(self, exc: OSError) -> None:
        """A write failed because of the storage or a vanished folder: roll back what is in
        flight (claimed files wait in the processing area) and go (or stay) degraded."""
        self.batches.roll_back()
        self._degrade(describe_os_error(exc))

    def _degrade(self, reason: str) -> None:
        """Enter the degraded state, or, when already in it, back off further. One log line
        per change of state (or of its reason), not per file or per retry."""
        change = self.health.degrade(reason, time.monotonic())
        f = self.fault
        if change == "entered":
            log.error("degraded: %s; not taking new files; %d claimed file(s) wait in the "
                      "processing area; retrying in %.0f s (resumes by itself)", reason,
                      self.batches.pending_files if self.batches else 0, f.backoff)
        elif change == "changed":
            log.error("still degraded, now: %s; retrying in %.0f s", reason, f.backoff)
        else:
            log.debug("still degraded (%s); next try in %.0f s", reason, f.backoff)
        if self.once:   # a one-shot run does not wait: exit, the next start takes over
            log.error("--once: stopping; claimed files are taken over at the next start")
            self.stop_requested = True
            self.exit_code = EXIT_STORAGE
        self._show_fault()

    def _show_fault(self) -> None:
        s, f = self.status, self.fault
        if f is None:
            s.degraded_reason = s.degraded_since = s.next_retry_at = ""
            self._write_state("running")
            self.notifier.send(f"STATUS=watching {self.inbox}")
            return
        s.degraded_reason, s.degraded_since = f.reason, f.since
        s.next_retry_at = _utc_in(f.next_try - time.monotonic())
        self._write_state("degraded")
        self.notifier.send(f"STATUS=degraded: {f.reason}"[:1000])

    def _try_resume(self) -> None:
        """Probe; on success resume: settle the claimed batches kept aside, rescan."""
        problem = self._probe()
        if problem is not None:
            self._degrade(problem)
            return
        try:
            self.csv = ResultsCsv(self.outbox / self.wcfg.results_csv, self.clf.meta.class_names)
            self.batches.csv = self.csv
            self.folders.outbox_id = identity(self.outbox)
            self.batches.resettle()
        except OSError as exc:
            if not transient(exc):
                raise
            self._degrade(describe_os_error(exc))
            return
        f = self.health.resume()
        log.warning("resumed: writes succeed again (degraded since %s: %s); %d claimed "
                    "file(s) are classified again", f.since, f.reason,
                    self.batches.pending_files)
        self.intake.rescan_soon()
        self._show_fault()

    def _probe(self) -> str | None:
        return probe(self.inbox, self.outbox, self.spool.processing,
                     self.outbox / self.wcfg.results_csv, self.wcfg)

    def _space_ok(self) -> bool:
        """Free space above the floor before claiming; else degraded (in-flight work goes on)."""
        try:
            problem = space_problem(self.outbox, self.wcfg)
        except OSError as exc:
            if not transient(exc):
                raise
            problem = describe_os_error(exc)
        if problem is None:
            return True
        self._degrade(problem)
        return False

    # -- folders that vanish or change -------------------------------------------------------
    def _look_at_folders(self) -> None:
        self.folders.check_soon()

    def _check_folders_now(self, now: float) -> None:
        """Every FOLDER_CHECK_S: is the inbox still the folder being watched, is the outbox
        there? A removed inbox makes the daemon degraded until it comes back; a recreated or
        replaced one (or a new mount) is watched again and rescanned."""
        change = self.folders.check(now)
        if change is None:
            return
        if change.inbox == "gone":
            log.error("the inbox %s is gone (removed or unmounted); waiting for it to come "
                      "back", self.inbox)
            self.intake.detach()
            self._degrade(f"the inbox {self.inbox} does not exist (removed?); waiting for it")
        elif change.inbox:
            log.warning("the inbox %s %s; watching it again", self.inbox,
                        "is back" if change.inbox == "back" else
                        "was replaced (removed and re-created, or remounted)")
            self._reattach_inbox(change.inbox_id)
        if change.outbox == "gone":
            log.warning("the outbox %s is gone; re-creating it (a new results.csv starts "
                        "there)", self.outbox)
            try:
                self.outbox.mkdir(parents=True, exist_ok=True)
                self.folders.outbox_id = identity(self.outbox)
            except OSError as exc:
                if not transient(exc):
                    raise
                self._storage_fault(exc)
        elif change.outbox:
            log.warning("the outbox %s was replaced (re-created or remounted); results go "
                        "on there", self.outbox)

    def _reattach_inbox(self, inbox_id: tuple[int, int] | None) -> None:
        """A (new) inbox folder: processing area and lock there, a new observer, a full scan.
        Claimed files that were in the old processing area are reported when their batch
        finishes (decode or move: "vanished")."""
        self.intake.detach()
        try:
            self.spool.processing.mkdir(exist_ok=True)
            old = self._lock_fd
            self._lock_fd = self.spool.lock()
            if old is not None:
                os.close(old)
        except BlockingIOError as exc:
            raise PawcamError(f"{exc}: {self.inbox}; two daemons on one inbox") from exc
        except OSError as exc:
            if not transient(exc):
                raise
            self._storage_fault(exc)
            return
        self.folders.watched(inbox_id)
        self.intake.reattach()
        self.health.retry_now()   # try to resume now, not after the backoff


def _utc_in(seconds: float) -> str:
    """UTC ISO time ``seconds`` from now, like :func:`engine.results.utc_now`."""
    from datetime import datetime, timedelta, timezone

    at = datetime.now(timezone.utc) + timedelta(seconds=max(0.0, seconds))
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
