"""The one pipeline every path uses: decode -> infer -> finish, overlapped, in order.

    pipe = Pipeline(classifier, out_dir=Path("results"))
    for tag, results in pipe.run(batches):        # batches: Iterable[list[Job]]
        writer.append(results)                    # rows in input order, a batch at a time

Decoding runs on a thread pool up to ``prefetch`` batches ahead of the model; each batch's
``finish`` step (by default: the three pictures and the row) runs on the same pool while the
next batch is on the model. Memory is bounded by ``batch x (prefetch + 2)`` images.

The callers differ only in what they add around it:

- the bulk runner appends each batch's rows to the CSV (:mod:`engine.bulk`);
- the daemon submits claimed batches and commits finished ones (push style: :meth:`submit`,
  :meth:`advance`, :meth:`completed`), see watcher/daemon.py;
- evaluation passes its own ``finish`` that collects probabilities (training/evaluate.py);
- :meth:`Classifier.process <engine.classifier.Classifier.process>` runs one list of jobs.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Generic, Hashable, Iterable, Iterator, Protocol, Sequence, TypeVar

import numpy as np

from engine.decode import DecodedImage
from engine.errors import ImageError, is_storage_fault

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2
R = TypeVar("R")
#: one input (an :class:`engine.classifier.Job`); the pipeline only hands it to the stages
Job = Any


class Stages(Protocol):
    """What the pipeline runs: :class:`engine.classifier.Classifier` is the implementation.

    Named here rather than imported, so that the pipeline sits below the classifier
    (whose ``process`` runs a Pipeline) and the two do not import each other.
    """

    #: threads that decode and finish (when the Pipeline is not given ``threads``)
    threads: int

    def try_decode(self, job: Job) -> DecodedImage | ImageError: ...

    def infer(self, images: Sequence[DecodedImage]) -> tuple[np.ndarray, np.ndarray | None]: ...

    def finish(self, job: Job, image: DecodedImage, probs: np.ndarray, cam: np.ndarray | None,
               out_dir: Path, durable: bool = False) -> Any: ...

    def error_result(self, job: Job, error: ImageError | str, sha256: str = "") -> Any: ...

#: (job, decoded image, probabilities (C,), Grad-CAM map or None) -> the caller's record
Finish = Callable[[Job, DecodedImage, np.ndarray, "np.ndarray | None"], R]
#: (job, the decode error) -> the caller's record for a file that could not be decoded
OnError = Callable[[Job, ImageError], R]


class _Batch:
    __slots__ = ("jobs", "tag", "decoding", "slots")

    def __init__(self, jobs: list[Job], tag: Any, decoding: list[Future]) -> None:
        self.jobs = jobs
        self.tag = tag
        self.decoding = decoding
        self.slots: list[Future | Any] = []

    def finished(self) -> bool:
        return all(s.done() for s in self.slots if isinstance(s, Future))

    def records(self) -> list[Any]:
        return [s.result() if isinstance(s, Future) else s for s in self.slots]


class Pipeline(Generic[R]):
    """Batches of jobs in, ``(tag, records)`` out, oldest first.

    ``finish`` defaults to :meth:`Classifier.finish` writing pictures into ``out_dir``
    (fsync'ed when ``durable``); ``on_error`` to :meth:`Classifier.error_result`.
    """

    def __init__(self, classifier: Stages, out_dir: Path | None = None, *,
                 finish: Finish | None = None, on_error: OnError | None = None,
                 prefetch: int = PREFETCH_BATCHES, durable: bool = False,
                 threads: int | None = None) -> None:
        #: may be swapped between batches (the daemon's reload): the steps read it each time
        self.classifier = classifier
        if finish is None:
            if out_dir is None:
                raise ValueError("Pipeline needs out_dir or a finish function")
            folder = Path(out_dir)

            def finish(job, image, probs, cam):  # type: ignore[no-redef]
                return self.classifier.finish(job, image, probs, cam, folder, durable)
        self.finish: Finish = finish
        self.on_error: OnError = on_error or (lambda job, exc: self.classifier.error_result(job, exc))
        self.prefetch = prefetch
        self.pool = ThreadPoolExecutor(threads or classifier.threads,
                                       thread_name_prefix="pawcam-io")
        self._decoding: deque[_Batch] = deque()
        self._finishing: deque[_Batch] = deque()
        #: the last model call: (tag, monotonic start incl. waiting for decodes, model seconds,
        #: images on the model) -- for the daemon's timings and metrics
        self.last_call: tuple[Any, float, float, int] | None = None

    # -- push style ---------------------------------------------------------------------
    def submit(self, jobs: list[Job], tag: Hashable = None) -> None:
        """Start decoding ``jobs`` (one model batch); ``tag`` comes back with its records."""
        self._decoding.append(_Batch(list(jobs), tag,
                                     [self.pool.submit(self._decode, j) for j in jobs]))

    @property
    def waiting(self) -> int:
        """Batches submitted that have not been through the model yet."""
        return len(self._decoding)

    @property
    def in_flight(self) -> int:
        """Batches submitted whose records have not been returned yet."""
        return len(self._decoding) + len(self._finishing)

    def tags(self) -> list[Any]:
        """Tags of the batches in flight, oldest first (finishing, then waiting)."""
        return [b.tag for b in (*self._finishing, *self._decoding)]

    def waiting_tags(self) -> list[Any]:
        """Tags of the batches that have not been on the model yet."""
        return [b.tag for b in self._decoding]

    def advance(self) -> bool:
        """Run the oldest waiting batch through the model (waits for its decoding).

        Its finish steps start on the pool; returns False when nothing was waiting.
        """
        if not self._decoding:
            return False
        started = time.monotonic()
        batch = self._decoding.popleft()
        decoded = [f.result() for f in batch.decoding]
        batch.decoding = []
        good = [d for d in decoded if isinstance(d, DecodedImage)]
        t_model = time.monotonic()
        try:
            probs, cams = self.classifier.infer(good) if good else (None, None)
        except Exception as exc:  # one bad batch must not end the run or the daemon
            log.exception("the model failed on a batch of %d", len(good))
            failure = ImageError(f"internal error while classifying ({type(exc).__name__}: "
                                 f"{exc})")
            decoded = [failure if isinstance(d, DecodedImage) else d for d in decoded]
        self.last_call = (batch.tag, started, time.monotonic() - t_model, len(good))
        k = 0
        for job, d in zip(batch.jobs, decoded):
            if isinstance(d, DecodedImage):
                cam = None if cams is None else cams[k]
                batch.slots.append(self.pool.submit(self._finish, job, d, probs[k], cam))
                k += 1
            else:
                batch.slots.append(self.on_error(job, d))
        self._finishing.append(batch)
        return True

    def completed(self, keep: int = 0, wait: bool = True) -> Iterator[tuple[Any, list[R]]]:
        """Finished batches, oldest first, while more than ``keep`` are finishing.

        With ``wait=False`` only batches whose finish steps are already done come out.
        """
        while len(self._finishing) > keep:
            batch = self._finishing[0]
            if not wait and not batch.finished():
                return
            records = batch.records()  # a storage fault raises here and the batch stays in flight
            self._finishing.popleft()
            yield batch.tag, records

    def abandon(self) -> list[Any]:
        """Drop every batch in flight (a storage fault: its rows must not be committed now).

        Waits for finish steps already running, cancels queued decodes; returns the batches'
        tags, oldest first, so that the caller can redo them later.
        """
        tags = []
        for batch in self._finishing:
            for slot in batch.slots:
                if isinstance(slot, Future):
                    try:
                        slot.result()
                    except Exception:  # noqa: BLE001 - the batch is redone anyway
                        pass
            tags.append(batch.tag)
        for batch in self._decoding:
            for f in batch.decoding:
                f.cancel()
            tags.append(batch.tag)
        self._finishing.clear()
        self._decoding.clear()
        return tags

    # -- pull style ---------------------------------------------------------------------
    def run(self, batches: Iterable[list[Job]]) -> Iterator[tuple[Any, list[R]]]:
        """Every batch of ``batches`` through the pipeline; yields ``(index, records)``."""
        for i, jobs in enumerate(batches):
            self.submit(jobs, i)
            if self.waiting > self.prefetch:
                self.advance()
                yield from self.completed(keep=1)
        while self.advance():
            yield from self.completed(keep=1)
        yield from self.completed(keep=0)

    def close(self, cancel: bool = False) -> None:
        """Stop the pool; ``cancel`` drops queued decodes and pictures (Ctrl-C, failures)."""
        self.pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> "Pipeline[R]":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)

    # -- the steps on the pool ----------------------------------------------------------
    def _decode(self, job: Job) -> DecodedImage | ImageError:
        return self.classifier.try_decode(job)

    def _finish(self, job: Job, image: DecodedImage, probs: np.ndarray,
                cam: np.ndarray | None) -> R:
        """The caller's finish step; a storage fault (the output's problem: disk full,
        read-only, ...) propagates, any other failure becomes this job's error record."""
        try:
            return self.finish(job, image, probs, cam)
        except OSError as exc:
            if is_storage_fault(exc):
                raise
            return self._internal_error(job, exc)
        except Exception as exc:  # noqa: BLE001 - one file must not end the run
            return self._internal_error(job, exc)

    def _internal_error(self, job: Job, exc: Exception) -> R:
        log.error("finishing %s failed", job.input_path, exc_info=exc)
        error = ImageError(f"internal error while writing results ({type(exc).__name__}: {exc})")
        error.sha256 = getattr(exc, "sha256", "")
        return self.on_error(job, error)
