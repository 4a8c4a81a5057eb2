"""The classifier actor of a Ray run: one loaded model, one chunk of the work list per call.

    ds.map_batches(ClassifierActor, fn_constructor_args=(settings, out_dir, run_dir, run_id),
                   compute=ray.data.ActorPoolStrategy(size=4), batch_size=1)

Each call reads its chunk's lines from the list file (:mod:`engine.ray_work`) and runs them
through the one pipeline (:meth:`Classifier.process <engine.classifier.Classifier.process>`);
pictures go straight into ``out_dir/gradcam``, rows go back to the driver as JSON.

Crash counting: a chunk's attempt is marked in the run folder before it starts and unmarked
when it ends. A chunk whose marker is already there was being worked on by a worker that died:
it is redone one file at a time, alone in the actor, each file marked the same way, and a file
that killed a worker ``[cluster] max_crashes`` times becomes an ``error`` row. This module
never imports ray: Ray Data builds the actors from the class.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from engine.classifier import Classifier, Job
from engine.config import Settings
from engine.durable import write_atomic
from engine.ray_work import decode_line
from engine.results import Result
from engine.resume import file_sha256

log = logging.getLogger(__name__)


class ClassifierActor:
    """One loaded model; ``__call__`` classifies one chunk of the list file (a Ray Data batch)."""

    def __init__(self, settings: Settings, out_dir: str, run_dir: str, run_id: str) -> None:
        self.classifier = Classifier.from_settings(settings)
        self.turns = _Turns()
        self.out_dir = Path(out_dir)
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.max_crashes = settings.cluster.max_crashes

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        seqs: list[int] = []
        rows: list[str] = []
        for first, start, end in zip(batch["first"], batch["start"], batch["end"]):
            for result, seq in self._chunk(int(first), int(start), int(end)):
                seqs.append(seq)
                rows.append(json.dumps(dataclasses.asdict(result)))
        return {"seq": seqs, "row": rows}

    def _jobs(self, start: int, end: int) -> list[tuple[int, Job]]:
        with open(self.run_dir / "inputs.list", "rb") as fh:
            fh.seek(start)
            lines = fh.read(end - start).splitlines(keepends=True)
        out = []
        for line in lines:
            seq, follow, path = decode_line(line)
            out.append((seq, Job(source=Path(path), input_path=path,
                                 job_id=f"{self.run_id}-{seq:06d}", follow_symlinks=follow)))
        return out

    def _chunk(self, first: int, start: int, end: int) -> list[tuple[Result, int]]:
        jobs = self._jobs(start, end)
        marker = self.run_dir / f"chunk-{first}"
        crashed_before = _count(marker) > 0
        _set_count(marker, _count(marker) + 1)
        if not crashed_before:
            with self.turns.shared():
                results = self._process([j for _, j in jobs])
        else:  # an earlier try died inside this chunk: one file at a time, counting crashes,
            with self.turns.alone():  # alone in the actor, so a crash is blamed on the right file
                results = self._one_by_one(jobs)
        unlink_quietly(marker)
        return [(r, seq) for r, (seq, _) in zip(results, jobs)]

    def _one_by_one(self, jobs: list[tuple[int, Job]]) -> list[Result]:
        results = []
        for seq, job in jobs:
            tries = self.run_dir / f"file-{seq}"
            crashes = _count(tries)  # tries that never came back
            if crashes >= self.max_crashes:
                log.error("%s killed a worker %d times: error row", job.input_path, crashes)
                results.append(self.classifier.error_result(
                    job, f"processing this file killed a pawcam worker {crashes} times "
                         "(decoder crash or out of memory?); not tried again in this run",
                    sha256=file_sha256(job.source, job.follow_symlinks) or ""))
                continue
            _set_count(tries, crashes + 1)
            results.extend(self._process([job]))
            unlink_quietly(tries)
        return results

    def _process(self, jobs: list[Job]) -> list[Result]:
        try:
            return self.classifier.process(jobs, self.out_dir)
        except Exception as exc:  # never fail the whole dataset: every input gets its row
            log.exception("worker failure on a batch of %d", len(jobs))
            return [self.classifier.error_result(j, f"worker failure ({type(exc).__name__}: "
                                                    f"{exc})") for j in jobs]


class _Turns:
    """Calls share the actor, except a call under suspicion, which runs alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone)
            self._alone = True  # no new shared call starts from here
            self._cond.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


def _count(path: Path) -> int:
    """The number recorded in a marker file (0 when there is none)."""
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _set_count(path: Path, count: int) -> None:
    """Record ``count`` atomically; no fsync: it must survive a killed worker, not a power cut."""
    write_atomic(path, str(count).encode("ascii"), durable=False)


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
