"""The two training phases: the head on cached features, then fine-tuning the top blocks.

    acts = cache_activations(model, photos, cfg, weights, run / "cache" / "activations")
    feats = cache_features(model, photos, acts, run / "cache" / "features")
    head = train_head(model, feats, photos, cfg, epoch_log)          # phase 1
    tuned = fine_tune(model, photos, acts, cfg, epoch_log, head.best)  # phase 2
    tuned.improved      # False: fine-tuning never beat phase 1, its weights were kept

**Phase 1, head.** The backbone is frozen, so its pooled features are computed once for every
image *and its horizontal flip* (the only augmentation in this phase) into
``cache/features/``; the dropout + Dense head is then trained on those features (seconds
instead of minutes: one backbone pass instead of one per epoch). Same math as training the
full model with a frozen backbone, because frozen BatchNorm runs in inference mode either
way. With ``fine_tune_cache`` the features are computed from the cached activations (only the
top of the network runs again).

**Phase 2, fine-tune.** Layers from ``fine_tune_from`` to the top are unfrozen (BatchNorm stays
frozen = inference mode) and trained at a low learning rate (constant or cosine).
``fine_tune_cache = true``: the output of the frozen layers below ``fine_tune_from`` is
computed once per image and per flipped training image into ``cache/activations/`` (float16),
and each epoch trains ``keras.Model(cut, output)`` (the top, sharing the model's layers) on one
of the two versions of each image, picked at random. ``false``: every epoch streams the cached
images through the full augmentation pipeline (:func:`training.pipeline.image_pipeline`).

Both phases: early stopping on validation loss, restoring the best weights (phase 2 starts
from phase 1's best, which it must beat); a checkpoint each epoch (``checkpoints/last.keras``
and ``best.keras``); one CSV row per epoch in ``log.csv`` (:mod:`training.callbacks`).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training import cache, model as model_lib
from training.cache import RecordReader
from training.callbacks import best_of, history_rows, phase_callbacks
from training.config import TrainingSettings
from training.crossfit import Features
from training.photos import Photos
from training.pipeline import image_pipeline, map_to_file, targets

log = logging.getLogger(__name__)


@dataclass
class Activations:
    """Cached output of the frozen layers below ``fine_tune_from`` (float16 records):
    record i of ``orig`` = image i; record j of ``flip`` = flipped training image j."""
    cut: Any                      # the Keras tensor where the network is cut
    top_features: Any             # keras.Model: activations -> pooled features
    orig: RecordReader
    flip: RecordReader | None

    def close(self) -> None:
        for r in (self.orig, self.flip):
            if r is not None:
                r.close()


@dataclass
class EpochLog:
    """Where a phase writes its epochs: ``log.csv`` and the checkpoint folder."""
    csv_path: Path
    ckpt_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)   # every phase's epochs


@dataclass
class PhaseResult:
    best: tuple[float, list] | None     # best validation loss and its weights (full model)
    best_epoch: int                     # 0: no epoch beat the previous phase
    improved: bool


def cache_activations(model: Any, photos: Photos, cfg: TrainingSettings, weights: str | None,
                      folder: Path) -> Activations:
    """The frozen bottom's output for every image (+ flipped training images), on disk.

    A complete cache built from the same images, backbone weights, cut layer and split is
    reused; anything else is rebuilt."""
    import keras

    cut = model_lib.cut_tensor(model, cfg.fine_tune_from)
    bottom = keras.Model(model.inputs[0], cut, name="frozen_bottom")
    top_features = keras.Model(cut, model.get_layer(model_lib.FEATURE_LAYER).output,
                               name="top_features")
    key = hashlib.sha256(repr((photos.images.key, _weights_stamp(weights, cfg.seed),
                               cfg.fine_tune_from, cfg.alpha, cfg.flip,
                               photos.train_idx.tobytes().hex())).encode()).hexdigest()
    shape = tuple(int(d) for d in cut.shape[1:])
    if cache.open_complete(folder, key) is None:
        tmp = cache.start_build(folder)
        try:
            map_to_file(bottom, photos.reader, np.arange(len(photos.labels)), tmp / "orig.f16",
                        np.float16, what="activations")
            if cfg.flip:
                map_to_file(bottom, photos.reader, photos.train_idx, tmp / "flip.f16",
                            np.float16, flip=True, what="activations (flipped)")
            cache.finish_build(folder, {"key": key, "shape": list(shape),
                                        "layer": cfg.fine_tune_from})
        except BaseException:
            cache.abandon_build(folder)
            raise
    else:
        log.info("reusing the activation cache %s", folder)
    return Activations(cut, top_features, RecordReader(folder / "orig.f16", shape, np.float16),
                       RecordReader(folder / "flip.f16", shape, np.float16) if cfg.flip else None)


def cache_features(model: Any, photos: Photos, acts: Activations | None, flip: bool,
                   folder: Path) -> Features:
    """Pooled backbone features of every image (+ flipped training images), on disk; from
    the cached activations when there are some (only the top runs), else from the images."""
    cache.remove(folder)
    folder.mkdir(parents=True)
    tr_pos = np.arange(len(photos.train_idx))   # record j of a train-only file = train_idx[j]
    if acts is not None:
        fn, src, flip_src, flip_idx = acts.top_features, acts.orig, acts.flip, tr_pos
    else:
        fn, src, flip_src, flip_idx = (model_lib.feature_model(model), photos.reader,
                                       photos.reader, photos.train_idx)
    orig = map_to_file(fn, src, np.arange(len(photos.labels)), folder / "orig.f32",
                       what="features")
    flipped = (map_to_file(fn, flip_src, flip_idx, folder / "flip.f32", flip=acts is None,
                           what="features (flipped)") if flip else None)
    return Features(orig, flipped, photos.train_idx)


def train_head(model: Any, features: Features, photos: Photos, cfg: TrainingSettings,
               epoch_log: EpochLog) -> PhaseResult:
    """Phase 1: the dropout + Dense head on the cached features (flipped copies included)."""
    import keras

    binary = model_lib.is_binary(model)
    head = model_lib.head_model(model, features.orig.shape[0])
    loss, metric = model_lib.loss_and_metric(binary)
    head.compile(optimizer=keras.optimizers.Adam(cfg.head_learning_rate), loss=loss,
                 metrics=[metric])
    tr_pos = np.arange(len(photos.train_idx))
    sources = ([(features.orig, photos.train_idx)]
               + ([(features.flip, tr_pos)] if features.flip is not None else []))
    y_head = np.concatenate([photos.y_tr] * len(sources))
    steps = cache.steps(sources, cfg.batch_size)
    callbacks = phase_callbacks("head", model, epoch_log.csv_path, epoch_log.ckpt_dir,
                                cfg.head_patience, None, steps)
    val = [(features.orig, photos.val_idx)]
    history = head.fit(cache.stream(sources, targets(y_head, binary), cfg.batch_size, cfg.seed),
                       steps_per_epoch=steps, epochs=cfg.head_epochs,
                       validation_data=cache.stream(val, targets(photos.y_val, binary), 256,
                                                    None),
                       validation_steps=cache.steps(val, 256),
                       callbacks=callbacks, shuffle=False, verbose=0)
    epoch_log.rows += history_rows("head", history)
    cb = best_of(callbacks)
    return PhaseResult((cb.best, model.get_weights()), max(1, cb.best_epoch), True)


def fine_tune(model: Any, photos: Photos, acts: Activations | None, cfg: TrainingSettings,
              epoch_log: EpochLog, start_best: tuple[float, list] | None) -> PhaseResult:
    """Phase 2: the layers from ``fine_tune_from`` up, on cached activations (flip only) or
    on augmented images; must beat ``start_best`` (phase 1) or phase 1's weights stay."""
    import keras

    binary = model_lib.is_binary(model)
    n_trainable = model_lib.set_backbone_trainable(model, True, cfg.fine_tune_from)
    log.info("fine-tuning %d backbone layers from %s (BatchNorm frozen), lr %g (%s), "
             "on %s", n_trainable, cfg.fine_tune_from, cfg.fine_tune_learning_rate,
             cfg.fine_tune_schedule,
             "cached activations (flip only)" if acts is not None else "augmented images")
    loss, metric = model_lib.loss_and_metric(binary)
    y_tr, y_val = targets(photos.y_tr, binary), targets(photos.y_val, binary)
    if acts is not None:
        trainee = keras.Model(acts.cut, model.output, name="top")
        tr_pos = np.arange(len(photos.train_idx))
        sources = ([(acts.orig, photos.train_idx)]
                   + ([(acts.flip, tr_pos)] if acts.flip is not None else []))
        steps = cache.steps(sources, cfg.batch_size, pick_one=True)
        train_ds = cache.stream(sources, y_tr, cfg.batch_size, cfg.seed,
                                pick_one=True).prefetch(2)
        val_ds = cache.stream([(acts.orig, photos.val_idx)], y_val, 64, None)
        val_steps = cache.steps([(acts.orig, photos.val_idx)], 64)
    else:
        trainee = model
        steps = cache.steps([(photos.reader, photos.train_idx)], cfg.batch_size)
        train_ds = image_pipeline(photos.reader, photos.train_idx, y_tr, cfg, cfg.seed,
                                  augment=True)
        val_ds = image_pipeline(photos.reader, photos.val_idx, y_val, cfg, None,
                                augment=False, repeat=True)
        val_steps = cache.steps([(photos.reader, photos.val_idx)], cfg.batch_size)
    trainee.compile(optimizer=fine_tune_optimizer(cfg, steps * cfg.fine_tune_epochs), loss=loss,
                    metrics=[metric])
    callbacks = phase_callbacks("fine-tune", model, epoch_log.csv_path, epoch_log.ckpt_dir,
                                cfg.fine_tune_patience, start_best, steps)
    history = trainee.fit(train_ds, epochs=cfg.fine_tune_epochs, steps_per_epoch=steps,
                          validation_data=val_ds, validation_steps=val_steps,
                          callbacks=callbacks, shuffle=False, verbose=0)
    epoch_log.rows += history_rows("fine-tune", history)
    cb = best_of(callbacks)
    return PhaseResult((cb.best, model.get_weights()), cb.best_epoch, cb.best_epoch != 0)


def fine_tune_optimizer(cfg: TrainingSettings, total_steps: int) -> Any:
    """Adam at ``fine_tune_learning_rate``, constant or cosine-decayed over ``total_steps``."""
    import keras

    lr: Any = cfg.fine_tune_learning_rate
    if cfg.fine_tune_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps))
    return keras.optimizers.Adam(lr)


def _weights_stamp(weights: str | None, seed: int) -> str:
    if weights is None:
        return f"random:{seed}"
    if weights == "imagenet":
        return "imagenet"
    st = os.stat(weights)
    return f"{weights}:{st.st_size}:{st.st_mtime_ns}"
