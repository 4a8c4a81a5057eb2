"""Bulk runs on a Ray cluster: the same rows and pictures as a local run, computed by actors.

    summary = run_bulk_ray(["photos/"], Path("results"), settings, address="auto")

The driver (this process) lists the inputs lazily (skipping done ones with ``resume``) into a
hidden list file in the output folder, then builds a Ray Data dataset of *chunks* of that list
(a few numbers each, so the driver never holds the inputs). A pool of classifier actors, each
holding one :class:`~engine.classifier.Classifier` (the runtime ``[inference]`` picks on its
node: ONNX Runtime on CPU nodes, TensorFlow with a GPU), reads its chunk's lines and runs them
through the one pipeline (:meth:`Classifier.process <engine.classifier.Classifier.process>`:
decoding on threads, the model, pictures) -- pictures go straight into ``out_dir/gradcam``.
Rows stream back to the driver, which appends them with :class:`~engine.results.ResultsCsv`.

Multi-node runs need the inputs, the output folder and the model at the same paths on every
node (a shared file system) and pawcam installed in the workers' Python.

Faults: Ray restarts a killed actor and retries its call. Each chunk's attempt is marked in the
run folder; a chunk retried after a crash is redone one file at a time, and a file that killed a
worker ``[cluster] max_crashes`` times becomes an ``error`` row. Job ids (hence picture names)
are fixed per input before the run starts, so a retry rewrites the same pictures, and the driver
keeps one row per input (a bitmap of job numbers) whatever Ray re-executes.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from engine.bulk import CSV_NAME, Progress, Summary, count_inputs_in_background, list_pending
from engine.bulk import new_run_id
from engine.classifier import PICTURES_DIR, Classifier, Job
from engine.config import Settings, replace
from engine.errors import ConfigError, PawcamError
from engine.modelio import read_meta
from engine.results import Result, ResultsCsv
from engine.resume import file_sha256

log = logging.getLogger(__name__)

INSTALL_HINT = ('Ray is not installed; install the extra: pip install -e ".[ray]" (or `make '
                'setup`), or run without --ray')
#: the driver appends to the CSV once this many rows are waiting, or this long after the last
APPEND_ROWS = 1024
APPEND_SECONDS = 1.0
_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.\-]+:\d+)$")


def import_ray():
    """``ray`` (with Ray Data), or a :class:`PawcamError` saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise PawcamError(f"{INSTALL_HINT} ({exc})") from exc
    return ray


def check_address(address: str) -> str:
    """``""`` (local), ``auto``, ``local``, ``ray://host:port`` or ``host:port``."""
    if address and not _ADDRESS.match(address):
        raise ConfigError(f"--ray {address!r} is not a Ray address (auto, ray://HOST:PORT or "
                          "HOST:PORT); to start a local Ray, put --ray after the paths or "
                          "write --ray=local")
    return address


# -- the list file: one input per line, read back by the actors ---------------------------------
def _encode(seq: int, path: Path, follow: bool) -> bytes:
    return b"%d\t%d\t%s\n" % (seq, int(follow), base64.b64encode(os.fsencode(path)))


def _decode_line(line: bytes) -> tuple[int, bool, str]:
    seq, follow, raw = line.rstrip(b"\n").split(b"\t")
    return int(seq), follow == b"1", os.fsdecode(base64.b64decode(raw))


def write_list(inputs: Iterable[tuple[Path, bool]], list_path: Path,
               step: int) -> tuple[int, list[int]]:
    """Write ``inputs`` to ``list_path``; return the count and the byte offset of every
    ``step``-th line (and of the end), for cutting the list into chunks afterwards."""
    offsets = [0]
    n = 0
    with open(list_path, "wb") as fh:
        for path, follow in inputs:
            n += 1
            fh.write(_encode(n, path, follow))
            if n % step == 0:
                offsets.append(fh.tell())
        if n % step:
            offsets.append(fh.tell())
    return n, offsets


