"""On-disk caches of fixed-shape records, so training memory does not grow with the data.

    with RecordWriter(run / "cache.partial" / "images.u8", (224, 224, 3), np.uint8) as w:
        w.append(batch)                         # (n, 224, 224, 3) uint8, written at once
    reader = RecordReader(path, (224, 224, 3), np.uint8)
    reader.read(np.array([5, 1, 9]))            # (3, 224, 224, 3), read with pread
    ds = stream([(reader, idx)], targets, batch_size=32, seed=1)   # tf.data, new order per epoch

A record file is raw bytes, record after record: no header, no memory map. Records are read
with ``os.preadv`` straight into a fresh numpy batch, so the only memory a pass over a file of
any size costs is one batch (a memory map would count every page it touched towards the
process's RSS until the kernel reclaims it). Writes are ordinary ``write`` calls: a full disk
is an ``OSError`` (ENOSPC) that :class:`CacheWriteError` turns into a message saying where and
how much, never a SIGBUS from a mapped page.

A cache folder is built as ``<name>.partial/`` and renamed to ``<name>/`` only after every file
in it is written, fsynced and described by ``index.json`` (which holds a key: what the cache was
built from). :func:`open_complete` returns a cache only when that rename happened and the key
matches, so an interrupted or failed build (disk full, Ctrl-C, crash) is never reused: the next
run deletes the partial folder and builds again.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from engine.errors import PawcamError

log = logging.getLogger(__name__)

INDEX = "index.json"
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CacheWriteError(PawcamError):
    """A training cache could not be written (disk full, quota, permissions)."""


def _write_error(path: Path, exc: OSError, written: int) -> CacheWriteError:
    if exc.errno in _SPACE_ERRNOS:
        return CacheWriteError(
            f"disk full while writing the training cache {path} ({written:,} bytes written; "
            f"{os.strerror(exc.errno)}). Free space there, or train with --run-dir on a file "
            "system with room (the cache needs about image_size^2 x 3 bytes per photo, plus "
            "the activations with fine_tune_cache); the partial cache is deleted and never "
            "reused")
    return CacheWriteError(f"cannot write the training cache {path}: {exc.strerror or exc}")


class RecordWriter:
    """Appends fixed-shape records to a raw file; ``close()`` fsyncs it."""

    def __init__(self, path: Path, shape: Sequence[int], dtype: Any) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._fh = self.path.open("wb")

    def append(self, records: np.ndarray) -> None:
        records = np.ascontiguousarray(records, dtype=self.dtype)
        if records.shape[1:] != self.shape:
            raise ValueError(f"record shape {records.shape[1:]} != {self.shape}")
        try:
            self._fh.write(memoryview(records).cast("B"))
        except OSError as exc:
            raise _write_error(self.path, exc, self.count * records[0].nbytes) from exc
        self.count += len(records)

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise _write_error(self.path, exc, self.count) from exc
        finally:
            try:
                self._fh.close()
            except OSError:
                pass

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            try:
                self._fh.close()
            except OSError:
                pass


class RecordReader:
    """Random access to the records of a file written by :class:`RecordWriter`."""

    def __init__(self, path: Path, shape: Sequence[int], dtype: Any) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.record_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        size = self.path.stat().st_size
        if size % self.record_bytes:
            raise CacheWriteError(f"{self.path}: size {size} is not a whole number of records "
                                  "(a damaged cache); delete it and run again")
        self.count = size // self.record_bytes
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def __len__(self) -> int:
        return self.count

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Records at ``indices`` (any order, repeats allowed) as one new array."""
        idx = np.asarray(indices, np.int64)
        out = np.empty((len(idx),) + self.shape, self.dtype)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.count):
            raise IndexError(f"record index out of range 0..{self.count - 1}")
        flat = out.reshape(len(idx), -1).view(np.uint8)
        rb = self.record_bytes
        k = 0
        while k < len(idx):  # runs of consecutive indices are read with one call
            j = k + 1
            while j < len(idx) and idx[j] == idx[j - 1] + 1:
                j += 1
            buf = memoryview(flat[k:j]).cast("B")
            got = os.preadv(self._fd, [buf], int(idx[k]) * rb)
            if got != (j - k) * rb:
                raise CacheWriteError(f"{self.path}: short read (the cache changed under the "
                                      "run?); delete it and run again")
            k = j
        return out

    def range(self, start: int, stop: int) -> np.ndarray:
        return self.read(np.arange(start, min(stop, self.count)))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# -- cache folders ------------------------------------------------------------------------

