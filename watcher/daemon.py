"""``pawcam watch``: the inbox daemon's main loop.

    Daemon(settings, watcher_settings(settings)).run()    # -> exit code

Threads: the watchdog observer (events -> notices on a queue, see watcher.observer), a small
pool that decodes files and writes pictures (as in the bulk runner), and this loop, which owns
every decision and every side effect on the inbox/outbox: settling and batching
(watcher.policy), claiming and finalizing (watcher.spool), the commit (one fsync'ed append to
the results CSV per batch), the status file and systemd notifications.

Up to ``PIPELINE_DEPTH`` claimed batches are decoded ahead while the model runs, and the
pictures of one batch are written while the next runs on the model, so a burst flows at the
speed of a bulk run; a lone file goes out ``max_wait_ms`` after it became ready.
"""
from __future__ import annotations

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

from engine.bulk import new_run_id
from engine.classifier import format_confidence
from engine.config import Settings
from engine.errors import PawcamError
from engine.results import Result, ResultsCsv, printable, utc_now
from watcher.config import WatcherSettings
from watcher.metrics import DaemonMetrics, NullMetrics
from watcher.observer import COMPLETE, DIR, DIR_GONE, Notice, start_observer
from watcher.policy import Tracker, is_ignored, signature
from watcher.sdnotify import Notifier
from watcher.spool import ClaimedBatch, Spool, complete_moves, fsync_dir, shown
from watcher.status import Status

log = logging.getLogger("pawcam.watch")

