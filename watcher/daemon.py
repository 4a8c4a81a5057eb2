"""``pawcam watch``: the inbox daemon's main loop.

    Daemon(settings, watcher_settings(settings)).run()    # -> exit code

Threads: the watchdog observer (events -> notices on a queue, see watcher.observer), a small
pool that decodes files and writes pictures (as in the bulk runner), and this loop, which owns
every decision and every side effect on the inbox/outbox: settling and batching
(watcher.policy), claiming and finalizing (watcher.spool), the commit (one fsync'ed append to
the results CSV per batch), the status file and systemd notifications.

Up to ``PIPELINE_DEPTH`` claimed batches are decoded ahead while the model runs, and the
pictures of one batch are written while the next runs on the model, so a burst flows at the
speed of a bulk run. Natural batching: when the model is free (no claimed batch waiting for
it), whatever is ready goes at once, so a lone file is classified as soon as it is complete;
while the model is busy the next batch gathers until it is full or ``max_wait_ms`` passed.

Faults are states, not exits: a storage fault (disk full, quota, read-only, I/O error, no
permission) or a vanished folder puts the daemon in ``degraded``: the batches in hand are rolled
back (their claimed files wait in the processing area) or, when already committed, finished
later; no new files are claimed; a probe retries with backoff (1 s doubling to 60 s) and the
daemon resumes by itself. The outbox's free space below ``min_free_mb`` does the same before the
disk is full. SIGHUP reloads the model (and the settings that may change) between batches.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import signal
import stat
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.classifier import PICTURES_DIR, format_confidence
from engine.config import Settings, load_settings, replace
from engine.durable import complete_moves, fsync_dir, write_atomic
from engine.errors import PawcamError, describe_os_error, is_storage_fault
from engine.pipeline import Pipeline
from engine.results import Result, ResultsCsv
from engine.text import new_run_id, printable, shown, utc_now
from watcher.config import WatcherSettings, watcher_settings
from watcher.metrics import DaemonMetrics, NullMetrics
from watcher.observer import COMPLETE, DIR, DIR_GONE, Notice, start_observer
from watcher.policy import Tracker, is_ignored, signature
from watcher.sdnotify import Notifier
from watcher.spool import ClaimedBatch, Spool
from watcher.status import Status

log = logging.getLogger("pawcam.watch")

PIPELINE_DEPTH = 3          # claimed batches in flight before the model (as bulk's prefetch)
MAX_NOTICES_PER_TURN = 20_000
IDLE_TICK = 0.25            # longest sleep: signals and stop requests are seen this fast
FOLDER_CHECK_S = 1.0        # how often the inbox and outbox are checked for removal/replacement
BACKOFF_MIN_S = 1.0         # degraded: first retry after this long, doubling up to ...
BACKOFF_MAX_S = 60.0
EXIT_STORAGE = 4            # --once stopped by a storage fault (as engine.cli.EXIT_STORAGE)
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


class Fault:
    """The degraded state: why, since when, when to try again."""

    def __init__(self, reason: str, backoff: float, now: float) -> None:
        self.reason = reason
        self.since = utc_now()
        self.backoff = backoff
        self.next_try = now + backoff


class Daemon:
    def __init__(self, settings: Settings, wcfg: WatcherSettings, *, once: bool = False,
                 classifier: Any = None) -> None:
        self.settings = settings
        self.wcfg = wcfg
        self.once = once
        self.clf = classifier
        self.inbox = Path(settings.paths.inbox)
        self.outbox = Path(settings.paths.outbox)
        self.batch_size = wcfg.effective_batch_size(settings)
        self.tracker = Tracker(wcfg.settle_ms / 1000, self.batch_size, wcfg.max_wait_ms / 1000)
        self.notices: queue.SimpleQueue[Notice] = queue.SimpleQueue()
        self.notifier = Notifier.from_env(wcfg.systemd_notify)
        self.status = Status(inbox=str(self.inbox), outbox=str(self.outbox),
                             observer="once" if once else wcfg.observer)
        self.status_path = self.outbox / wcfg.status_file
        self.run_id = new_run_id("w", 3)
        self._seq = 0
        self._batches = 0
        self.stop_requested = False
        self.pending: deque[ClaimedBatch] = deque()        # recovered, to classify first
        #: decode -> model -> pictures, the engine's one pipeline; tags are ClaimedBatches
        self.pipe: Pipeline | None = None
        self._uncommitted: ClaimedBatch | None = None     # out of the pipeline, commit failed
        self._started: dict[str, float] = {}              # batch id -> when it went to the model
        self.blocked: set[str] = set()                     # could not be claimed; retry at rescan
        self.observer = None
        self.spool: Spool | None = None
        self.csv: ResultsCsv | None = None
        self._next_rescan = 0.0
        self._lock_fd: int | None = None
        self.metrics: NullMetrics = NullMetrics()          # the exporter starts in run()
        self.fault: Fault | None = None                  # set while degraded
        self._resumed_backoff: float | None = None       # backoff carried over a quick relapse
        self._next_folder_check = 0.0
        self._inbox_id: tuple[int, int] | None = None
        self._outbox_id: tuple[int, int] | None = None
        self.exit_code = 0
        self.reload_requested = False
        self._reload: Future | None = None               # the new classifier being built
        self._reload_settings: tuple[Settings, WatcherSettings] | None = None

    # -- ids ----------------------------------------------------------------------------------
    def new_job_id(self) -> str:
        self._seq += 1
        return f"{self.run_id}-{self._seq:06d}"

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
        self._inbox_id, self._outbox_id = identity(self.inbox), identity(self.outbox)
        processing = self.inbox / self.wcfg.processing_dir
        self.spool = Spool(self.inbox, processing, self.outbox / self.wcfg.processed_dir,
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
            self.clf = self._build_classifier(self.settings)
        self.status.model_version = self.clf.meta.version
        self.metrics.model(self.clf.meta.version)
        self.csv = ResultsCsv(self.outbox / self.wcfg.results_csv, self.clf.meta.class_names)

    @staticmethod
    def _build_classifier(settings: Settings):
        """THE way the daemon gets a classifier (start-up and SIGHUP reload): load the model
        named in ``settings``, check it and warm it up. Raises PawcamError (ModelLoadError, ...)
        when the model is unusable."""
        from engine.classifier import Classifier

        t0 = time.monotonic()
        clf = Classifier.from_settings(settings)
        Daemon._check_and_warm_up(clf)
        log.info("model %s loaded in %.1f s", clf.meta.version, time.monotonic() - t0)
        return clf

    @staticmethod
    def _check_and_warm_up(clf) -> None:
        """A test batch: trace the model for batch shapes 1 and 2 (then any size) before READY,
        so the first dropped file does not pay for it, and check that it answers with one
        finite probability per class."""
        import numpy as np

        from engine.decode import DecodedImage
        from engine.errors import ModelLoadError

        h, w = clf.meta.input_size
        img = DecodedImage(np.zeros((h, w, 3), np.uint8), None, w, h, "")
        for n in (1, 2):
            probs, _ = clf.infer([img] * n)
            probs = np.asarray(probs)
            if probs.shape != (n, len(clf.meta.class_names)) or not np.isfinite(probs).all():
                raise ModelLoadError(
                    f"the model's test batch of {n} gave {probs.shape} "
                    f"{'non-finite ' if not np.isfinite(probs).all() else ''}probabilities, "
                    f"expected ({n}, {len(clf.meta.class_names)}) finite ones")

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
        try:
            try:
                self._recover()
            except OSError as exc:
                if not transient(exc):
                    raise
                self._storage_fault(exc)
            if not self.once:
                self.observer = start_observer(str(self.inbox), self.wcfg.observer,
                                               self.wcfg.poll_seconds, self.notices)
            self._scan("")
            self._next_rescan = time.monotonic() + (self.wcfg.rescan_seconds or float("inf"))
            self._write_state("running")
            self.notifier.send("READY=1", f"STATUS=watching {self.inbox}")
            log.info("watching %s (%s observer, batch %d, settle %d ms, max wait %d ms); "
                     "results in %s", self.inbox, self.status.observer, self.batch_size,
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
            self._drain(timeout)
            now = time.monotonic()
            self._check_folders_now(now)
            self._reload_step()
            for rel in self.tracker.due_checks(now):
                self._look(rel, now, complete=False)
            if now >= self._next_rescan and self._inbox_id is not None:
                self._next_rescan = now + self.wcfg.rescan_seconds
                self.blocked.clear()
                self._scan("")
            if self.fault is not None and now >= self.fault.next_try:
                self._try_resume()
            try:
                self._fill_pipeline(time.monotonic())
                if self.pipe.waiting:
                    self._run_model()
                    self._flush(keep=1 if self._more_work(time.monotonic()) else 0)
                elif self.pipe.in_flight:
                    self._flush(keep=0)
            except OSError as exc:
                if not transient(exc):
                    raise
                self._storage_fault(exc)
            busy = bool(self.pipe.in_flight or (self.pending and self._claiming()))
            if self.once and not busy and (self.fault is not None or not self.tracker.candidates):
                break
            timeout = 0.0 if busy else self._idle_timeout()

    def _more_work(self, now: float) -> bool:
        """Another batch will go to the model right away (so keep one batch's pictures
        writing in the background instead of waiting for them)."""
        return bool(self.pipe.waiting
                    or (self._claiming() and (self.pending or self._batch_due(now))))

    def _batch_due(self, now: float) -> bool:
        """Natural batching: with the model free (no claimed batch waiting for it), whatever is
        ready goes now; while it is busy, a batch goes when full or ``max_wait_ms`` after its
        first file was ready."""
        return bool(self.tracker.ready) and (not self.pipe.waiting or self.tracker.batch_due(now))

    def _claiming(self) -> bool:
        """New work may start: not degraded, and no reloaded model waiting to be swapped in."""
        return self.fault is None and not (self._reload is not None and self._reload.done())

    def _idle_timeout(self) -> float:
        """How long the loop may sleep. The batch deadline counts only while claiming: files
        left ready while degraded must not make the loop spin."""
        now = time.monotonic()
        deadline = self.tracker.deadline() if self._claiming() else None
        times = [t for t in (self.tracker.next_check(), deadline,
                             self._next_rescan, self.notifier.next_ping(),
                             self._next_folder_check,
                             self.fault.next_try if self.fault is not None else None)
                 if t is not None]
        wait = min(times) - now if times else IDLE_TICK
        return max(0.0, min(IDLE_TICK, wait))

    # -- events -> candidates -----------------------------------------------------------------
    def _rel(self, path: str) -> str | None:
        """Inbox-relative path of a notice's ``path``; None when it is not input (outside the
        inbox, ignored, or in the processing area)."""
        try:
            rel = os.path.relpath(path, self.inbox)
        except ValueError:
            return None
        if rel == "." or rel.startswith("../") or rel == "..":
            return None
        rel = rel.replace(os.sep, "/")
        return None if self._skipped(rel) else rel

    def _skipped(self, rel: str) -> bool:
        """Not input: an ignored name, or anything in the processing area (always, whatever
        ``ignore`` says: its lock file, manifests and claimed files are this daemon's own)."""
        return (rel.split("/", 1)[0] == self.wcfg.processing_dir
                or is_ignored(rel, self.wcfg.ignore))

    def _drain(self, timeout: float) -> None:
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
                self._next_folder_check = 0.0    # the inbox itself: look at once
                continue
            rel = self._rel(path)
            if rel is None:
                continue
            if kind == DIR:
                self._scan(rel)
            elif kind == DIR_GONE:
                self.tracker.forget_under(rel)
                self._look(rel, now, complete=False)
            else:
                self._look(rel, now, complete=kind == COMPLETE)

    def _look(self, rel: str, now: float, complete: bool) -> None:
        """lstat ``rel`` (never following links) and tell the tracker what is there."""
        try:
            st = os.lstat(self.inbox / rel)
        except OSError:
            self.tracker.forget(rel)
            return
        if stat.S_ISDIR(st.st_mode):
            self.tracker.forget(rel)
            self._scan(rel)
            return
        if rel in self.blocked:
            return
        self.tracker.observe(rel, st, now, time.time(), complete=complete)

    def _scan(self, rel_dir: str) -> None:
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
                if self._skipped(rel):
                    continue
                if is_dir:
                    stack.append(rel)
                elif rel not in self.tracker.candidates:
                    self._look(rel, now, complete=False)

    # -- batches ------------------------------------------------------------------------------
    def _fill_pipeline(self, now: float) -> None:
        while self.pipe.waiting < PIPELINE_DEPTH and self._claiming():
            if self.pending:
                batch = self.pending.popleft()
            elif self._batch_due(now):
                if not self._space_ok():
                    return
                batch = self._claim(now)
                if batch is None:
                    continue
            else:
                return
            self.pipe.submit(self._jobs(batch), tag=batch)

    def _claim(self, now: float) -> ClaimedBatch | None:
        wall = time.time()
        entries = []
        for cand in self.tracker.take():
            try:
                st = os.lstat(self.inbox / cand.rel)
            except OSError:
                continue  # vanished meanwhile: nothing to do
            if signature(st) != cand.sig:  # written to since it looked complete: settle again
                self.tracker.observe(cand.rel, st, now, wall)
                continue
            entries.append((self.new_job_id(), cand.rel, cand.ready_at or now))
        if not entries:
            return None
        self._batches += 1
        try:
            batch = self.spool.claim(f"{self.run_id}-b{self._batches:06d}", entries)
        except OSError as exc:
            # the manifest could not be written: nothing was claimed, the files are still in
            # the inbox; a rescan finds them again once the fault is gone
            self._rescan_soon()
            raise _placed(exc, self.spool.processing)
        claimed = {item.input_path for item in batch.items}
        for _, rel, _ in entries:
            if rel not in claimed and os.path.lexists(self.inbox / rel):
                self.blocked.add(rel)  # could not be renamed: do not spin on it
        return batch if batch.items else None

    def _jobs(self, batch: ClaimedBatch):
        from engine.classifier import Job

        return [Job(item.path, item.input_path, item.job_id) for item in batch.items]

    def _run_model(self) -> None:
        """The oldest claimed batch through the model (its pictures start on the pool)."""
        self.pipe.advance()
        batch, started, seconds, images = self.pipe.last_call
        self._started[batch.batch_id] = started
        self.metrics.inference(seconds, images)

    def _flush(self, keep: int) -> None:
        """Commit finished batches (all but ``keep``): rows first, then move the files.

        A storage fault while writing pictures leaves the batch in the pipeline; one while
        committing leaves it in ``_uncommitted``: either way :meth:`_roll_back_in_flight`
        redoes it first once the fault is gone."""
        finished = self.pipe.completed(keep)
        while True:
            try:
                item = next(finished, None)
            except OSError as exc:          # the outbox's trouble: degraded, redo later
                raise _placed(exc, self.outbox / PICTURES_DIR)
            if item is None:
                return
            batch, results = item
            try:
                for folder in {(self.outbox / p).parent for r in results
                               for p in r.pictures.values()}:
                    fsync_dir(folder)
                self.csv.append(results)  # THE COMMIT: one write + fsync (rolled back if it fails)
            except OSError as exc:
                self._uncommitted = batch
                raise _placed(exc, self.csv.path)
            self._resumed_backoff = None   # a commit went through: the next fault starts at 1 s
            self._finalize(batch, results, self._started.pop(batch.batch_id, None))

    def _finalize(self, batch: ClaimedBatch, results: list[Result], t0: float | None) -> None:
        """After the commit: move the batch's files out, count, log. A storage fault while
        moving keeps the unmoved (committed) files for a retry when the fault is gone."""
        all_moved = True
        ok = failed = 0
        deferred: list = []
        stuck: list = []
        fault: OSError | None = None
        for item, r in zip(batch.items, results):
            try:
                where = self.spool.finalize(item, r.ok, r.error, deferred)
            except FileNotFoundError:
                if os.path.lexists(item.path):
                    raise
                where = "(vanished from the processing area: the inbox was removed?)"
                log.warning("%s vanished from the processing area before it could be moved "
                            "out (the inbox or its processing area was removed?); its row is "
                            "in the results", shown(item.input_path))
            except OSError as exc:
                all_moved = False
                if transient(exc):
                    fault = fault or exc
                    stuck.append(item)
                    where = "(waits in the processing area until the storage fault is gone)"
                else:
                    where = (f"(left in processing area, {exc.strerror or exc}; moved at next "
                             "start)")
                    log.error("cannot move %s out of the processing area: %s",
                              shown(item.input_path), exc)
            where = self._short(where)
            if r.ok:
                ok += 1
                log.info("done %s: %s %s -> %s [%s]", shown(item.input_path), r.label,
                         format_confidence(r.confidence or 0.0), where, item.job_id)
            else:
                failed += 1
                log.warning("failed %s: %s -> %s [%s]", shown(item.input_path), printable(r.error),
                            where, item.job_id)
        try:
            complete_moves(deferred)
        except OSError as exc:
            all_moved = False
            log.error("cannot finish moving the batch's files: %s (done at the next start)", exc)
        if stuck:   # committed: on resume they are only moved on (see _settle_claimed)
            self.pending.append(ClaimedBatch(batch.batch_id, batch.manifest, stuck,
                                             recovered=batch.recovered))
        elif all_moved and not batch.keep_manifest:
            self.spool.drop_manifest(batch)
        s = self.status
        s.processed += ok + failed
        s.ok += ok
        s.failed += failed
        if batch.recovered:
            s.recovered += ok + failed
        if t0 is not None:
            seconds = time.monotonic() - t0
            s.batches += 1
            s.last_batch_size = ok + failed
            s.last_batch_seconds = round(seconds, 3)
            s.last_batch_at = utc_now()
            s.queue_depth = self._depth()
            self.metrics.batch(results, [i.ready_at for i in batch.items], seconds, s.queue_depth)
            s.latency_p50_s, s.latency_p95_s = self.metrics.latency_summary()
            log.info("batch of %d: %d ok, %d failed in %.2f s (%.1f files/s); queue %d%s",
                     ok + failed, ok, failed, seconds, (ok + failed) / max(seconds, 1e-9),
                     s.queue_depth, " (recovered)" if batch.recovered else "")
            status_error = self._write_status()
            if fault is None and status_error is not None and transient(status_error):
                fault = status_error
        if fault is not None:
            self._storage_fault(fault)

    def _short(self, where: str) -> str:
        try:
            return printable(os.path.relpath(where, self.outbox)) if where.startswith("/") else where
        except ValueError:
            return where

    def _depth(self) -> int:
        inflight = sum(len(b.items) for b in self.pipe.tags()) if self.pipe else 0
        return self.tracker.depth + inflight + sum(len(b.items) for b in self.pending)

    # -- recovery -----------------------------------------------------------------------------
    def _recover(self) -> None:
        batches = self.spool.recover(self.new_job_id, self.csv.outcomes)
        if not batches:
            return
        done, redo, stuck = self._settle_claimed(batches, retry=True)
        log.warning("recovered after an unclean stop: %d file(s) already recorded were moved "
                    "on, %d are classified again%s", done, redo,
                    f", {stuck} could not be moved (left in {self.spool.processing})"
                    if stuck else "")

    def _settle_claimed(self, batches: list[ClaimedBatch],
                        retry: bool = False) -> tuple[int, int, int]:
        """Claimed batches whose fate is unknown (a crash, a rolled-back or half-finalized
        batch): files whose job id is in the CSV are only moved on; the others go to
        ``pending`` to be classified again under the same job id. Returns (moved, redo,
        stuck). With ``retry`` (resuming from degraded), a committed file that still cannot
        be moved because of a storage fault is kept in ``pending`` and the fault raised."""
        ids = {item.job_id for b in batches for item in b.items}
        outcomes = self.csv.outcomes(ids)
        done = stuck = redo = 0
        again: list[ClaimedBatch] = []
        fault: OSError | None = None
        for batch in batches:
            committed = [i for i in batch.items if i.job_id in outcomes]
            kept = []
            for item in committed:
                status, error = outcomes[item.job_id]
                try:
                    where = self.spool.finalize(item, status == "ok", error)
                except FileNotFoundError:
                    if os.path.lexists(item.path):
                        raise
                    done += 1
                    log.warning("%s vanished from the processing area (the inbox was "
                                "removed?); its row is in the results", shown(item.input_path))
                    continue
                except OSError as exc:
                    if retry and transient(exc):
                        fault = fault or exc
                        kept.append(item)
                        continue
                    # keep the manifest: the file keeps its job id, so the next start moves it
                    # on instead of classifying it again under a new one (a second row)
                    batch.keep_manifest = True
                    stuck += 1
                    log.error("cannot move %s out of the processing area: %s (tried again at "
                              "the next start)", shown(item.input_path), exc)
                    continue
                done += 1
                log.info("recovered %s: already in the results; -> %s [%s]",
                         shown(item.input_path), self._short(where), item.job_id)
            if kept:
                again.append(ClaimedBatch(batch.batch_id, batch.manifest, kept,
                                          recovered=batch.recovered))
            batch.items = [i for i in batch.items if i.job_id not in outcomes]
            if batch.items:
                redo += len(batch.items)
                for item in batch.items:   # (after a fault: one summary line, see _try_resume)
                    log.log(logging.DEBUG if retry else logging.INFO,
                            "%s %s: classifying it again [%s]",
                            "retrying" if retry else "recovered", shown(item.input_path),
                            item.job_id)
                self.pending.append(batch)
            elif not batch.keep_manifest and not kept:
                self.spool.drop_manifest(batch)
        self.pending.extend(again)
        if fault is not None:
            raise fault
        return done, redo, stuck

    # -- faults: degraded, backoff, resume ---------------------------------------------------
    def _storage_fault(self, exc: OSError) -> None:
        """A write failed because of the storage or a vanished folder: roll back what is in
        flight (claimed files wait in the processing area) and go (or stay) degraded."""
        self._roll_back_in_flight()
        self._degrade(describe_os_error(exc))

    def _roll_back_in_flight(self) -> None:
        """Batches on their way (decoding, on the model, pictures being written) go back to
        ``pending``, first in line; their rows were not committed, so they are classified
        again under the same job ids once the fault is gone (a rolled-back CSV append left
        nothing behind; :meth:`_settle_claimed` checks the CSV anyway)."""
        back = [self._uncommitted] if self._uncommitted is not None else []
        back += self.pipe.abandon()
        self._uncommitted = None
        for batch in back:
            self._started.pop(batch.batch_id, None)
        self.pending.extendleft(reversed(back))

    def _degrade(self, reason: str) -> None:
        """Enter the degraded state, or, when already in it, back off further. One log line
        per change of state (or of its reason), not per file or per retry."""
        now = time.monotonic()
        if self.fault is None:
            backoff = (min(BACKOFF_MAX_S, self._resumed_backoff * 2)
                       if self._resumed_backoff else BACKOFF_MIN_S)
            self.fault = Fault(reason, backoff, now)
            log.error("degraded: %s; not taking new files; %d claimed file(s) wait in the "
                      "processing area; retrying in %.0f s (resumes by itself)", reason,
                      sum(len(b.items) for b in self.pending), backoff)
        else:
            f = self.fault
            f.backoff = min(BACKOFF_MAX_S, f.backoff * 2)
            f.next_try = now + f.backoff
            if reason != f.reason:
                log.error("still degraded, now: %s; retrying in %.0f s", reason, f.backoff)
                f.reason = reason
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
        f = self.fault
        try:
            self.csv = ResultsCsv(self.outbox / self.wcfg.results_csv, self.clf.meta.class_names)
            self._outbox_id = identity(self.outbox)
            waiting = list(self.pending)
            self.pending.clear()
            self._settle_claimed(waiting, retry=True)
        except OSError as exc:
            if not transient(exc):
                raise
            self._degrade(describe_os_error(exc))
            return
        self.fault = None
        self._resumed_backoff = f.backoff
        log.warning("resumed: writes succeed again (degraded since %s: %s); %d claimed "
                    "file(s) are classified again", f.since, f.reason,
                    sum(len(b.items) for b in self.pending))
        self._rescan_soon()
        self._show_fault()

    def _probe(self) -> str | None:
        """What still stands in the way of working (None: nothing): the inbox, the outbox and
        the processing area exist (the latter two re-created), free space is above the floor,
        and a small write + fsync succeeds in the outbox and the processing area."""
        if identity(self.inbox) is None:
            return f"the inbox {self.inbox} does not exist (removed?); waiting for it"
        try:
            self.outbox.mkdir(parents=True, exist_ok=True)
            self.spool.processing.mkdir(exist_ok=True)
            problem = self._space_problem()
            if problem:
                return problem
            for folder in (self.outbox, self.spool.processing):
                probe = folder / f".pawcam-probe-{os.getpid()}"
                write_atomic(probe, b"\0" * 4096, durable=True)
                os.unlink(probe)
            csv_path = self.outbox / self.wcfg.results_csv
            if csv_path.exists():
                os.close(os.open(csv_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
        except OSError as exc:
            if not transient(exc):
                raise
            return describe_os_error(exc)
        return None

    def _space_problem(self) -> str | None:
        if self.wcfg.min_free_mb <= 0:
            return None
        free, size = free_bytes(self.outbox)
        floor = self.wcfg.free_space_floor(size)
        if free >= floor:
            return None
        return (f"only {free / 2**20:.1f} MiB free in {self.outbox}, below the floor of "
                f"{floor / 2**20:.1f} MiB ([watcher] min_free_mb = {self.wcfg.min_free_mb})")

    def _space_ok(self) -> bool:
        """Free space above the floor before claiming; else degraded (in-flight work goes on)."""
        try:
            problem = self._space_problem()
        except OSError as exc:
            if not transient(exc):
                raise
            problem = describe_os_error(exc)
        if problem is None:
            return True
        self._degrade(problem)
        return False

    def _rescan_soon(self) -> None:
        self.blocked.clear()
        self._next_rescan = 0.0

    # -- folders that vanish or change -------------------------------------------------------
    def _check_folders_now(self, now: float) -> None:
        """Every FOLDER_CHECK_S: is the inbox still the folder being watched, is the outbox
        there? A removed inbox makes the daemon degraded until it comes back; a recreated or
        replaced one (or a new mount) is watched again and rescanned."""
        if now < self._next_folder_check:
            return
        self._next_folder_check = now + FOLDER_CHECK_S
        inbox = identity(self.inbox)
        if inbox != self._inbox_id:
            if inbox is None:
                log.error("the inbox %s is gone (removed or unmounted); waiting for it to come "
                          "back", self.inbox)
                self._stop_observer()
                self._inbox_id = None
                self.tracker = self._new_tracker()
                self._degrade(f"the inbox {self.inbox} does not exist (removed?); waiting for it")
            else:
                log.warning("the inbox %s %s; watching it again", self.inbox,
                            "is back" if self._inbox_id is None else
                            "was replaced (removed and re-created, or remounted)")
                self._reattach_inbox(inbox)
        outbox = identity(self.outbox)
        if outbox != self._outbox_id:
            self._outbox_id = outbox
            if outbox is None:
                log.warning("the outbox %s is gone; re-creating it (a new results.csv starts "
                            "there)", self.outbox)
                try:
                    self.outbox.mkdir(parents=True, exist_ok=True)
                    self._outbox_id = identity(self.outbox)
                except OSError as exc:
                    if not transient(exc):
                        raise
                    self._storage_fault(exc)
            else:
                log.warning("the outbox %s was replaced (re-created or remounted); results go "
                            "on there", self.outbox)

    def _new_tracker(self) -> Tracker:
        return Tracker(self.wcfg.settle_ms / 1000, self.batch_size, self.wcfg.max_wait_ms / 1000)

    def _stop_observer(self) -> None:
        if self.observer is not None:
            try:
                self.observer.stop()
                self.observer.join(timeout=2)
            except Exception:  # noqa: BLE001 - a dead observer is replaced anyway
                log.debug("stopping the observer failed", exc_info=True)
            self.observer = None

    def _reattach_inbox(self, inbox_id: tuple[int, int]) -> None:
        """A (new) inbox folder: processing area and lock there, a new observer, a full scan.
        Claimed files that were in the old processing area are reported when their batch
        finishes (decode or move: "vanished")."""
        self._stop_observer()
        self.tracker = self._new_tracker()
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
        self._inbox_id = inbox_id
        if not self.once:
            self.observer = start_observer(str(self.inbox), self.wcfg.observer,
                                           self.wcfg.poll_seconds, self.notices)
        self._rescan_soon()
        if self.fault is not None:
            self.fault.next_try = time.monotonic()   # try to resume now, not after the backoff

    # -- reload (SIGHUP) ----------------------------------------------------------------------
    def _reload_step(self) -> None:
        """Start a requested reload (the new model is built on a thread while this one keeps
        serving); once built, stop claiming, let the batches in hand finish on the old model,
        then swap."""
        if self.reload_requested and self._reload is None:
            self.reload_requested = False
            self._start_reload()
        if self._reload is not None and self._reload.done() and not self.pipe.in_flight:
            self._finish_reload()

    def _start_reload(self) -> None:
        log.info("SIGHUP: reloading the model and settings (the current model serves meanwhile)")
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            settings, wcfg = self._reread_settings()
        except PawcamError as exc:
            self._reload_refused(f"configuration error: {exc}")
            return
        self._reload_settings = (settings, wcfg)
        builder = ThreadPoolExecutor(1, thread_name_prefix="pawcam-reload")
        self._reload = builder.submit(self._build_classifier, settings)
        builder.shutdown(wait=False)

    def _reread_settings(self) -> tuple[Settings, WatcherSettings]:
        """config.toml again, keeping what cannot change while running: the folders, the
        device, decode threads, runtime and precision (the latter two and the folders may come
        from command-line flags) and the RESTART_ONLY watcher keys (a change to those is logged
        as needing a restart)."""
        old, wold = self.settings, self.wcfg
        raw = load_settings(old.source) if old.source is not None else old
        wraw = watcher_settings(raw)
        kept = {k: getattr(wold, k) for k in WatcherSettings.RESTART_ONLY}
        changed = [f"[watcher] {k}" for k, v in kept.items() if getattr(wraw, k) != v]
        if raw.device != old.device:
            changed.append("[device]")
        for key in ("decode_threads", "runtime", "precision"):  # (these may come from flags)
            if getattr(raw.inference, key) != getattr(old.inference, key):
                changed.append(f"[inference] {key}")
        if changed:
            log.warning("reload: %s changed in the configuration but need(s) a restart; "
                        "keeping the running values", ", ".join(changed))
        new = replace(raw, paths=old.paths, device=old.device,
                      inference=replace(raw.inference,
                                        decode_threads=old.inference.decode_threads,
                                        runtime=old.inference.runtime,
                                        precision=old.inference.precision))
        return new, replace(wraw, **kept)

    def _finish_reload(self) -> None:
        future, self._reload = self._reload, None
        settings, wcfg = self._reload_settings
        self._reload_settings = None
        try:
            clf = future.result()
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
        self.clf, self.settings, self.wcfg = clf, settings, wcfg
        self.pipe.classifier = clf
        self.batch_size = wcfg.effective_batch_size(settings)
        t = self.tracker
        t.settle_s, t.max_wait_s, t.batch_size = (wcfg.settle_ms / 1000, wcfg.max_wait_ms / 1000,
                                                  self.batch_size)
        self._next_rescan = min(self._next_rescan,
                                time.monotonic() + (wcfg.rescan_seconds or float("inf")))
        self.status.model_version = clf.meta.version
        self.metrics.model(clf.meta.version)
        self.status.last_reload = f"{utc_now()} ok: model {clf.meta.version} (was {old_version})"
        log.warning("reloaded: now serving model %s (was %s); settings re-read from %s",
                    clf.meta.version, old_version, settings.source or "built-in defaults")
        self._write_status()
        self.notifier.send("READY=1", f"STATUS=watching {self.inbox} (model {clf.meta.version})")

    def _reload_refused(self, reason: str) -> None:
        self._reload = None
        self._reload_settings = None
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
            if getattr(self, "_status_errno", None) != exc.errno:
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
        if self.observer is not None:
            self.observer.stop()
        try:
            try:
                self._flush(keep=0)    # the batch in hand: rows + moves
            except OSError as exc:
                if not transient(exc):
                    raise
                log.error("could not commit the batch in hand (%s); it is redone at the next "
                          "start", describe_os_error(exc))
            except Exception:
                log.exception("could not commit the batch in hand; it is redone at the next start")
            if self.pipe is not None:
                never_ran = self.pipe.waiting_tags()
                self.pipe.abandon()    # a batch whose commit failed stays claimed: next start
                self.pipe.close(cancel=True)
                for batch in never_ran:  # claimed, not yet on the model: back to the inbox
                    self.spool.unclaim(batch)
        finally:
            if self.observer is not None:
                self.observer.join(timeout=2)
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


def _utc_in(seconds: float) -> str:
    """UTC ISO time ``seconds`` from now, like :func:`engine.text.utc_now`."""
    from datetime import datetime, timedelta, timezone

    at = datetime.now(timezone.utc) + timedelta(seconds=max(0.0, seconds))
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _placed(exc: OSError, where: Path) -> OSError:
    """``exc`` naming ``where`` when it names no file (a failed ``write()`` does not)."""
    if exc.filename is None:
        exc.filename = str(where)
    return exc
