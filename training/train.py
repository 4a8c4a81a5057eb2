"""``pawcam train``: folder of labelled photos -> calibrated model + report, in a run folder.

    result = train(settings, TrainOptions(data=[Path("../shared/dataset"),
                                                Path("../shared/dataset-extra")]))
    result.model_path      # runs/20261124-153000/model.keras (+ .json, .md, _report/)
    result.installed       # True when copied to [training] install_to

Steps (each logged with its time). Memory does not grow with the number of photos: images,
activations and features live in record files under ``RUN/cache/`` (:mod:`training.cache`) and
are streamed one batch at a time.

1. **Pre-scan + decode cache.** ``DIR/train/<class>/`` of every data folder and the one
   ``test/<class>/`` are listed (:func:`training.dataset.scan_sources`); every training file is
   decoded once with the engine's own decoder into ``cache/images/`` (unusable files are
   skipped and listed). A stratified, seeded validation split is carved from all of them.
2. **Phase 1, head.** The backbone is frozen, so its pooled features are computed once for
   every image *and its horizontal flip* (the only augmentation in this phase) into
   ``cache/features/``; the dropout + Dense head is then trained on those features
   (seconds instead of minutes: one backbone pass instead of one per epoch). Same math as
   training the full model with a frozen backbone, because frozen BatchNorm runs in
   inference mode either way. With ``fine_tune_cache`` the features are computed from the
   cached activations of step 3 (only the top of the network runs again).
3. **Phase 2, fine-tune.** Layers from ``fine_tune_from`` to the top are unfrozen (BatchNorm
   stays frozen = inference mode) and trained at a low learning rate (constant or cosine).
   ``fine_tune_cache = true``: the output of the frozen layers below ``fine_tune_from`` is
   computed once per image and per flipped training image into ``cache/activations/``
   (float16), and each epoch trains ``keras.Model(cut, output)`` (the top, sharing the
   model's layers) on one of the two versions of each image, picked at random. ``false``:
   every epoch streams the cached images through the full augmentation pipeline (flip,
   rotation, zoom, contrast in tf.data, so the saved graph holds no augmentation layer).
   Both phases: early stopping on validation loss, restoring the best weights (phase 2 starts
   from phase 1's best, which it must beat); a checkpoint each epoch (``checkpoints/last.keras``
   and ``best.keras``); one CSV row per epoch in ``log.csv``.
4. **Calibration.** One temperature, fitted by NLL (a MAP estimate with a log-normal prior,
   see :mod:`training.calibration`). The 10% validation split alone is too small for it (a
   good model makes zero to two mistakes there, and then the NLL just keeps falling as
   T -> 0), so the phase-1 recipe is also **cross-fitted**: re-run on K-1 of K stratified
   folds of the cached training features (best epoch count) and scoring the held-out fold
   gives honest logits for every training image (seconds on cached features).
   T is fitted on the final model's validation logits + those cross-fitted logits (~2,000
   images here, prior centred on 1 with sigma 1). If fine-tuning won, the cross-fitted
   logits are a proxy (fine-tuning is short and at a low learning rate, so the logit scale
   moves little; the validation logits of the final model still count). An earlier variant
   fitted the fine-tuned model on its 200 validation images only (prior centred on the
   cross-fitted T): with one mistake among them it sharpened to T ~ 0.89 and made test ECE
   slightly worse than no calibration. ECE (15 bins) before/after is recorded for the
   calibration set and for the test set.
5. **Evaluation** of the saved model on ``DIR/test`` through the engine, report and card.
6. **Install** to ``[training] install_to`` per ``[training] install``: ``if_better`` (default)
   evaluates the installed model on the same test folder and replaces it only when the new
   one is better (accuracy, then ROC-AUC, then log loss, each beyond a noise margin: see
   :func:`is_better`), so a casual run never overwrites a
   better shipped model and the repository only gets a new model file when it improves.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.config import Settings
from engine.errors import ConfigError, ModelLoadError
from engine.modelio import ModelMeta, load_model, meta_path_for, save_model
from training import cache, calibration, model as model_lib
from training.cache import RecordReader, RecordWriter
from training.config import TrainingSettings, training_settings
from training.dataset import scan_sources, stratified_split
from training.photos import decode_to_cache
from training.evaluate import Evaluation, evaluate_folder
from training.report import card_path_for, report_dir_for, write_report

log = logging.getLogger(__name__)

LOG_COLUMNS = ("phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy",
               "learning_rate", "seconds")


@dataclass
class TrainOptions:
    data: Path | Sequence[Path]          # one data folder or several (see scan_sources)
    run_dir: Path | None = None
    install: str | None = None          # overrides [training] install


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    meta: ModelMeta
    evaluation: Evaluation
    installed: bool
    install_path: Path
    train_seconds: float


class EpochLog:
    """Appends one row per epoch to ``log.csv`` and logs a progress line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        with path.open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(LOG_COLUMNS)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c)) for c in LOG_COLUMNS])
        log.info("%s epoch %d: loss %.4f acc %.4f | val_loss %.4f val_acc %.4f (%.1f s)",
                 row["phase"], row["epoch"], row["loss"], row["accuracy"], row["val_loss"],
                 row["val_accuracy"], row["seconds"])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def _callbacks(phase: str, full_model: Any, epoch_log: EpochLog, ckpt_dir: Path,
               patience: int, start_best: tuple[float, list] | None, batches: int):
    """Epoch log + checkpoints + early stopping that restores the best weights."""
    import keras

    class Progress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.t0 = time.perf_counter()
            self.best = start_best[0] if start_best else np.inf
            self.best_weights = start_best[1] if start_best else None
            self.best_epoch = 0 if start_best else -1
            self.wait = 0
            self.last_note = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()
            self.last_note = self.t0

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if now - self.last_note > 30:
                self.last_note = now
                log.info("%s: batch %d/%d, loss %.4f", phase, batch + 1, batches,
                         float((logs or {}).get("loss", np.nan)))

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            opt = getattr(self.model, "optimizer", None)
            lr = float(np.asarray(opt.learning_rate)) if opt is not None else None
            row = {"phase": phase, "epoch": epoch + 1, "loss": float(logs["loss"]),
                   "accuracy": float(logs.get("accuracy", np.nan)),
                   "val_loss": float(logs["val_loss"]),
                   "val_accuracy": float(logs.get("val_accuracy", np.nan)),
                   "learning_rate": lr, "seconds": time.perf_counter() - self.t0}
            epoch_log.add(row)
            full_model.save(ckpt_dir / "last.keras")
            if row["val_loss"] < self.best - 1e-6:
                self.best, self.best_epoch, self.wait = row["val_loss"], epoch + 1, 0
                self.best_weights = full_model.get_weights()
                full_model.save(ckpt_dir / "best.keras")
            else:
                self.wait += 1
                if self.wait >= patience:
                    log.info("%s: early stop, no val_loss improvement in %d epoch(s)", phase,
                             patience)
                    self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                full_model.set_weights(self.best_weights)
                where = f"epoch {self.best_epoch}" if self.best_epoch > 0 else "the previous phase"
                log.info("%s: restored best weights (%s, val_loss %.4f)", phase, where, self.best)

    return Progress()


