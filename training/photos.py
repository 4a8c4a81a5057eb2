"""The decoded-image cache: every training photo decoded once, kept on disk, read by batch.

    images = decode_to_cache(data.files, data.stamps, run / "cache" / "images",
                             input_size=(224, 224), decode=settings.decode, threads=2)
    images.reader.read([0, 5])                            # (2, 224, 224, 3) uint8 from disk
    photos = split_photos(data, images, validation_fraction=0.1, seed=1337)
    photos.train_idx, photos.val_idx, photos.y_tr        # the seeded stratified split

Decoding and resizing go through :func:`engine.decode.load_model_input`, the exact code the
engine serves with, so training sees the pixels serving sees (no train/serve skew). Files that
fail (empty, truncated, not an image, too large) raise :class:`engine.errors.ImageError`; they
are skipped and listed with the engine's error code and message.

The decoded images go to a raw uint8 file in the run folder (:mod:`training.cache`), written
chunk by chunk and read back batch by batch, so every epoch reads the cache instead of
decoding JPEGs again and memory does not grow with the number of photos.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.config import DecodeSettings
from engine.decode import decode_limits, load_model_input
from engine.errors import ConfigError, ImageError
from training import cache
from training.dataset import Skipped, TrainingData, stratified_split

log = logging.getLogger(__name__)

#: bump when the cache file layout changes (old caches are then rebuilt)
CACHE_FORMAT = 1


def cache_key(files: Sequence[Path], stamps: Sequence[tuple[int, int]],
              input_size: tuple[int, int], decode: DecodeSettings) -> str:
    """What a decoded-image cache depends on: the files (path, size, mtime) and decoding."""
    h = hashlib.sha256()
    h.update(repr((CACHE_FORMAT, tuple(input_size), dataclasses.astuple(decode))).encode())
    for f, (size, mtime) in zip(files, stamps):
        h.update(f"{f}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@dataclass
class ImageCache:
    """Decoded uint8 model inputs on disk: ``reader.read(i)`` is the i-th *kept* image."""
    folder: Path
    reader: cache.RecordReader
    kept: np.ndarray              # positions in the scanned file list
    skipped: list[Skipped]
    reused: bool
    key: str


def decode_to_cache(files: Sequence[Path], stamps: Sequence[tuple[int, int]], folder: Path, *,
                    input_size: tuple[int, int], decode: DecodeSettings, threads: int = 2,
                    display: Sequence[str] | None = None, chunk: int = 256) -> ImageCache:
    """Decode every file once (the engine's decoder) into ``folder/images.u8``, chunk by chunk.

    Memory: one chunk of decoded images, whatever the number of files. A finished cache with
    the same key (same files, sizes, mtimes, input size, decode settings) is reused; anything
    else (no cache, a partial one, another key) is rebuilt from scratch. Symbolic links are
    followed: the files are the user's own training set (the daemon's inbox never follows).
    """
    h, w = input_size
    key = cache_key(files, stamps, input_size, decode)
    index = cache.open_complete(folder, key)
    if index is not None:
        log.info("reusing the decoded-image cache %s (%d images)", folder, index["count"])
        reader = cache.RecordReader(folder / "images.u8", (h, w, 3), np.uint8)
        return ImageCache(folder, reader, np.asarray(index["kept"], np.int64),
                          [Skipped(**s) for s in index["skipped"]], True, key)
    tmp = cache.start_build(folder)
    names = list(display) if display is not None else [str(f) for f in files]
    kept: list[int] = []
    skipped: list[Skipped] = []

    def one(i: int) -> np.ndarray | Skipped:
        try:
            return load_model_input(files[i], input_size=input_size,
                                    max_bytes=decode.max_file_bytes, follow_symlinks=True,
                                    **decode_limits(decode))
        except ImageError as exc:
            return Skipped(names[i], exc.code, str(exc))
        except Exception as exc:  # a decoder bug on a hostile file must not end training
            return Skipped(names[i], "image_error",
                           f"unexpected decoder failure ({type(exc).__name__}: {exc})")

    try:
        with cache.RecordWriter(tmp / "images.u8", (h, w, 3), np.uint8) as writer, \
                ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for s in range(0, len(files), chunk):
                done = list(pool.map(one, range(s, min(len(files), s + chunk))))
                good = []
                for i, r in enumerate(done, start=s):
                    if isinstance(r, Skipped):
                        skipped.append(r)
                        log.warning("skipping %s: %s (%s)", r.path, r.message, r.code)
                    else:
                        good.append(r)
                        kept.append(i)
                if good:
                    writer.append(np.stack(good))
                if (s // chunk + 1) % max(1, 2048 // chunk) == 0:
                    log.info("decoded %d/%d images", min(len(files), s + chunk), len(files))
        cache.finish_build(folder, {"key": key, "count": len(kept), "shape": [h, w, 3],
                                    "kept": kept, "skipped": [x.as_dict() for x in skipped]})
    except BaseException:
        cache.abandon_build(folder)
        raise
    reader = cache.RecordReader(folder / "images.u8", (h, w, 3), np.uint8)
    return ImageCache(folder, reader, np.asarray(kept, np.int64), skipped, False, key)


@dataclass
class Photos:
    """The usable training photos (decoded, on disk) with labels and the validation split.

    Positions index the kept images: ``reader.read(i)`` is image i, ``labels[i]`` its class,
    ``origin[i]`` its data folder; ``train_idx`` / ``val_idx`` split them."""
    images: ImageCache
    labels: np.ndarray
    origin: np.ndarray
    skipped: list[Skipped]        # duplicates found while listing + files that failed to decode
    train_idx: np.ndarray
    val_idx: np.ndarray

    @property
    def reader(self) -> cache.RecordReader:
        return self.images.reader

    @property
    def y_tr(self) -> np.ndarray:
        return self.labels[self.train_idx]

    @property
    def y_val(self) -> np.ndarray:
        return self.labels[self.val_idx]


def split_photos(data: TrainingData, images: ImageCache, *, validation_fraction: float,
                 seed: int) -> Photos:
    """The decoded photos with their labels and a seeded stratified validation split.

    Raises ConfigError when a class has fewer than 2 usable images."""
    labels = data.labels[images.kept]
    counts = np.bincount(labels, minlength=len(data.class_names))
    if (counts < 2).any():
        raise ConfigError(f"training data: every class needs at least 2 usable images, got "
                          f"{dict(zip(data.class_names, counts.tolist()))}")
    train_idx, val_idx = stratified_split(labels, validation_fraction, seed)
    return Photos(images, labels, data.origin[images.kept], data.skipped + images.skipped,
                  train_idx, val_idx)