PIPELINE_DEPTH = 3          # claimed batches in flight before the model (as bulk's prefetch)
MAX_NOTICES_PER_TURN = 20_000
IDLE_TICK = 0.25            # longest sleep: signals and stop requests are seen this fast


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
        self.decoding: deque[tuple[ClaimedBatch, list[Future]]] = deque()
        self.finishing: deque[tuple[ClaimedBatch, list[Any], float]] = deque()
        self.blocked: set[str] = set()                     # could not be claimed; retry at rescan
        self.observer = None
        self.pool: ThreadPoolExecutor | None = None
        self.spool: Spool | None = None
        self.csv: ResultsCsv | None = None
        self._next_rescan = 0.0
        self._lock_fd: int | None = None
        self.metrics: NullMetrics = NullMetrics()          # the exporter starts in run()

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

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _load_model(self) -> None:
        if self.clf is None:
            from engine.classifier import Classifier

            t0 = time.monotonic()
            self.clf = Classifier(self.settings)
            self._warm_up()
            log.info("model %s loaded in %.1f s", self.clf.meta.version, time.monotonic() - t0)
        self.status.model_version = self.clf.meta.version
        self.metrics.model(self.clf.meta.version)
        self.csv = ResultsCsv(self.outbox / self.wcfg.results_csv, self.clf.meta.class_names)

    def _warm_up(self) -> None:
        """Trace the model once for batch shapes 1 and 2 (then any size) before READY, so the
        first dropped file does not pay for it."""
        import numpy as np

        from engine.decode import DecodedImage

        h, w = self.clf.meta.input_size
        img = DecodedImage(np.zeros((h, w, 3), np.uint8), None, w, h, "")
        for n in (1, 2):
            self.clf.infer([img] * n)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        self._check_folders()
        self.metrics = DaemonMetrics.start(self.wcfg.metrics_host, self.wcfg.metrics_port)
        self.status.write(self.status_path)
        self._load_model()
        if self.stop_requested:
            self._write_state("stopped")
            return 0
        self.pool = ThreadPoolExecutor(self.settings.inference.threads,
                                       thread_name_prefix="pawcam-io")
        try:
            self._recover()
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
            self._loop()
        except Exception:
            log.exception("fatal error; claimed files stay in %s and are taken over at the next "
                          "start", self.spool.processing)
            return 1
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        timeout = 0.0
        while not self.stop_requested:
            self.notifier.ping(time.monotonic())
            self._drain(timeout)
            now = time.monotonic()
            for rel in self.tracker.due_checks(now):
                self._look(rel, now, complete=False)
            if now >= self._next_rescan:
                self._next_rescan = now + self.wcfg.rescan_seconds
                self.blocked.clear()
                self._scan("")
            self._fill_pipeline(time.monotonic())
            if self.decoding:
                self._run_model(*self.decoding.popleft())
                more = bool(self.decoding or self.pending or self.tracker.batch_due(time.monotonic()))
                self._flush(keep=1 if more else 0)
            elif self.finishing:
                self._flush(keep=0)
            busy = bool(self.decoding or self.finishing or self.pending)
            if self.once and not busy and not self.tracker.candidates:
                break
            timeout = 0.0 if busy else self._idle_timeout()

    def _idle_timeout(self) -> float:
        now = time.monotonic()
        times = [t for t in (self.tracker.next_check(), self.tracker.deadline(),
                             self._next_rescan, self.notifier.next_ping()) if t is not None]
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
        while len(self.decoding) < PIPELINE_DEPTH:
            if self.pending:
                batch = self.pending.popleft()
            elif self.tracker.batch_due(now):
                batch = self._claim(now)
                if batch is None:
                    continue
            else:
                return
            jobs = self._jobs(batch)
            self.decoding.append((batch, [self.pool.submit(self.clf.try_decode, j) for j in jobs]))

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
        batch = self.spool.claim(f"{self.run_id}-b{self._batches:06d}", entries)
        claimed = {item.rel for item in batch.items}
        for _, rel, _ in entries:
            if rel not in claimed and os.path.lexists(self.inbox / rel):
                self.blocked.add(rel)  # could not be renamed: do not spin on it
        return batch if batch.items else None

    def _jobs(self, batch: ClaimedBatch):
        from engine.classifier import Job

        return [Job(item.path, item.rel, item.job_id) for item in batch.items]

    def _run_model(self, batch: ClaimedBatch, futures: list[Future]) -> None:
        from engine.decode import DecodedImage

        t0 = time.monotonic()
        jobs = self._jobs(batch)
        try:
            decoded = [f.result() for f in futures]
            good = [d for d in decoded if isinstance(d, DecodedImage)]
            t_infer = time.monotonic()
            probs, cams = self.clf.infer(good) if good else (None, None)
            self.metrics.inference(time.monotonic() - t_infer, len(good))
            slots: list[Any] = []
            k = 0
            for job, d in zip(jobs, decoded):
                if isinstance(d, DecodedImage):
                    cam = None if cams is None else cams[k]
                    slots.append(self.pool.submit(self._finish, job, d, probs[k], cam))
                    k += 1
                else:
                    slots.append(self.clf.error_result(job, d))
        except Exception as exc:  # one bad batch must not end the daemon
            log.exception("batch %s failed", batch.batch_id)
            reason = f"internal error while classifying ({type(exc).__name__}: {exc})"
            slots = [self.clf.error_result(job, reason) for job in jobs]
        self.finishing.append((batch, slots, t0))

    def _finish(self, job, image, probs, cam) -> Result:
        """Pictures + row (pool thread); the pictures are flushed to disk before the commit so
        that a committed row never points at pictures lost in a power cut."""
        return self.clf.finish(job, image, probs, cam, self.outbox, durable=True)

    def _flush(self, keep: int) -> None:
        """Commit finished batches (all but ``keep``): rows first, then move the files."""
        while len(self.finishing) > keep:
            batch, slots, t0 = self.finishing.popleft()
            jobs = self._jobs(batch)
            results: list[Result] = []
            for job, slot in zip(jobs, slots):
                if isinstance(slot, Future):
                    try:
                        slot = slot.result()
                    except Exception as exc:
                        log.exception("finishing %s failed", shown(job.display_path))
                        slot = self.clf.error_result(
                            job, f"internal error while writing results ({type(exc).__name__}: "
                                 f"{exc})")
                results.append(slot)
            for folder in {(self.outbox / p).parent for r in results for p in r.pictures.values()}:
                fsync_dir(folder)
            self.csv.append(results)  # THE COMMIT: one write + fsync
            self._finalize(batch, results, t0)

    def _finalize(self, batch: ClaimedBatch, results: list[Result], t0: float | None) -> None:
        all_moved = True
        ok = failed = 0
        deferred: list = []
        for item, r in zip(batch.items, results):
            try:
                where = self.spool.finalize(item, r.ok, r.error, deferred)
            except OSError as exc:
                all_moved = False
                where = f"(left in processing area, {exc.strerror or exc}; moved at next start)"
                log.error("cannot move %s out of the processing area: %s", shown(item.rel), exc)
            where = self._short(where)
            if r.ok:
                ok += 1
                log.info("done %s: %s %s -> %s [%s]", shown(item.rel), r.label,
                         format_confidence(r.confidence or 0.0), where, item.job_id)
            else:
                failed += 1
                log.warning("failed %s: %s -> %s [%s]", shown(item.rel), printable(r.error),
                            where, item.job_id)
        try:
            complete_moves(deferred)
        except OSError as exc:
            all_moved = False
            log.error("cannot finish moving the batch's files: %s (done at the next start)", exc)
        if all_moved and not batch.keep_manifest:
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
            self._write_status()

    def _short(self, where: str) -> str:
        try:
            return printable(os.path.relpath(where, self.outbox)) if where.startswith("/") else where
        except ValueError:
            return where

    def _depth(self) -> int:
        inflight = sum(len(b.items) for b, *_ in (*self.decoding, *self.finishing))
        return self.tracker.depth + inflight + sum(len(b.items) for b in self.pending)

    # -- recovery -----------------------------------------------------------------------------
    def _recover(self) -> None:
        batches = self.spool.recover(self.new_job_id, self.csv.outcomes)
        if not batches:
            return
        ids = {item.job_id for b in batches for item in b.items}
        outcomes = self.csv.outcomes(ids)
        done = stuck = redo = 0
        for batch in batches:
            committed = [i for i in batch.items if i.job_id in outcomes]
            for item in committed:
                status, error = outcomes[item.job_id]
                try:
                    where = self.spool.finalize(item, status == "ok", error)
                except OSError as exc:
                    # keep the manifest: the file keeps its job id, so the next start moves it
                    # on instead of classifying it again under a new one (a second row)
                    batch.keep_manifest = True
                    stuck += 1
                    log.error("cannot move %s out of the processing area: %s (tried again at "
                              "the next start)", shown(item.rel), exc)
                    continue
                done += 1
                log.info("recovered %s: already in the results; -> %s [%s]",
                         shown(item.rel), self._short(where), item.job_id)
            batch.items = [i for i in batch.items if i.job_id not in outcomes]
            if batch.items:
                redo += len(batch.items)
                for item in batch.items:
                    log.info("recovered %s: classifying it again [%s]", shown(item.rel),
                             item.job_id)
                self.pending.append(batch)
            elif not batch.keep_manifest:
                self.spool.drop_manifest(batch)
        log.warning("recovered after an unclean stop: %d file(s) already recorded were moved "
                    "on, %d are classified again%s", done, redo,
                    f", {stuck} could not be moved (left in {self.spool.processing})"
                    if stuck else "")

    # -- status and stop ----------------------------------------------------------------------
    def _write_status(self) -> None:
        try:
            self.status.write(self.status_path)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.status_path, exc)

    def _write_state(self, state: str) -> None:
        self.status.state = state
        self.status.queue_depth = self._depth()
        self.metrics.state(state)
        self._write_status()

    def _shutdown(self) -> None:
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
            except Exception:
                log.exception("could not commit the batch in hand; it is redone at the next start")
            for batch, futures in self.decoding:
                for f in futures:
                    f.cancel()
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            while self.decoding:       # claimed, not yet on the model: back to the inbox
                self.spool.unclaim(self.decoding.popleft()[0])
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
