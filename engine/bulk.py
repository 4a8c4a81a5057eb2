"""One-shot bulk runs: stream any number of files through the classifier, pipelined.

    summary = run_bulk(["photos/"], out_dir=Path("results"), settings=settings, recursive=True)
    summary.counts      # {'cat': 120, 'dog': 97, 'uncertain': 3}
    summary.errors      # 2
    run_bulk(["photos/"], out_dir=Path("results"), settings=settings, resume=True).skipped  # 222

Files are listed lazily (one folder's names at a time, never the images) and streamed through
the one pipeline (:mod:`engine.pipeline`: decoding ahead on a thread pool, a batch at a time on
the model, pictures written while the next batch runs). Rows reach ``predictions.csv`` in input
order, one durable append per batch. Memory is bounded by ``batch_size x (prefetch + 2)`` images.
With ``resume`` the inputs that already have an ``ok`` row for their current content are skipped
(:mod:`engine.resume`), so an interrupted run picks up where it stopped.
"""
from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from engine.classifier import Classifier, Job
from engine.config import Settings
from engine.errors import StorageError, describe_os_error, is_storage_fault
from engine.pipeline import Pipeline
from engine.resume import DoneIndex
from engine.results import Result, ResultsCsv
from engine.text import new_run_id, printable

log = logging.getLogger(__name__)

CSV_NAME = "predictions.csv"


# -- listing ------------------------------------------------------------------------------------
def iter_inputs(paths: Iterable[str | Path], recursive: bool = False,
                skip_dirs: Iterable[Path] = ()) -> Iterator[tuple[Path, bool]]:
    """Yield ``(path, follow_symlinks)`` for every input file, lazily, in a stable order.

    Files named on the command line are taken as given (a symlink named there is followed).
    Inside folders, hidden entries are skipped, entries are sorted per folder, symlinks are
    yielded unfollowed (so they become error rows), and subfolders are entered only with
    ``recursive`` (never through a symlink), except ``skip_dirs`` (the run's own output folder,
    so its pictures are never fed back in). A missing path is yielded too: it gets an error row.
    """
    skip = {_identity(Path(d)) for d in skip_dirs} - {None}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from _walk(path, recursive, skip)
        else:
            yield path, True


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(top: Path, recursive: bool, skip: set) -> Iterator[tuple[Path, bool]]:
    """Depth-first, sorted per folder, with an explicit stack (any depth, no recursion limit)."""
    stack: list[Iterator[str]] = []
    folders: list[Path] = []

    def enter(folder: Path) -> tuple[Path, bool] | None:
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it if not e.name.startswith("."))
        except OSError as exc:
            log.error("cannot list %s: %s", printable(str(folder)), exc.strerror or exc)
            return folder, False  # becomes an error row
        stack.append(iter(names))
        folders.append(folder)
        return None

    if (failed := enter(top)) is not None:
        yield failed
    while stack:
        name = next(stack[-1], None)
        if name is None:
            stack.pop()
            folders.pop()
            continue
        path = folders[-1] / name
        try:
            st = os.lstat(path)
        except OSError:
            yield path, False  # vanished: becomes an error row
            continue
        if stat.S_ISDIR(st.st_mode):
            if recursive and (st.st_dev, st.st_ino) not in skip:
                if (failed := enter(path)) is not None:
                    yield failed
        else:
            yield path, False


def make_jobs(inputs: Iterable[tuple[Path, bool]], run_id: str) -> Iterator[Job]:
    for seq, (path, follow) in enumerate(inputs, start=1):
        yield Job(source=path, input_path=str(path), job_id=f"{run_id}-{seq:06d}",
                  follow_symlinks=follow)


