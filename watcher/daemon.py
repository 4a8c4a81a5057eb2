"""``pawcam watch``: the inbox daemon's loop and lifecycle.

    Daemon(settings, watcher_settings(settings)).run()    # -> exit code

Start (folders, lock, model, recovery, READY), one loop, signals (SIGTERM/SIGINT stop, SIGHUP
reloads the model), the degraded state and shutdown. Each job it runs lives in its own module:

- watcher.intake   notices and scans -> settled, ready files (the observer thread feeds it)
- watcher.batches  natural batching, the engine's Pipeline (decode ahead -> model -> pictures
                   on a pool), commit and finish of each batch, its counts and log lines
- watcher.spool    the exactly-once protocol: claim, commit, finalize, recover (README)
- watcher.degraded what the daemon does when storage or folders fail, and how it comes back
                   (a mixin: :class:`Daemon` is a :class:`~watcher.degraded.Degradable`)
- watcher.health   which faults are waited out, backoff, the probe, the folder watch
- watcher.reload   building and checking a model; what a SIGHUP may change
- watcher.status / metrics / sdnotify   status.json, Prometheus, systemd

Faults are states, not exits: a storage fault (disk full, quota, read-only, I/O error, no
permission) or a vanished folder puts the daemon in ``degraded``: the batches in hand are rolled
back (their claimed files wait in the processing area) or, when already committed, finished
later; no new files are claimed; a probe retries with backoff (1 s doubling to 60 s) and the
daemon resumes by itself. The outbox's free space below ``min_free_mb`` does the same before the
disk is full. SIGHUP reloads the model (and the settings that may change) between batches.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.errors import PawcamError, describe_os_error
from engine.pipeline import Pipeline
from engine.results import ResultsCsv
from engine.text import utc_now
from watcher.batches import Batches, report, run_id
from watcher.config import WatcherSettings
from watcher.degraded import Degradable
from watcher.health import Folders, Health, transient
from watcher.intake import Intake
from watcher.metrics import DaemonMetrics, NullMetrics
from watcher.policy import is_ignored
from watcher.reload import Reload, build_classifier
from watcher.sdnotify import Notifier
from watcher.spool import ClaimedBatch, Spool
from watcher.status import Status

log = logging.getLogger("pawcam.watch")

IDLE_TICK = 0.25            # longest sleep: signals and stop requests are seen this fast


class Daemon(Degradable):
    """The inbox daemon: ``run()`` it (see the module docstring)."""

    def __init__(self, settings: Settings, wcfg: WatcherSettings, *, once: bool = False,
                 classifier: Any = None) -> None:
        self.settings = settings
        self.wcfg = wcfg
        self.once = once
        self.clf = classifier
        self.inbox = Path(settings.paths.inbox)
        self.outbox = Path(settings.paths.outbox)
        self.intake = Intake(self.inbox, wcfg, wcfg.effective_batch_size(settings),
                             watch=not once, on_inbox_gone=self._look_at_folders)
        self.notifier = Notifier.from_env(wcfg.systemd_notify)
        self.status = Status(inbox=str(self.inbox), outbox=str(self.outbox),
                             observer="once" if once else wcfg.observer)
        self.status_path = self.outbox / wcfg.status_file
        self.run_id = run_id()
        self.stop_requested = False
        self.reload_requested = False
        self.exit_code = 0
        self.health = Health()
        self.folders = Folders(self.inbox, self.outbox)
        self.metrics: NullMetrics = NullMetrics()          # the exporter starts in run()
        self.spool: Spool | None = None
        self.csv: ResultsCsv | None = None
        #: decode -> model -> pictures, the engine's one pipeline; tags are ClaimedBatches
        self.pipe: Pipeline | None = None
        self.batches: Batches | None = None
        self._reload: Reload | None = None               # the new classifier being built
        self._lock_fd: int | None = None
        self._status_errno: int | None = None

    @property
    def pending(self) -> list[ClaimedBatch]:
        """Claimed batches waiting to be (re)classified or finished (first in line)."""
        return list(self.batches.pending) if self.batches is not None else []

    # -- set-up -------------------------------------------------------------------------------
    def _check_folders(self) -> None:
        if not self.inbox.is_dir():
            raise PawcamError(f"inbox {self.inbox} does not exist or is not a folder; create it "
                              "or set [paths] inbox in config.toml (or pass --inbox)")
        inbox, outbox = self.inbox.resolve(), self.outbox.resolve()
        if outbox == inbox or inbox in outbox.parents:
            rel = outbox.relative_to(inbox).as_posix() if outbox != inbox else ""
            if not rel or not is_ignored(rel, self.wcfg.ignore):
                raise PawcamError(f"outbox {outbox} is inside the inbox {inbox}: results would be "
                                  "taken as input; put them side by side")
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.folders = Folders(self.inbox, self.outbox)
        self.spool = Spool(self.inbox, self.inbox / self.wcfg.processing_dir,
                           self.outbox / self.wcfg.processed_dir,
                           self.outbox / self.wcfg.failed_dir,
                           delete_on_success=self.wcfg.on_success == "delete")
        try:
            self._lock_fd = self.spool.lock()
        except BlockingIOError as exc:
            raise PawcamError(f"{exc}: {self.inbox}; stop it first (one daemon per inbox)") from exc

    def _install_signals(self) -> None:
        def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
            if not self.stop_requested:
                log.info("%s received: finishing the batch in hand, then exiting",
                         signal.Signals(signum).name)
            self.stop_requested = True

        def request_reload(signum, frame):  # noqa: ARG001 - signal handler signature
            self.reload_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGHUP, request_reload)

    def _load_model(self) -> None:
        if self.clf is None:
            self.clf = build_classifier(self.settings)
        self.status.model_version = self.clf.meta.version
        self.metrics.model(self.clf.meta.version)
        self.csv = ResultsCsv(self.outbox / self.wcfg.results_csv, self.clf.meta.class_names)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        self._check_folders()
        self.metrics = DaemonMetrics.start(self.wcfg.metrics_host, self.wcfg.metrics_port)
        self._write_status()
        self._load_model()
        if self.stop_requested:
            self._write_state("stopped")
            return 0
        # the pictures are flushed to disk before the commit, so that a committed row never
        # points at pictures lost in a power cut
        self.pipe = Pipeline(self.clf, self.outbox, durable=True,
                             threads=self.settings.inference.threads)
        self.batches = Batches(self.spool, self.pipe, self.csv, self.outbox, self.run_id,
                               self.metrics)
        try:
            try:
                self._recover()
            except OSError as exc:
                if not transient(exc):
                    raise
                self._storage_fault(exc)
            self.intake.start()
            self._write_state("running")
            self.notifier.send("READY=1", f"STATUS=watching {self.inbox}")
            log.info("watching %s (%s observer, batch %d, settle %d ms, max wait %d ms); "
                     "results in %s", self.inbox, self.status.observer, self.intake.batch_size,
                     self.wcfg.settle_ms, self.wcfg.max_wait_ms, self.csv.path)
            if self.fault is None and (problem := self._probe()) is not None:
                self._degrade(problem)       # e.g. started on a full disk: say so at once
            elif self.fault is not None:
                self._show_fault()
            self._loop()
        except Exception:
            log.exception("fatal error; claimed files stay in %s and are taken over at the next "
                          "start", self.spool.processing)
            return 1
        finally:
            self._shutdown()
        return self.exit_code

    def _loop(self) -> None:
        timeout = 0.0
        while not self.stop_requested:
            self.notifier.ping(time.monotonic())
            self.intake.drain(timeout)
            now = time.monotonic()
            self._check_folders_now(now)
            self._reload_step()
            self.intake.step(now)
            if self.health.due(now):
                self._try_resume()
            try:
                self.batches.fill(self.intake, self._claiming, self._space_ok, time.monotonic())
                if self.pipe.waiting:
                    self.batches.run_model()
                    more = self.batches.more_work(self.intake, self._claiming(), time.monotonic())
                    self._flush(keep=1 if more else 0)
                elif self.pipe.in_flight:
                    self._flush(keep=0)
            except OSError as exc:
                if not transient(exc):
                    raise
                self._storage_fault(exc)
            busy = bool(self.pipe.in_flight or (self.batches.pending and self._claiming()))
            if self.once and not busy and (self.fault is not None
                                           or not self.intake.tracker.candidates):
                break
            timeout = 0.0 if busy else self._idle_timeout()

    def _claiming(self) -> bool:
        """New work may start: not degraded, and no reloaded model waiting to be swapped in."""
        return self.fault is None and not (self._reload is not None and self._reload.done())

    def _idle_timeout(self) -> float:
        """How long the loop may sleep. The batch deadline counts only while claiming: files
        left ready while degraded must not make the loop spin."""
        now = time.monotonic()
        deadline = self.intake.tracker.deadline() if self._claiming() else None
        times = [t for t in (self.intake.next_wake(), deadline, self.notifier.next_ping(),
                             self.folders.next_check,
                             self.fault.next_try if self.fault is not None else None)
                 if t is not None]
        wait = min(times) - now if times else IDLE_TICK
        return max(0.0, min(IDLE_TICK, wait))

    def _flush(self, keep: int) -> None:
        """Commit and finish what the pipeline has done (all but ``keep`` batches), report
        each batch; a storage fault while finishing or writing the status: degraded."""
        for batch, results, done, started in self.batches.flush(keep):
            self.health.committed()   # a commit went through: the next fault starts at 1 s
            report(self.status, self.metrics, self.spool, batch, results, done, started,
                   self._depth())
            fault = done.fault
            if started is not None:
                status_error = self._write_status()
                if fault is None and status_error is not None and transient(status_error):
                    fault = status_error
            if fault is not None:
                self._storage_fault(fault)
                return

    def _depth(self) -> int:
        if self.batches is None:
            return self.intake.depth
        return self.batches.depth(self.intake)

    def _recover(self) -> None:
        settled = self.batches.recover()
        if settled.done or settled.redo or settled.stuck:
            log.warning("recovered after an unclean stop: %d file(s) already recorded were "
                        "moved on, %d are classified again%s", settled.done,
                        settled.redo_count,
                        f", {settled.stuck} could not be moved (left in "
                        f"{self.spool.processing})" if settled.stuck else "")

    # -- reload (SIGHUP) ----------------------------------------------------------------------
    def _reload_step(self) -> None:
        """Start a requested reload (the new model is built on a thread while this one keeps
        serving); once built, stop claiming, let the batches in hand finish on the old model,
        then swap."""
        if self.reload_requested and self._reload is None:
            self.reload_requested = False
            log.info("SIGHUP: reloading the model and settings (the current model serves "
                     "meanwhile)")
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                self._reload = Reload.start(self.settings, self.wcfg)
            except PawcamError as exc:
                self._reload_refused(f"configuration error: {exc}")
        if self._reload is not None and self._reload.done() and not self.pipe.in_flight:
            self._finish_reload()

    def _finish_reload(self) -> None:
        reload, self._reload = self._reload, None
        try:
            clf = reload.result()
        except Exception as exc:   # noqa: BLE001 - any failure keeps the old model serving
            reason = str(exc) if isinstance(exc, PawcamError) else f"{type(exc).__name__}: {exc}"
            self._reload_refused(reason)
            return
        if tuple(clf.meta.class_names) != tuple(self.csv.class_names):
            self._reload_refused(
                f"the new model's classes {list(clf.meta.class_names)} differ from those of "
                f"{self.csv.path} {list(self.csv.class_names)}; use another outbox (restart)")
            return
        old_version = self.clf.meta.version
        self.clf, self.settings, self.wcfg = clf, reload.settings, reload.wcfg
        self.pipe.classifier = clf
        self.intake.configure(self.wcfg, self.wcfg.effective_batch_size(self.settings))
        self.status.model_version = clf.meta.version
        self.metrics.model(clf.meta.version)
        self.status.last_reload = f"{utc_now()} ok: model {clf.meta.version} (was {old_version})"
        log.warning("reloaded: now serving model %s (was %s); settings re-read from %s",
                    clf.meta.version, old_version, self.settings.source or "built-in defaults")
        self._write_status()
        self.notifier.send("READY=1", f"STATUS=watching {self.inbox} (model {clf.meta.version})")

    def _reload_refused(self, reason: str) -> None:
        self._reload = None
        self.status.last_reload = (f"{utc_now()} refused: {reason}; still serving "
                                   f"{self.clf.meta.version}")
        log.error("reload refused, still serving model %s: %s", self.clf.meta.version, reason)
        self._write_status()
        self.notifier.send("READY=1", f"STATUS=watching {self.inbox} (reload refused)")

    # -- status and stop ----------------------------------------------------------------------
    def _write_status(self) -> OSError | None:
        """Write the status file; the error is returned (logged once per kind), not raised."""
        try:
            try:
                self.status.write(self.status_path)
            except FileNotFoundError:
                self.outbox.mkdir(parents=True, exist_ok=True)   # the outbox was removed
                self.status.write(self.status_path)
        except OSError as exc:
            if self._status_errno != exc.errno:
                log.warning("cannot write %s: %s", self.status_path, describe_os_error(exc))
            self._status_errno = exc.errno
            return exc
        self._status_errno = None
        return None

    def _write_state(self, state: str) -> None:
        self.status.state = state
        self.status.queue_depth = self._depth()
        self.metrics.state(state)
        self._write_status()

    def _shutdown(self) -> None:
        """Finish or put back what is in hand; claimed batches kept aside while degraded stay
        in the processing area with their manifests (the next start takes them over)."""
        timer = None
        if self.stop_requested:
            timer = threading.Timer(self.wcfg.stop_timeout_s, self._give_up)
            timer.daemon = True
            timer.start()
            self._write_state("stopping")
        self.notifier.send("STOPPING=1")
        self.intake.stop(wait=False)
        try:
            try:
                if self.batches is not None:
                    self._flush(keep=0)    # the batch in hand: rows + moves
            except OSError as exc:
                if not transient(exc):
                    raise
                log.error("could not commit the batch in hand (%s); it is redone at the next "
                          "start", describe_os_error(exc))
            except Exception:
                log.exception("could not commit the batch in hand; it is redone at the next start")
            if self.batches is not None:
                self.batches.close()   # not yet on the model: back to the inbox
        finally:
            self.intake.join()
            self._write_state("stopped")
            self.metrics.stop()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            log.info("stopped: %d processed (%d ok, %d failed) since %s", self.status.processed,
                     self.status.ok, self.status.failed, self.status.started)
            if timer is not None:   # done in time: run() returns its own exit code
                timer.cancel()

    def _give_up(self) -> None:
        log.warning("could not finish within stop_timeout_s=%.1f s; exiting now (the batch in "
                    "hand is redone at the next start)", self.wcfg.stop_timeout_s)
        logging.shutdown()
        os._exit(0)