def _loss_and_metric(binary: bool):
    import keras

    if binary:
        return keras.losses.BinaryCrossentropy(), keras.metrics.BinaryAccuracy(name="accuracy")
    return (keras.losses.SparseCategoricalCrossentropy(),
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"))


def _targets(labels: np.ndarray, binary: bool) -> np.ndarray:
    return labels.astype(np.float32)[:, None] if binary else labels.astype(np.int64)


def _predictor(fn: Any):
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
    predict = _predictor(fn)
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
    predict = _predictor(fn) if fn is not None else (lambda x: np.asarray(x))
    out = [predict(reader.read(indices[s:s + batch_size])).astype(np.float64) @ kernel + bias
           for s in range(0, len(indices), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(bias)))


def augmenter(cfg: TrainingSettings, seed: int):
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


CALIBRATION_FOLDS = 5
PRIOR_SIGMA = 1.0


def _new_head(feature_dim: int, units: int, cfg: TrainingSettings) -> Any:
    import keras

    return keras.Sequential([
        keras.Input((feature_dim,)),
        keras.layers.Dropout(cfg.dropout),
        keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax")])


def cross_fitted_logits(f_orig: RecordReader, f_flip: RecordReader | None, train_idx: np.ndarray,
                        labels: np.ndarray, cfg: TrainingSettings, epochs: int,
                        num_classes: int, folds: int = CALIBRATION_FOLDS) -> np.ndarray:
    """Out-of-fold logits of the phase-1 recipe (fresh head per fold, ``epochs`` epochs).

    ``f_orig`` holds the features of every image (record = image index), ``f_flip`` those of
    the flipped training images (record j = ``train_idx[j]``); ``labels`` are the training
    labels (aligned with ``train_idx``). Features stream from disk.
    """
    import keras

    binary = num_classes == 2
    rng = np.random.default_rng(cfg.seed + 101)
    fold = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = np.arange(len(idx)) % folds
    out = np.zeros((len(labels), 1 if binary else num_classes), np.float64)
    for k in range(folds):
        keras.utils.set_random_seed(cfg.seed + 1000 + k)
        tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        sources = [(f_orig, train_idx[tr])] + ([(f_flip, tr)] if f_flip is not None else [])
        y = np.concatenate([labels[tr]] * len(sources))
        head = _new_head(f_orig.shape[0], out.shape[1], cfg)
        loss, _ = _loss_and_metric(binary)
        head.compile(optimizer=keras.optimizers.Adam(cfg.head_learning_rate), loss=loss)
        head.fit(cache.stream(sources, _targets(y, binary), cfg.batch_size, cfg.seed + k),
                 steps_per_epoch=cache.steps(sources, cfg.batch_size), epochs=max(1, epochs),
                 shuffle=False, verbose=0)
        kernel, bias = head.layers[-1].get_weights()
        out[te] = logits_from(None, f_orig, train_idx[te], np.asarray(kernel, np.float64),
                              np.asarray(bias, np.float64), 1024)
    return out


def _optimizer(cfg: TrainingSettings, total_steps: int) -> Any:
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

def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    from engine import __version__

    return {"pawcam": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _machine() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return f"{os.cpu_count()} CPU core(s)" + (f", {len(gpus)} GPU(s)" if gpus else ", no GPU")


def _settings_dict(cfg: TrainingSettings, base_dir: Path) -> dict[str, Any]:
    """The settings as written in config.toml (paths relative to its folder when inside it)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            try:
                v = v.relative_to(base_dir.resolve())
            except ValueError:
                pass
            v = str(v)
        out[f.name] = v
    return out


def _roots(data: Path | Sequence[Path]) -> list[Path]:
    return [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(d) for d in data]


def train(settings: Settings, options: TrainOptions) -> TrainResult:
    import keras

    from engine.device import configure_device
    import tensorflow as tf

    cfg = training_settings(settings)
    install_policy = options.install or cfg.install
    data = scan_sources(_roots(options.data))
    names = data.class_names
    binary = len(names) == 2
    weights = cfg.weights_spec(settings.base_dir)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    run_dir = Path(options.run_dir) if options.run_dir else (
        cfg.output_dir / datetime.now().strftime("%Y%m%d-%H%M%S"))
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    cache_root = run_dir / "cache"
    log.info("run folder: %s", run_dir)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    device = configure_device(settings.device)

    # 1. pre-scan + decode cache (on disk) ---------------------------------------------
    t = time.perf_counter()
    log.info("classes %s; %d training files from %d folder(s), %d test files in %s",
             list(names), len(data.files), len(data.sources), len(data.test_layout.files),
             data.test_dir)
    display = [os.path.relpath(f, data.sources[k].root.parent)
               for f, k in zip(data.files, data.origin)]
    images = decode_to_cache(data.files, data.stamps, cache_root / "images",
                             input_size=cfg.input_size, decode=settings.decode,
                             threads=settings.inference.threads, display=display)
    del display
    reader = images.reader
    labels = data.labels[images.kept]
    origin = data.origin[images.kept]
    skipped = data.skipped + images.skipped
    if skipped:
        log.warning("pre-scan skipped %d training file(s); see the report", len(skipped))
    counts = np.bincount(labels, minlength=len(names))
    if (counts < 2).any():
        raise ConfigError(f"training data: every class needs at least 2 usable images, got "
                          f"{dict(zip(names, counts.tolist()))}")
    train_idx, val_idx = stratified_split(labels, cfg.validation_fraction, cfg.seed)
    y_tr, y_val = labels[train_idx], labels[val_idx]
    timing["decode_seconds"] = time.perf_counter() - t
    log.info("%s %d images in %.1f s (%d train, %d validation, %d skipped)",
             "reused the cache of" if images.reused else "decoded", len(labels),
             timing["decode_seconds"], len(train_idx), len(val_idx), len(skipped))
    epoch_log = EpochLog(run_dir / "log.csv")
    notes: list[str] = []
    cached = cfg.fine_tune_epochs > 0 and cfg.fine_tune_cache
    all_idx = np.arange(len(labels))
    tr_pos = np.arange(len(train_idx))   # record j of a train-only file = train_idx[j]

    with tf.device(device):
        model = model_lib.build_model(len(names), cfg.input_size, cfg.alpha, weights, cfg.dropout)
        loss, metric = _loss_and_metric(binary)
        if weights is None:
            sample = np.random.default_rng(cfg.seed).permutation(train_idx)[:64]
            model_lib.init_batchnorm_statistics(model, reader.read(np.sort(sample)))
            log.info("random backbone: BatchNorm statistics set from %d training images",
                     len(sample))
        fm = model_lib.feature_model(model)

        # 2a. activations of the frozen layers below fine_tune_from (cached on disk) -------
        if cached:
            t = time.perf_counter()
            cut = model_lib.cut_tensor(model, cfg.fine_tune_from)
            bottom = keras.Model(model.inputs[0], cut, name="frozen_bottom")
            top_features = keras.Model(cut, model.get_layer(model_lib.FEATURE_LAYER).output,
                                       name="top_features")
            act_dir = cache_root / "activations"
            key = hashlib.sha256(repr((images.key, _weights_stamp(weights, cfg.seed),
                                       cfg.fine_tune_from, cfg.alpha, cfg.flip,
                                       train_idx.tobytes().hex())).encode()).hexdigest()
            shape = tuple(int(d) for d in cut.shape[1:])
            if cache.open_complete(act_dir, key) is None:
                tmp = cache.start_build(act_dir)
                try:
                    map_to_file(bottom, reader, all_idx, tmp / "orig.f16", np.float16,
                                what="activations")
                    if cfg.flip:
                        map_to_file(bottom, reader, train_idx, tmp / "flip.f16", np.float16,
                                    flip=True, what="activations (flipped)")
                    cache.finish_build(act_dir, {"key": key, "shape": list(shape),
                                                 "layer": cfg.fine_tune_from})
                except BaseException:
                    cache.abandon_build(act_dir)
                    raise
            else:
                log.info("reusing the activation cache %s", act_dir)
            a_orig = RecordReader(act_dir / "orig.f16", shape, np.float16)
            a_flip = RecordReader(act_dir / "flip.f16", shape, np.float16) if cfg.flip else None
            timing["activation_seconds"] = time.perf_counter() - t
            log.info("activations at %s (%s, float16) in %.1f s", cfg.fine_tune_from, shape,
                     timing["activation_seconds"])
        # phase-1 features come from the activations when they exist (the top only)
        feat_fn, feat_src, feat_flip_src = ((top_features, a_orig, a_flip) if cached
                                            else (fm, reader, reader))

        # 2. phase 1: head on cached features --------------------------------------------
        best: tuple[float, list] | None = None
        final_from_head = cfg.head_epochs > 0
        f_orig = f_flip = None
        if cfg.head_epochs > 0:
            t = time.perf_counter()
            feat_dir = cache_root / "features"
            cache.remove(feat_dir)
            feat_dir.mkdir(parents=True)
            f_orig = map_to_file(feat_fn, feat_src, all_idx, feat_dir / "orig.f32",
                                 what="features")
            if cfg.flip:
                f_flip = map_to_file(feat_fn, feat_flip_src, tr_pos if cached else train_idx,
                                     feat_dir / "flip.f32", flip=not cached,
                                     what="features (flipped)")
            timing["feature_seconds"] = time.perf_counter() - t
            log.info("backbone features for phase 1 in %.1f s", timing["feature_seconds"])
            t = time.perf_counter()
            head = model_lib.head_model(model, f_orig.shape[0])
            head.compile(optimizer=keras.optimizers.Adam(cfg.head_learning_rate), loss=loss,
                         metrics=[metric])
            sources = [(f_orig, train_idx)] + ([(f_flip, tr_pos)] if f_flip is not None else [])
            y_head = np.concatenate([y_tr] * len(sources))
            steps = cache.steps(sources, cfg.batch_size)
            cb = _callbacks("head", model, epoch_log, ckpt_dir, cfg.head_patience, None, steps)
            head.fit(cache.stream(sources, _targets(y_head, binary), cfg.batch_size, cfg.seed),
                     steps_per_epoch=steps, epochs=cfg.head_epochs,
                     validation_data=cache.stream([(f_orig, val_idx)], _targets(y_val, binary),
                                                  256, None),
                     validation_steps=cache.steps([(f_orig, val_idx)], 256),
                     callbacks=[cb], shuffle=False, verbose=0)
            best = (cb.best, model.get_weights())
            head_best_epoch = max(1, cb.best_epoch)
            timing["head_seconds"] = time.perf_counter() - t

        # 3. phase 2: fine-tune the top blocks -------------------------------------------
        if cfg.fine_tune_epochs > 0:
            t = time.perf_counter()
            n_trainable = model_lib.set_backbone_trainable(model, True, cfg.fine_tune_from)
            log.info("fine-tuning %d backbone layers from %s (BatchNorm frozen), lr %g (%s), "
                     "on %s", n_trainable, cfg.fine_tune_from, cfg.fine_tune_learning_rate,
                     cfg.fine_tune_schedule,
                     "cached activations (flip only)" if cached else "augmented images")
            loss, metric = _loss_and_metric(binary)
            if cached:
                trainee = keras.Model(cut, model.output, name="top")
                sources = [(a_orig, train_idx)] + ([(a_flip, tr_pos)] if a_flip is not None else [])
                steps = cache.steps(sources, cfg.batch_size, pick_one=True)
                train_ds = cache.stream(sources, _targets(y_tr, binary), cfg.batch_size,
                                        cfg.seed, pick_one=True).prefetch(2)
                val_ds = cache.stream([(a_orig, val_idx)], _targets(y_val, binary), 64, None)
                val_steps = cache.steps([(a_orig, val_idx)], 64)
            else:
                trainee = model
                steps = cache.steps([(reader, train_idx)], cfg.batch_size)
                train_ds = image_pipeline(reader, train_idx, _targets(y_tr, binary), cfg,
                                          cfg.seed, augment=True)
                val_ds = image_pipeline(reader, val_idx, _targets(y_val, binary), cfg, None,
                                        augment=False, repeat=True)
                val_steps = cache.steps([(reader, val_idx)], cfg.batch_size)
            trainee.compile(optimizer=_optimizer(cfg, steps * cfg.fine_tune_epochs), loss=loss,
                            metrics=[metric])
            cb = _callbacks("fine-tune", model, epoch_log, ckpt_dir, cfg.fine_tune_patience,
                            best, steps)
            trainee.fit(train_ds, epochs=cfg.fine_tune_epochs, steps_per_epoch=steps,
                        validation_data=val_ds, validation_steps=val_steps, callbacks=[cb],
                        shuffle=False, verbose=0)
            if cb.best_epoch == 0:
                notes.append("fine-tuning did not improve validation loss; the phase-1 weights "
                             "were kept")
            else:
                final_from_head = False
            timing["fine_tune_seconds"] = time.perf_counter() - t

        # 4. calibration -----------------------------------------------------------------
        t = time.perf_counter()
        kernel, bias = model_lib.classifier_weights(model)
        cal_logits = (logits_from(top_features, a_orig, val_idx, kernel, bias) if cached
                      else logits_from(fm, reader, val_idx, kernel, bias))
        cal_y = y_val
        method = "validation split"
        if cfg.calibrate and cfg.head_epochs > 0:
            log.info("cross-fitting %d phase-1 heads for calibration logits", CALIBRATION_FOLDS)
            oof = cross_fitted_logits(f_orig, f_flip, train_idx, y_tr, cfg, head_best_epoch,
                                      len(names))
            cal_logits = np.concatenate([cal_logits, oof])
            cal_y = np.concatenate([y_val, y_tr])
            method = (f"the final model's validation split + {CALIBRATION_FOLDS}-fold "
                      "cross-fitted phase-1 logits of the training part"
                      + ("" if final_from_head else
                         " (a proxy: the final weights are fine-tuned ones)"))
        center, sigma = 1.0, PRIOR_SIGMA
        temperature = (calibration.fit_temperature(cal_logits, cal_y, prior_sigma=sigma,
                                                   prior_center=center)
                       if cfg.calibrate else 1.0)
        val_ece_before = calibration.expected_calibration_error(
            calibration.probabilities(cal_logits), cal_y)
        val_ece_after = calibration.expected_calibration_error(
            calibration.probabilities(cal_logits, temperature), cal_y)
        timing["calibration_seconds"] = time.perf_counter() - t
        log.info("temperature %.4f fitted on %d images (%s): ECE %.4f -> %.4f", temperature,
                 len(cal_y), method, val_ece_before, val_ece_after)

        # a clean copy for serving: no optimizer state, nothing trainable-specific
        clean = model_lib.build_model(len(names), cfg.input_size, cfg.alpha, None, cfg.dropout)
        clean.set_weights(model.get_weights())
    reader.close()
    for r in (a_orig, a_flip, f_orig, f_flip) if cached else (f_orig, f_flip):
        if r is not None:
            r.close()
    timing["train_seconds"] = time.perf_counter() - t_start
    log.info("training took %.1f min", timing["train_seconds"] / 60)

    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes()
                                     for w in clean.get_weights())).hexdigest()[:8]
    version = f"{datetime.now(timezone.utc):%Y.%m.%d}-{digest}"
    sources_info = []
    for k, src in enumerate(data.sources):
        mine = origin == k
        entry = src.as_dict()
        entry["used"] = _count(labels[mine], names)
        entry["skipped"] = int(np.sum(data.origin == k) - mine.sum()) + src.skipped
        sources_info.append(entry)
    extra = {
        "seed": cfg.seed,
        "settings": _settings_dict(cfg, settings.base_dir),
        "backbone_weights": cfg.backbone_weights if weights in (None, "imagenet") else weights,
        "data": {"root": ", ".join(str(s.root) for s in data.sources),
                 "sources": sources_info, "test_dir": str(data.test_dir),
                 "train_counts": _count(y_tr, names),
                 "val_counts": _count(y_val, names), "test_counts": data.test_layout.counts(),
                 "validation_fraction": cfg.validation_fraction},
        "skipped": [s.as_dict() for s in skipped],
        "timing": {k: round(v, 1) for k, v in timing.items()},
        "calibration": {"method": method if cfg.calibrate else "off", "images": int(len(cal_y)),
                        "errors": int(np.sum(np.argmax(calibration.probabilities(cal_logits),
                                                       axis=1) != cal_y)),
                        "prior_center": center, "prior_sigma_log_t": sigma},
        "val_ece_before": val_ece_before, "val_ece_after": val_ece_after,
        "history": epoch_log.rows,
        "versions": _versions(),
        "machine": _machine(),
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": notes,
    }
    meta = ModelMeta(class_names=names, input_size=cfg.input_size, temperature=temperature,
                     version=version, target_layer=model_lib.TARGET_LAYER, extra=extra)
    model_path = save_model(clean, meta, run_dir / "model.keras")
    log.info("model saved: %s (version %s)", model_path, version)
    if not cfg.keep_cache:
        cache.remove(cache_root)
        log.info("removed the training cache %s ([training] keep_cache = false)", cache_root)

    # 5. evaluation on the test split, through the engine ---------------------------------
    loaded = load_model(model_path)
    evaluation = evaluate_folder(settings, loaded, data.test_dir, cfg.gallery_size)
    meta = dataclasses.replace(loaded.meta, metrics=_summary(evaluation))  # keeps model_sha256
    _write_meta(model_path, meta)
    write_report(model_path, meta, evaluation)

    # 6. install ---------------------------------------------------------------------------
    installed = _maybe_install(settings, model_path, meta, evaluation, cfg.install_to,
                               install_policy)
    return TrainResult(run_dir, model_path, meta, evaluation, installed, cfg.install_to,
                       timing["train_seconds"])

def _count(labels: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
    c = np.bincount(labels, minlength=len(names))
    return {n: int(v) for n, v in zip(names, c)}


def _summary(ev: Evaluation) -> dict[str, Any]:
    m = ev.metrics
    keys = ("n", "accuracy", "roc_auc", "ece", "ece_uncalibrated", "log_loss",
            "log_loss_uncalibrated", "macro_f1", "confusion_matrix", "per_class", "skipped")
    out = {k: m[k] for k in keys}
    out["split"] = ev.split_dir
    return out


def _write_meta(model_path: Path, meta: ModelMeta) -> None:
    path = meta_path_for(model_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(meta.to_json(), encoding="utf-8")
    tmp.replace(path)


def is_better(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Strictly better on the same test set: higher accuracy; at equal accuracy a ROC-AUC
    higher by at least 1e-4; at equal both, a log loss lower by at least 1e-3. Differences
    below those margins are numerical noise (float32 kernels differ between runs and
    machines), so the installed model stays and the repository does not grow for nothing."""
    if abs(new["accuracy"] - old["accuracy"]) > 1e-9:
        return new["accuracy"] > old["accuracy"]
    if abs(new["roc_auc"] - old["roc_auc"]) >= 1e-4:
        return new["roc_auc"] > old["roc_auc"]
    return new["log_loss"] < old["log_loss"] - 1e-3


def _maybe_install(settings: Settings, model_path: Path, meta: ModelMeta, evaluation: Evaluation,
                   target: Path, policy: str) -> bool:
    if policy == "never":
        log.info("not installed ([training] install = \"never\"); the model is %s", model_path)
        return False
    if policy == "if_better" and target.exists():
        try:
            current = load_model(target)
        except ModelLoadError as exc:
            log.warning("installed model %s cannot be loaded (%s); replacing it", target, exc)
        else:
            if current.meta.class_names != meta.class_names:
                log.warning("not installed: %s has classes %s, the new model %s; use "
                            "--install always to replace it", target,
                            list(current.meta.class_names), list(meta.class_names))
                return False
            log.info("evaluating the installed model %s on the same test set to compare", target)
            old = evaluate_folder(settings, current, Path(evaluation.split_dir), 0)
            n, o = evaluation.metrics, old.metrics
            if not is_better(n, o):
                log.info("not installed: the installed model is as good or better (accuracy "
                         "%.4f vs new %.4f, ROC-AUC %.5f vs new %.5f); the new model stays in %s "
                         "(--install always replaces it anyway)", o["accuracy"], n["accuracy"],
                         o["roc_auc"], n["roc_auc"], model_path.parent)
                return False
            log.info("new model is better: accuracy %.4f (installed %.4f), ROC-AUC %.5f "
                     "(installed %.5f)", n["accuracy"], o["accuracy"], n["roc_auc"], o["roc_auc"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.stem + ".tmp.keras")
    shutil.copyfile(model_path, tmp)
    meta_tmp = meta_path_for(target).with_name(meta_path_for(target).name + ".tmp")
    shutil.copyfile(meta_path_for(model_path), meta_tmp)
    tmp.replace(target)
    meta_tmp.replace(meta_path_for(target))
    report = report_dir_for(target)
    if report.exists():
        shutil.rmtree(report)
    shutil.copytree(report_dir_for(model_path), report)
    write_report(target, meta, evaluation)  # the card's links use the installed name
    log.info("installed %s (+ %s, %s, %s/)", target, meta_path_for(target).name,
             card_path_for(target).name, report.name)
    return True
