"""Data pipelines of training: cached records -> tf.data batches, and model passes over records.

    ds = image_pipeline(images, train_idx, targets(y_tr, binary=True), cfg, seed=1337,
                        augment=True)            # endless, augmented float32 batches from disk
    feats = map_to_file(feature_fn, images, all_idx, run / "cache/features/orig.f32")
    logits = logits_from(feature_fn, images, val_idx, kernel, bias)   # (N, units) float64

Everything streams: one batch is read from a record file (:mod:`training.cache`), run through
the model or the augmentation, and written out or handed to ``fit`` before the next one is
read, so memory does not grow with the number of photos. Augmentation (flip, rotation, zoom,
contrast) runs in tf.data, so the saved serving graph holds no augmentation layer.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ConfigError
from training import cache
from training.cache import RecordReader, RecordWriter
from training.config import TrainingSettings

log = logging.getLogger(__name__)


def targets(labels: np.ndarray, binary: bool) -> np.ndarray:
    """Labels as ``fit`` wants them: (N, 1) float32 for a sigmoid, int64 for a softmax."""
    return labels.astype(np.float32)[:, None] if binary else labels.astype(np.int64)


def predictor(fn: Any):
    """``fn`` as a compiled inference step on float32 input (uint8 images are cast)."""
    import tensorflow as tf

    step = tf.function(lambda x: fn(x, training=False), reduce_retracing=True)
    return lambda x: np.asarray(step(tf.constant(np.asarray(x, np.float32))))


def map_to_file(fn: Any, reader: RecordReader, indices: np.ndarray, path: Path,
                dtype: Any = np.float32, flip: bool = False, batch_size: int = 64,
                what: str = "") -> RecordReader:
    """``fn`` over ``reader``'s records at ``indices`` (in that order) -> a record file.

    Record ``j`` of the result belongs to ``indices[j]``. ``flip`` mirrors images (axis 2)
    first. Memory: one batch in, one batch out.
    """
    predict = predictor(fn)
    t0 = last = time.perf_counter()
    writer: RecordWriter | None = None
    try:
        for s in range(0, len(indices), batch_size):
            x = reader.read(indices[s:s + batch_size])
            if flip:
                x = x[:, :, ::-1]
            y = predict(x)
            if writer is None:
                writer = RecordWriter(path, y.shape[1:], dtype)
            writer.append(y)
            if time.perf_counter() - last > 30:
                last = time.perf_counter()
                log.info("%s: %d/%d (%.0f/s)", what or path.name, s + len(x), len(indices),
                         (s + len(x)) / (last - t0))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ConfigError(f"nothing to compute for {path.name}: no images")
    return RecordReader(path, writer.shape, dtype)


def logits_from(fn: Any, reader: RecordReader, indices: np.ndarray, kernel: np.ndarray,
                bias: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Classifier logits (N, units) of ``reader``'s records at ``indices``, batch by batch;
    ``fn`` maps a record batch to pooled features (None: the records are features)."""
    predict = predictor(fn) if fn is not None else (lambda x: np.asarray(x))
    out = [predict(reader.read(indices[s:s + batch_size])).astype(np.float64) @ kernel + bias
           for s in range(0, len(indices), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(bias)))


def augmenter(cfg: TrainingSettings, seed: int):
    """The ``[training]`` augmentation as Keras preprocessing layers (None: no augmentation)."""
    import keras

    layers = []
    if cfg.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if cfg.rotation > 0:
        layers.append(keras.layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed + 1))
    if cfg.zoom > 0:
        layers.append(keras.layers.RandomZoom((-cfg.zoom, 0.0), fill_mode="reflect", seed=seed + 2))
    if cfg.contrast > 0:
        layers.append(keras.layers.RandomContrast(cfg.contrast, seed=seed + 3))
    return keras.Sequential(layers, name="augment") if layers else None


def image_pipeline(reader: RecordReader, indices: np.ndarray, targets: np.ndarray,
                   cfg: TrainingSettings, seed: int | None, augment: bool,
                   repeat: bool | None = None):
    """Batches of cached images as float32 (augmented when training), streamed from disk.

    ``seed`` None: fixed order (evaluation); otherwise a new seeded order each epoch.
    Endless unless ``repeat`` is False (default: endless when seeded); give ``fit`` the
    ``steps_per_epoch`` / ``validation_steps``."""
    import tensorflow as tf

    ds = cache.stream([(reader, indices)], targets, cfg.batch_size, seed,
                      repeat=seed is not None if repeat is None else repeat)
    aug = augmenter(cfg, seed or 0) if augment else None

    def prepare(x, y):
        x = tf.cast(x, tf.float32)
        if aug is not None:
            x = tf.clip_by_value(aug(x, training=True), 0.0, 255.0)
        return x, y

    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