# -- progress -----------------------------------------------------------------------------------
class Progress:
    """A progress bar with rate and ETA on a terminal; a log line every ``every_s`` otherwise."""

    def __init__(self, total: Callable[[], int | None], stream=None, every_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = total
        self.every_s = every_s
        self.start = time.monotonic()
        self.last = 0.0
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.tty and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        total = self.total()
        if self.tty:
            if total:
                frac = min(1.0, self.done / total)
                eta = (total - self.done) / rate if rate > 0 else 0
                bar = "#" * int(frac * 30)
                line = (f"\r[{bar:<30}] {self.done}/{total} {rate:5.1f} img/s "
                        f"ETA {int(eta) // 60}:{int(eta) % 60:02d} ")
            else:
                line = f"\r{self.done} files {rate:5.1f} img/s "
            self.stream.write(line)
            self.stream.flush()
        else:
            log.info("processed %d%s files (%.1f img/s)", self.done,
                     f"/{total}" if total else "", rate)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- the run ------------------------------------------------------------------------------------
@dataclass
class Summary:
    csv_path: Path
    total: int = 0
    errors: int = 0
    counts: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    #: inputs left out because they already had an ok row (``--resume``)
    skipped: int = 0

    @property
    def rate(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0

    def count(self, results: Sequence[Result], progress: "Progress | None" = None) -> None:
        """Count rows just appended (labels, errors logged one line each), advance progress."""
        for r in results:
            self.total += 1
            if r.ok:
                self.counts[r.label] += 1
            else:
                self.errors += 1
                log.warning("%s: %s", printable(r.input_path), r.error)
        if progress:
            progress.update(len(results))

    def lines(self) -> list[str]:
        labels = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "none"
        done = [f"skipped {self.skipped} already done (resumed)"] if self.skipped else []
        return [f"{self.total} file(s) in {self.seconds:.1f} s ({self.rate:.1f} img/s)",
                f"labels: {labels}; errors: {self.errors}", *done,
                f"results: {self.csv_path}"]


def _batched(items: Iterable[Job], n: int) -> Iterator[list[Job]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def run_jobs(classifier: Classifier, jobs: Iterable[Job], out_dir: Path, csv_name: str = CSV_NAME,
             progress: Progress | None = None) -> Summary:
    """Run ``jobs`` through the pipeline; append rows to ``out_dir/csv_name``.

    The output storage failing (disk full, read-only, ...) stops the run with a
    :class:`StorageError` that says how many rows are safely in the CSV (a failed append is
    rolled back, so the CSV stays whole)."""
    out_dir = Path(out_dir)
    summary = Summary(csv_path=out_dir / csv_name)
    try:
        return _run_jobs(classifier, jobs, out_dir, summary, progress)
    except OSError as exc:
        if not is_storage_fault(exc):
            raise
        raise StorageError(
            f"cannot write to {printable(str(out_dir))}: {describe_os_error(exc)}; "
            f"{summary.total} row(s) are safely in {printable(str(summary.csv_path))}; free "
            "space (or fix the folder) and run again", str(out_dir), summary.total) from exc


def _run_jobs(classifier: Classifier, jobs: Iterable[Job], out_dir: Path, summary: Summary,
              progress: Progress | None) -> Summary:
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ResultsCsv(summary.csv_path, classifier.meta.class_names)
    batch_size = classifier.batch_size
    start = time.monotonic()

    def record(results: Sequence[Result]) -> None:
        writer.append(results)
        summary.count(results, progress)

    with Pipeline(classifier, out_dir) as pipe:
        for _, results in pipe.run(_batched(jobs, batch_size)):
            record(results)
    # Ctrl-C or a failure leaves the pipeline dropping its queued decodes and pictures
    # instead of waiting for them; every row recorded so far is already durable in the CSV.
    summary.seconds = time.monotonic() - start
    return summary


def count_inputs_in_background(paths: Sequence[str | Path], recursive: bool,
                               skip_dirs: Sequence[Path] = ()) -> Callable[[], int | None]:
    """Count the inputs on a daemon thread (for the ETA); the getter returns None until done."""
    box: list[int] = []

    def count() -> None:
        box.append(sum(1 for _ in iter_inputs(paths, recursive, skip_dirs)))

    threading.Thread(target=count, name="pawcam-count", daemon=True).start()
    return lambda: box[0] if box else None


def list_pending(paths: Sequence[str | Path], out_dir: Path, class_names: Sequence[str], *,
                 recursive: bool, csv_name: str, resume: bool,
                 progress: Progress | None) -> tuple[Iterator[tuple[Path, bool]], list[int]]:
    """The inputs to classify, lazily, and a one-item list counting the ones skipped so far
    (inputs with an ok row for their current content, when ``resume``)."""
    inputs = iter_inputs(paths, recursive, [Path(out_dir)])
    skipped = [0]
    if not resume:
        return inputs, skipped
    done = DoneIndex.load(Path(out_dir) / csv_name, class_names)
    log.info("resume: %d input(s) already done in %s", len(done), Path(out_dir) / csv_name)

    def on_skip(path: Path) -> None:
        skipped[0] += 1
        if progress:
            progress.update(1)
    return done.pending(inputs, on_skip), skipped


def run_bulk(paths: Sequence[str | Path], out_dir: Path, settings: Settings, *,
             recursive: bool = False, csv_name: str = CSV_NAME, show_progress: bool = True,
             classifier: Classifier | None = None, resume: bool = False) -> Summary:
    """Classify every file under ``paths`` into ``out_dir`` (CSV + pictures); with ``resume``
    skip the inputs already classified there (same path, same content)."""
    classifier = classifier or Classifier.from_settings(settings)
    run_id = new_run_id()
    log.info("run %s: writing to %s", run_id, out_dir)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if not is_storage_fault(exc):
            raise
        raise StorageError(f"cannot create the output folder {printable(str(out_dir))}: "
                           f"{describe_os_error(exc)}", str(out_dir)) from exc
    progress = (Progress(count_inputs_in_background(paths, recursive, [Path(out_dir)]))
                if show_progress else None)
    try:
        inputs, skipped = list_pending(paths, out_dir, classifier.meta.class_names,
                                       recursive=recursive, csv_name=csv_name, resume=resume,
                                       progress=progress)
        summary = run_jobs(classifier, make_jobs(inputs, run_id), out_dir, csv_name, progress)
        summary.skipped = skipped[0]
        return summary
    finally:
        if progress:
            progress.close()