def partial_dir(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


def start_build(folder: Path) -> Path:
    """Remove any old cache or partial build at ``folder``; return the empty partial folder."""
    for path in (folder, partial_dir(folder)):
        if path.exists():
            shutil.rmtree(path)
    tmp = partial_dir(folder)
    tmp.mkdir(parents=True)
    return tmp


def finish_build(folder: Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` into the partial folder, fsync it, rename it to ``folder``."""
    tmp = partial_dir(folder)
    path = tmp / INDEX
    try:
        with path.open("w", encoding="utf-8") as fh:
            json.dump(index, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder)
        dfd = os.open(folder.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise _write_error(path, exc, 0) from exc


def abandon_build(folder: Path) -> None:
    """Delete a failed build (never reused anyway; this just gives the space back)."""
    shutil.rmtree(partial_dir(folder), ignore_errors=True)


def open_complete(folder: Path, key: str) -> dict[str, Any] | None:
    """The index of a finished cache built from ``key``, else None (partial builds never count)."""
    path = folder / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if index.get("key") == key else None


def remove(folder: Path) -> None:
    for path in (folder, partial_dir(folder)):
        shutil.rmtree(path, ignore_errors=True)


# -- streaming ----------------------------------------------------------------------------

def batch_plan(sources: Sequence[tuple[Any, np.ndarray]], batch_size: int,
               rng: np.random.Generator | None, pick_one: bool = False
               ) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
    """One epoch of batches: each batch is ``[(source, record indices, positions), ...]``.

    Positions index the concatenated targets. ``pick_one``: the sources are views of the same
    items (e.g. original and flipped), so each item is taken once, from a random source.
    ``rng=None`` keeps the order (evaluation).
    """
    if pick_one:
        n = len(sources[0][1])
        order = rng.permutation(n) if rng is not None else np.arange(n)
        which = (rng.integers(len(sources), size=n) if rng is not None
                 else np.zeros(n, np.int64))
        for s in range(0, n, batch_size):
            pos = order[s:s + batch_size]
            yield [(k, sources[k][1][pos[which[pos] == k]], pos[which[pos] == k])
                   for k in range(len(sources))]
        return
    offsets = np.cumsum([0] + [len(idx) for _, idx in sources])
    total = int(offsets[-1])
    order = rng.permutation(total) if rng is not None else np.arange(total)
    for s in range(0, total, batch_size):
        pos = order[s:s + batch_size]
        src = np.searchsorted(offsets, pos, side="right") - 1
        yield [(k, sources[k][1][pos[src == k] - offsets[k]], pos[src == k])
               for k in range(len(sources))]


def read_batch(sources: Sequence[tuple[RecordReader, np.ndarray]],
               plan: list[tuple[int, np.ndarray, np.ndarray]], targets: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray]:
    parts, ys = [], []
    for k, rec, pos in plan:
        if len(rec):
            order = np.argsort(rec, kind="stable")  # sorted reads: fewer, longer preads
            parts.append(sources[k][0].read(rec[order]))
            ys.append(targets[pos[order]])
    return np.concatenate(parts), np.concatenate(ys)


def steps(sources: Sequence[tuple[Any, np.ndarray]], batch_size: int, pick_one: bool = False
          ) -> int:
    n = len(sources[0][1]) if pick_one else sum(len(idx) for _, idx in sources)
    return max(1, -(-n // batch_size))


def stream(sources: Sequence[tuple[RecordReader, np.ndarray]], targets: np.ndarray,
           batch_size: int, seed: int | None, pick_one: bool = False, repeat: bool = True):
    """tf.data of ``(records, targets)`` batches read from disk, one batch in memory at a time.

    ``targets`` is aligned with the concatenation of the sources' indices (with ``pick_one``,
    with the shared item list). ``seed``: a new seeded order every epoch (``repeat`` makes the
    dataset endless: give ``fit`` ``steps_per_epoch=steps(...)``); None keeps the order.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed) if seed is not None else None
    first = sources[0][0]

    def batches():
        for plan in batch_plan(sources, batch_size, rng, pick_one):
            yield read_batch(sources, plan, targets)

    spec = (tf.TensorSpec((None,) + first.shape, tf.as_dtype(first.dtype)),
            tf.TensorSpec((None,) + targets.shape[1:], tf.as_dtype(targets.dtype)))
    ds = tf.data.Dataset.from_generator(batches, output_signature=spec)
    return ds.repeat() if repeat else ds