def chunks(offsets: list[int], step: int, per_chunk: int) -> list[dict[str, int]]:
    """``{first, start, end}``: the first job number and byte range of each chunk of
    ``per_chunk`` lines (a multiple of ``step``), from :func:`write_list`'s offsets."""
    k = max(1, per_chunk // step)
    last = len(offsets) - 1
    return [{"first": i * step + 1, "start": offsets[i], "end": offsets[min(i + k, last)]}
            for i in range(0, last, k)]


# -- the actor ----------------------------------------------------------------------------------
class ClassifierActor:
    """One loaded model; ``__call__`` classifies one chunk of the list file (a Ray Data batch)."""

    def __init__(self, settings: Settings, out_dir: str, run_dir: str, run_id: str) -> None:
        self.classifier = Classifier(settings)
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
            seq, follow, path = _decode_line(line)
            out.append((seq, Job(source=Path(path), display_path=path,
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
        _unlink(marker)
        return [(r, seq) for r, (seq, _) in zip(results, jobs)]

    def _one_by_one(self, jobs: list[tuple[int, Job]]) -> list[Result]:
        results = []
        for seq, job in jobs:
            tries = self.run_dir / f"file-{seq}"
            crashes = _count(tries)  # tries that never came back
            if crashes >= self.max_crashes:
                log.error("%s killed a worker %d times: error row", job.display_path, crashes)
                results.append(self.classifier.error_result(
                    job, f"processing this file killed a pawcam worker {crashes} times "
                         "(decoder crash or out of memory?); not tried again in this run",
                    sha256=file_sha256(job.source, job.follow_symlinks) or ""))
                continue
            _set_count(tries, crashes + 1)
            results.extend(self._process([job]))
            _unlink(tries)
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
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(str(count))
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# -- the driver ---------------------------------------------------------------------------------
def _pool_size(ray, cluster) -> int:
    if cluster.actors:
        return cluster.actors
    res = ray.cluster_resources()
    if cluster.gpus_per_actor > 0:
        return max(1, int(res.get("GPU", 0) // cluster.gpus_per_actor))
    return max(1, int(res.get("CPU", 1) // cluster.cpus_per_actor))


def _actor_settings(settings: Settings) -> Settings:
    """Decode and model threads follow the actor's CPUs (not the node's cores) unless set."""
    inference = settings.inference
    threads = max(1, math.ceil(settings.cluster.cpus_per_actor))
    if inference.decode_threads == 0:
        inference = replace(inference, decode_threads=min(64, threads))
    if inference.model_threads == 0:
        inference = replace(inference, model_threads=min(256, threads))
    return replace(settings, inference=inference)


def _connect(ray, address: str) -> bool:
    """Join ``address`` (or start a local Ray); True when this call started the connection."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True,
                                  logging_level=logging.WARNING, configure_logging=False)
    try:
        ray.init(address=None if address in ("", "local") else address, **kwargs)
    except Exception as exc:
        raise PawcamError(f"cannot start or reach Ray at {address or 'a local instance'}: "
                          f"{exc}") from exc
    return True


def _remove_temp_pictures(folder: Path, run_id: str) -> None:
    """Remove the temp files of pictures a killed worker was writing (``.NAME.PID.tmp``)."""
    try:
        with os.scandir(folder) as it:
            stale = [e.path for e in it if e.name.startswith(".") and e.name.endswith(".tmp")
                     and f".{run_id}-" in e.name]
    except OSError:
        return
    for path in stale:
        _unlink(Path(path))
    if stale:
        log.info("removed %d picture temp file(s) left by killed workers", len(stale))


class _Seen:
    """Which job numbers already have a row: one bit each."""

    def __init__(self, n: int) -> None:
        self.bits = bytearray(n // 8 + 1)

    def add(self, seq: int) -> bool:
        byte, bit = divmod(seq, 8)
        if self.bits[byte] >> bit & 1:
            return False
        self.bits[byte] |= 1 << bit
        return True


def run_bulk_ray(paths: Sequence[str | Path], out_dir: Path, settings: Settings, *,
                 address: str | None = None, recursive: bool = False, csv_name: str = CSV_NAME,
                 show_progress: bool = True, resume: bool = False) -> Summary:
    """Classify every file under ``paths`` into ``out_dir`` on Ray (``address`` overrides
    ``[cluster] address``); the same CSV and pictures as :func:`engine.bulk.run_bulk`."""
    ray = import_ray()
    cluster = settings.cluster
    address = check_address(cluster.address if address is None else address)
    meta = read_meta(settings.model.path)  # a missing model stops here, not in every actor
    given_out, out_dir = out_dir, Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ResultsCsv(out_dir / csv_name, meta.class_names)
    run_id = new_run_id()
    run_dir = out_dir / f".pawcam-ray-{run_id}"
    run_dir.mkdir()
    progress = (Progress(count_inputs_in_background(paths, recursive, [out_dir]))
                if show_progress else None)
    started = False
    try:
        inputs, skipped = list_pending(paths, out_dir, meta.class_names, recursive=recursive,
                                       csv_name=csv_name, resume=resume, progress=progress)
        step = settings.inference.batch_size
        total, offsets = write_list(inputs, run_dir / "inputs.list", step)
        summary = Summary(csv_path=Path(given_out) / csv_name, skipped=skipped[0])
        log.info("run %s: %d input(s) to classify on Ray, %d skipped", run_id, total,
                 summary.skipped)
        start = time.monotonic()
        if total:
            started = _connect(ray, address)
            _run(ray, offsets, total, settings, out_dir, run_dir, run_id, writer, summary,
                 progress)
        summary.seconds = time.monotonic() - start
        return summary
    finally:
        if progress:
            progress.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        _remove_temp_pictures(out_dir / PICTURES_DIR, run_id)
        if started:
            ray.shutdown()


def _run(ray, offsets: list[int], total: int, settings: Settings,
         out_dir: Path, run_dir: Path, run_id: str, writer: ResultsCsv, summary: Summary,
         progress: Progress | None) -> None:
    import ray.data

    cluster = settings.cluster
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's own notices are not for pawcam users
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # pawcam's own bar counts the rows in the CSV
    actors = _pool_size(ray, cluster)
    step = settings.inference.batch_size
    # Calls of `inputs_per_call`, but small enough that every actor gets work on a short run.
    per_call = min(cluster.inputs_per_call(step), max(step, math.ceil(total / actors)))
    items = chunks(offsets, step, per_call)
    actors = min(actors, len(items))  # no model loaded for an actor that would get no work
    log.info("Ray: %d classifier actor(s), %g CPU / %g GPU each, %d call(s) of up to %d "
             "input(s)", actors, cluster.cpus_per_actor, cluster.gpus_per_actor, len(items),
             per_call)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ClassifierActor, batch_size=1,
        compute=ray.data.ActorPoolStrategy(
            size=actors, max_concurrent_calls_per_actor=cluster.calls_per_actor,
            enable_true_multi_threading=cluster.calls_per_actor > 1),
        num_cpus=cluster.cpus_per_actor, num_gpus=cluster.gpus_per_actor or None,
        fn_constructor_args=(_actor_settings(settings), str(out_dir), str(run_dir), run_id))
    seen = _Seen(total)
    pending: list[Result] = []
    last_append = time.monotonic()

    def append() -> None:
        nonlocal last_append
        writer.append(pending)
        summary.count(pending, progress)
        pending.clear()
        last_append = time.monotonic()

    try:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                pending.extend(Result(**json.loads(row))
                               for seq, row in zip(batch["seq"], batch["row"])
                               if seen.add(int(seq)))
                # Many small calls from many actors: one durable append per APPEND_ROWS rows
                # or per APPEND_SECONDS keeps the driver's fsyncs from capping the cluster.
                if len(pending) >= APPEND_ROWS or time.monotonic() - last_append >= APPEND_SECONDS:
                    append()
        finally:
            if pending:  # rows already computed are kept, also on Ctrl-C or a failure
                append()
    except (KeyboardInterrupt, PawcamError):
        raise
    except Exception as exc:
        raise PawcamError(f"the Ray run failed: {type(exc).__name__}: {exc}; rows written so "
                          "far are kept, rerun with --resume to finish") from exc
