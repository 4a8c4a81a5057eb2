"""Bulk runs on a Ray cluster: the same rows and pictures as a local run, computed by actors.

    summary = run_bulk_ray(["photos/"], Path("results"), settings, address="auto")

The driver (this process) lists the inputs lazily (skipping done ones with ``resume``) into a
hidden list file in the output folder, then builds a Ray Data dataset of *chunks* of that list
(a few numbers each, so the driver never holds the inputs: :mod:`engine.ray_work`). A pool of
classifier actors (:mod:`engine.ray_actor`), each holding one
:class:`~engine.classifier.Classifier` (the runtime ``[inference]`` picks on its node: ONNX
Runtime on CPU nodes, TensorFlow with a GPU), reads its chunk's lines and runs them through
the one pipeline (:meth:`Classifier.process <engine.classifier.Classifier.process>`:
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

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from engine.bulk import CSV_NAME, Progress, Summary, count_inputs_in_background, list_pending
from engine.classifier import PICTURES_DIR
from engine.config import Settings, replace
from engine.durable import is_temp
from engine.errors import ConfigError, PawcamError
from engine.modelio import read_meta
from engine.ray_actor import ClassifierActor, unlink_quietly
from engine.ray_work import chunks, write_list
from engine.results import Result, ResultsCsv
from engine.text import new_run_id

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
    """Remove the temp files of pictures a killed worker was writing (``.NAME.PID-RANDOM.tmp``,
    see :func:`engine.durable.temp_name`; NAME holds the job id, hence the run id)."""
    try:
        with os.scandir(folder) as it:
            stale = [e.path for e in it if is_temp(e.name) and f".{run_id}-" in e.name]
    except OSError:
        return
    for path in stale:
        unlink_quietly(Path(path))
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
