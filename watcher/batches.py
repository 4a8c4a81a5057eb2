"""Batching and the model pass: ready files -> claimed batches -> the engine's Pipeline ->
committed rows and finalized files, with the counts and log lines of each batch.

    batches = Batches(spool, Pipeline(clf, outbox, durable=True), csv, outbox, run_id, metrics)
    batches.fill(intake, claiming=lambda: True, space_ok=lambda: True, now=time.monotonic())
    if batches.pipe.waiting:
        batches.run_model()
    for batch, results, outcome, started in batches.flush(keep=0):    # commit + finish
        report(status, metrics, spool, batch, results, outcome, started, batches.depth(intake))

Up to ``PIPELINE_DEPTH`` claimed batches are decoded ahead while the model runs, and the
pictures of one batch are written while the next runs on the model, so a burst flows at the
speed of a bulk run. Natural batching (:meth:`Batches.due`): when the model is free (no claimed
batch waiting for it), whatever is ready goes at once, so a lone file is classified as soon as
it is complete; while the model is busy the next batch gathers until it is full or
``max_wait_ms`` passed. Each step of the exactly-once protocol is a call to watcher.spool.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

from engine.classifier import PICTURES_DIR, Job, format_confidence
from engine.pipeline import Pipeline
from engine.results import Result, ResultsCsv
from engine.text import new_run_id, printable, shown, utc_now
from watcher.intake import Intake
from watcher.metrics import NullMetrics
from watcher.spool import ClaimedBatch, Outcome, Spool
from watcher.status import Status

log = logging.getLogger("pawcam.watch")

PIPELINE_DEPTH = 3          # claimed batches in flight before the model (as bulk's prefetch)


def run_id() -> str:
    """A new id for one daemon run: job ids are ``<run id>-000001`` ..."""
    return new_run_id("w", 3)


class Batches:
    """Claimed batches on their way: ``pending`` (recovered, rolled back or waiting for a fault
    to pass: first in line), in the pipeline (decode -> model -> pictures), committed and
    finalized. A commit that failed leaves its batch in ``uncommitted`` for :meth:`roll_back`.
    """

    def __init__(self, spool: Spool, pipe: Pipeline, csv: ResultsCsv, outbox: Path,
                 run: str, metrics: NullMetrics | None = None) -> None:
        self.spool, self.pipe, self.csv, self.outbox = spool, pipe, csv, outbox
        self.run_id = run
        self.metrics = metrics or NullMetrics()
        self.pending: deque[ClaimedBatch] = deque()
        self.uncommitted: ClaimedBatch | None = None
        self._started: dict[str, float] = {}     # batch id -> when it went to the model
        self._seq = 0
        self._count = 0

    def new_job_id(self) -> str:
        self._seq += 1
        return f"{self.run_id}-{self._seq:06d}"

    # -- what goes next -----------------------------------------------------------------------
    def due(self, intake: Intake, now: float) -> bool:
        """Natural batching: with the model free (no claimed batch waiting for it), whatever is
        ready goes now; while it is busy, a batch goes when full or ``max_wait_ms`` after its
        first file was ready."""
        return bool(intake.tracker.ready) and (not self.pipe.waiting
                                               or intake.tracker.batch_due(now))

    def more_work(self, intake: Intake, claiming: bool, now: float) -> bool:
        """Another batch will go to the model right away (so keep one batch's pictures
        writing in the background instead of waiting for them)."""
        return bool(self.pipe.waiting
                    or (claiming and (self.pending or self.due(intake, now))))

    def fill(self, intake: Intake, claiming: Callable[[], bool], space_ok: Callable[[], bool],
             now: float) -> None:
        """Submit batches until PIPELINE_DEPTH wait for the model: ``pending`` ones first, then
        new claims of what the intake has ready (``space_ok`` asked before each claim)."""
        while self.pipe.waiting < PIPELINE_DEPTH and claiming():
            if self.pending:
                batch = self.pending.popleft()
            elif self.due(intake, now):
                if not space_ok():
                    return
                batch = self._claim(intake, now)
                if batch is None:
                    continue
            else:
                return
            self.pipe.submit([Job(i.path, i.input_path, i.job_id) for i in batch.items], tag=batch)

    def _claim(self, intake: Intake, now: float) -> ClaimedBatch | None:
        entries = [(self.new_job_id(), rel, ready_at) for rel, ready_at in intake.take(now)]
        if not entries:
            return None
        self._count += 1
        try:
            batch = self.spool.claim(f"{self.run_id}-b{self._count:06d}", entries)
        except OSError as exc:
            # the manifest could not be written: nothing was claimed, the files are still in
            # the inbox; a rescan finds them again once the fault is gone
            intake.rescan_soon()
            raise placed(exc, self.spool.processing)
        claimed = {item.input_path for item in batch.items}
        intake.hold([rel for _, rel, _ in entries if rel not in claimed])  # do not spin on them
        return batch if batch.items else None

    # -- the model, the commit, the finish ----------------------------------------------------
    def run_model(self) -> None:
        """The oldest claimed batch through the model (its pictures start on the pool)."""
        self.pipe.advance()
        batch, started, seconds, images = self.pipe.last_call
        self._started[batch.batch_id] = started
        self.metrics.inference(seconds, images)

    def flush(self, keep: int
              ) -> Iterator[tuple[ClaimedBatch, list[Result], Outcome, float | None]]:
        """Commit finished batches (all but ``keep``), then finalize their files; yields each
        with what :meth:`Spool.finish` did and when it went to the model. Stops after a batch
        whose files a storage fault kept in the processing area (the caller rolls back).

        A storage fault while writing pictures leaves the batch in the pipeline; one while
        committing leaves it in ``uncommitted``: either way :meth:`roll_back` puts it first
        in line (OSError raised, naming the folder or file)."""
        finished = self.pipe.completed(keep)
        while True:
            try:
                item = next(finished, None)
            except OSError as exc:          # the outbox's trouble: degraded, redo later
                raise placed(exc, self.outbox / PICTURES_DIR)
            if item is None:
                return
            batch, results = item
            try:
                self.spool.commit(self.csv, results, self.outbox)
            except OSError as exc:
                self.uncommitted = batch
                raise placed(exc, self.csv.path)
            done = self.spool.finish(batch, results)
            self.pending.extend(done.waiting)   # committed: when settled, only moved on
            yield batch, results, done, self._started.pop(batch.batch_id, None)
            if done.fault is not None:
                return

    def roll_back(self) -> None:
        """Batches on their way (decoding, on the model, pictures being written) go back to
        ``pending``, first in line; their rows were not committed, so they are classified
        again under the same job ids once the fault is gone (a rolled-back CSV append left
        nothing behind; :meth:`settle` checks the CSV anyway)."""
        back = [self.uncommitted] if self.uncommitted is not None else []
        back += self.pipe.abandon()
        self.uncommitted = None
        for batch in back:
            self._started.pop(batch.batch_id, None)
        self.pending.extendleft(reversed(back))

    def settle(self, batches: list[ClaimedBatch]) -> Outcome:
        """:meth:`Spool.settle` (committed: finalize only; else: classify again, same job id);
        what is to classify again or waits for a fault goes to ``pending``; a storage fault
        that kept committed files waiting is raised."""
        settled = self.spool.settle(batches, self.csv)
        self._queue(settled)
        return settled

    def recover(self) -> Outcome:
        """Start-up: what a crash left in the processing area (:meth:`Spool.recover`)."""
        settled = self.spool.recover(self.new_job_id, self.csv)
        self._queue(settled)
        return settled

    def _queue(self, settled: Outcome) -> None:
        self.pending.extend(settled.redo)
        self.pending.extend(settled.waiting)
        if settled.fault is not None:
            raise settled.fault

    def resettle(self) -> None:
        """Resuming from a fault: every pending batch is settled again (some were committed)."""
        waiting = list(self.pending)
        self.pending.clear()
        self.settle(waiting)

    def close(self) -> None:
        """Shutdown: drop what is in flight (a batch whose commit failed stays claimed for the
        next start); claimed batches not yet on the model go back to the inbox."""
        never_ran = self.pipe.waiting_tags()
        self.pipe.abandon()
        self.pipe.close(cancel=True)
        for batch in never_ran:
            self.spool.unclaim(batch)

    def depth(self, intake: Intake | None = None) -> int:
        """Files seen and not yet committed: in the intake, in flight and pending."""
        inflight = sum(len(b.items) for b in self.pipe.tags())
        return ((intake.depth if intake is not None else 0) + inflight
                + sum(len(b.items) for b in self.pending))

    @property
    def pending_files(self) -> int:
        return sum(len(b.items) for b in self.pending)


def report(status: Status, metrics: NullMetrics, spool: Spool, batch: ClaimedBatch,
           results: list[Result], done: Outcome, started: float | None, depth: int) -> None:
    """One line per file (where it went), the counts in ``status``, and for a batch that went
    through the model (``started``) its timing, metrics and summary line."""
    ok = failed = 0
    for item, r, where in zip(batch.items, results, done.where):
        where = spool.shown_place(where)
        if r.ok:
            ok += 1
            log.info("done %s: %s %s -> %s [%s]", shown(item.input_path), r.label,
                     format_confidence(r.confidence or 0.0), where, item.job_id)
        else:
            failed += 1
            log.warning("failed %s: %s -> %s [%s]", shown(item.input_path), printable(r.error),
                        where, item.job_id)
    s = status
    s.processed += ok + failed
    s.ok += ok
    s.failed += failed
    if batch.recovered:
        s.recovered += ok + failed
    if started is None:
        return
    seconds = time.monotonic() - started
    s.batches += 1
    s.last_batch_size = ok + failed
    s.last_batch_seconds = round(seconds, 3)
    s.last_batch_at = utc_now()
    s.queue_depth = depth
    metrics.batch(results, [i.ready_at for i in batch.items], seconds, depth)
    s.latency_p50_s, s.latency_p95_s = metrics.latency_summary()
    log.info("batch of %d: %d ok, %d failed in %.2f s (%.1f files/s); queue %d%s",
             ok + failed, ok, failed, seconds, (ok + failed) / max(seconds, 1e-9), depth,
             " (recovered)" if batch.recovered else "")


def placed(exc: OSError, where: Path) -> OSError:
    """``exc`` naming ``where`` when it names no file (a failed ``write()`` does not)."""
    if exc.filename is None:
        exc.filename = str(where)
    return exc
