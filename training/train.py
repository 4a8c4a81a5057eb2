"""``pawcam train``: folder(s) of labelled photos -> calibrated model + report, in a run folder.

    result = train(settings, TrainOptions(data=[Path("../shared/dataset"),
                                                Path("../shared/dataset-extra")]))
    result.model_path      # runs/20261124-153000/model.keras (+ .json, .md, _report/)
    result.installed       # True when copied to [training] install_to

:func:`train` runs these steps in order, each a function below, each logged with its time.
Memory does not grow with the number of photos: images, activations and features live in
record files under ``RUN/cache/`` (:mod:`training.cache`) and are streamed one batch at a time.

1. :func:`scan_sources` lists ``DIR/train/<class>/`` of every data folder and the one
   ``test/<class>/`` (:mod:`training.dataset`).
2. :func:`start_run` makes the run folder, seeds every generator, picks the device.
3. :func:`cache_decoded_photos` decodes every training file once with the engine's own
   decoder into ``cache/images/`` (unusable files are skipped and listed) and carves a
   stratified, seeded validation split (:mod:`training.photos`).
4. :func:`build_network`: MobileNetV2 -> pooling -> dropout -> Dense (:mod:`training.model`).
5. :func:`train_head_phase`: phase 1, the head on cached backbone features (with
   ``fine_tune_cache``, first :func:`cache_frozen_activations`).
6. :func:`fine_tune_phase`: phase 2, the top blocks at a low learning rate, kept only if it
   beats phase 1 (:mod:`training.phases` explains both phases; :mod:`training.callbacks` the
   epoch log ``log.csv``, checkpoints and early stopping).
7. :func:`calibrate`: one temperature fitted on the validation logits + cross-fitted phase-1
   logits of the training part (:mod:`training.crossfit`).
8. :func:`save_trained_model`: a clean serving copy with its metadata (:mod:`training.runinfo`)
   as ``RUN/model.keras``; the cache is removed unless ``[training] keep_cache``.
9. :func:`evaluate_on_test`: the saved model on ``DIR/test`` through the engine, the report
   and the model card (:mod:`training.report`).
10. :func:`install_model` to ``[training] install_to`` per ``[training] install``
    (``if_better`` by default: :mod:`training.install`).
11. :func:`export_for_serving`: the ONNX copies the CPU runtime serves, beside the installed
    model (or the run's model when not installed); a failed export is logged, not fatal.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

from engine.config import Settings
from engine.modelio import ModelMeta, load_model, meta_path_for, save_model, write_meta
from training import cache, model as model_lib
from training.callbacks import start_epoch_log
from training.config import TrainingSettings, training_settings
from training.crossfit import Calibration, Features, calibrate_model
from training.dataset import TrainingData, scan_sources
from training.evaluate import Evaluation, evaluate_folder
from training.install import install_model, is_better  # noqa: F401  (is_better: public here too)
from training.phases import (Activations, EpochLog, PhaseResult, cache_activations,
                             cache_features, fine_tune, train_head)
from training.photos import Photos, decode_to_cache, split_photos
from training.pipeline import logits_from
from training.report import write_report
from training.runinfo import evaluation_summary, model_version, run_record

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    data: Path | Sequence[Path]          # one data folder or several (see scan_sources)
    run_dir: Path | None = None
    install: str | None = None          # overrides [training] install
    export: bool = True                 # ONNX copies for the CPU runtime at the end


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    meta: ModelMeta
    evaluation: Evaluation
    installed: bool
    install_path: Path
    train_seconds: float


@dataclass
class Run:
    """What every step of one training run shares: settings, folders, clock, notes."""
    settings: Settings
    cfg: TrainingSettings
    folder: Path
    device: str
    weights: str | None                 # backbone weights: None (random), "imagenet" or a file
    epoch_log: EpochLog
    t_start: float = field(default_factory=time.perf_counter)
    timing: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def cache_root(self) -> Path:
        return self.folder / "cache"

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timing[key] = time.perf_counter() - t


def train(settings: Settings, options: TrainOptions) -> TrainResult:
    """Train, calibrate, evaluate, install and export a model: the steps listed above."""
    import tensorflow as tf

    cfg = training_settings(settings)
    data = scan_sources(_roots(options.data))
    run = start_run(settings, cfg, options.run_dir)
    photos = cache_decoded_photos(run, data)
    with tf.device(run.device):
        model = build_network(run, data, photos)
        acts = (cache_frozen_activations(run, model, photos)
                if cfg.fine_tune_epochs > 0 and cfg.fine_tune_cache else None)
        features, head = train_head_phase(run, model, photos, acts)
        tuned = fine_tune_phase(run, model, photos, acts, head)
        calibration = calibrate(run, model, photos, acts, features, head, tuned)
        clean = serving_copy(run, model, len(data.class_names))
    stop_clock(run, photos, acts, features)
    model_path = save_trained_model(run, clean, data, photos, calibration)
    evaluation, meta = evaluate_on_test(run, model_path, data.test_dir)
    installed = install_model(settings, model_path, meta, evaluation, cfg.install_to,
                              options.install or cfg.install)
    if options.export:
        export_for_serving(settings, cfg.install_to if installed else model_path, options.data)
    return TrainResult(run.folder, model_path, meta, evaluation, installed, cfg.install_to,
                       run.timing["train_seconds"])


def start_run(settings: Settings, cfg: TrainingSettings, run_dir: Path | None) -> Run:
    """The run folder (``[training] output_dir/<date-time>`` unless given), seeds, device."""
    import keras
    import tensorflow as tf

    from engine.device import configure_device

    weights = cfg.weights_spec(settings.base_dir)
    t_start = time.perf_counter()
    folder = Path(run_dir) if run_dir else (
        cfg.output_dir / datetime.now().strftime("%Y%m%d-%H%M%S"))
    epoch_log = EpochLog(folder / "log.csv", folder / "checkpoints")
    epoch_log.ckpt_dir.mkdir(parents=True, exist_ok=True)
    log.info("run folder: %s", folder)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    device = configure_device(settings.device)
    return Run(settings, cfg, folder, device, weights, epoch_log, t_start)


def cache_decoded_photos(run: Run, data: TrainingData) -> Photos:
    """Step 3: every training file decoded once into ``cache/images/``; the split."""
    log.info("classes %s; %d training files from %d folder(s), %d test files in %s",
             list(data.class_names), len(data.files), len(data.sources),
             len(data.test_layout.files), data.test_dir)
    with run.timed("decode_seconds"):
        display = [os.path.relpath(f, data.sources[k].root.parent)
                   for f, k in zip(data.files, data.origin)]
        images = decode_to_cache(data.files, data.stamps, run.cache_root / "images",
                                 input_size=run.cfg.input_size, decode=run.settings.decode,
                                 threads=run.settings.inference.threads, display=display)
        if data.skipped + images.skipped:
            log.warning("pre-scan skipped %d training file(s); see the report",
                        len(data.skipped + images.skipped))
        photos = split_photos(data, images, validation_fraction=run.cfg.validation_fraction,
                              seed=run.cfg.seed)
    start_epoch_log(run.epoch_log.csv_path)
    log.info("%s %d images in %.1f s (%d train, %d validation, %d skipped)",
             "reused the cache of" if images.reused else "decoded", len(photos.labels),
             run.timing["decode_seconds"], len(photos.train_idx), len(photos.val_idx),
             len(photos.skipped))
    return photos


def build_network(run: Run, data: TrainingData, photos: Photos) -> Any:
    """Step 4: the model; a random backbone gets BatchNorm statistics from training images."""
    import numpy as np

    cfg = run.cfg
    model = model_lib.build_model(len(data.class_names), cfg.input_size, cfg.alpha, run.weights,
                                  cfg.dropout)
    if run.weights is None:
        sample = np.random.default_rng(cfg.seed).permutation(photos.train_idx)[:64]
        model_lib.init_batchnorm_statistics(model, photos.reader.read(np.sort(sample)))
        log.info("random backbone: BatchNorm statistics set from %d training images",
                 len(sample))
    return model


def cache_frozen_activations(run: Run, model: Any, photos: Photos) -> Activations:
    """Step 5a (``fine_tune_cache``): the frozen bottom's output, once, in ``cache/``."""
    with run.timed("activation_seconds"):
        acts = cache_activations(model, photos, run.cfg, run.weights,
                                 run.cache_root / "activations")
    log.info("activations at %s (%s, float16) in %.1f s", run.cfg.fine_tune_from,
             acts.orig.shape, run.timing["activation_seconds"])
    return acts


def train_head_phase(run: Run, model: Any, photos: Photos, acts: Activations | None
                     ) -> tuple[Features | None, PhaseResult | None]:
    """Step 5: phase 1, backbone features cached, then the head trained on them."""
    if run.cfg.head_epochs <= 0:
        return None, None
    with run.timed("feature_seconds"):
        features = cache_features(model, photos, acts, run.cfg.flip,
                                  run.cache_root / "features")
    log.info("backbone features for phase 1 in %.1f s", run.timing["feature_seconds"])
    with run.timed("head_seconds"):
        head = train_head(model, features, photos, run.cfg, run.epoch_log)
    return features, head


def fine_tune_phase(run: Run, model: Any, photos: Photos, acts: Activations | None,
                    head: PhaseResult | None) -> PhaseResult | None:
    """Step 6: phase 2, fine-tuning; phase 1's weights stay when it does not beat them."""
    if run.cfg.fine_tune_epochs <= 0:
        return None
    with run.timed("fine_tune_seconds"):
        tuned = fine_tune(model, photos, acts, run.cfg, run.epoch_log,
                          head.best if head is not None else None)
    if not tuned.improved:
        run.notes.append("fine-tuning did not improve validation loss; the phase-1 weights "
                         "were kept")
    return tuned


def calibrate(run: Run, model: Any, photos: Photos, acts: Activations | None,
              features: Features | None, head: PhaseResult | None,
              tuned: PhaseResult | None) -> Calibration:
    """Step 7: the temperature of the final model."""
    with run.timed("calibration_seconds"):
        kernel, bias = model_lib.classifier_weights(model)
        fn, records = ((acts.top_features, acts.orig) if acts is not None
                       else (model_lib.feature_model(model), photos.reader))
        val_logits = logits_from(fn, records, photos.val_idx, kernel, bias)
        return calibrate_model(run.cfg, val_logits, photos.y_val, features, photos.y_tr,
                               head.best_epoch if head is not None else 1,
                               model_lib.num_classes(model),
                               fine_tuned=tuned is not None and tuned.improved)


def serving_copy(run: Run, model: Any, num_classes: int) -> Any:
    """A clean copy for serving: no optimizer state, nothing trainable-specific."""
    cfg = run.cfg
    clean = model_lib.build_model(num_classes, cfg.input_size, cfg.alpha, None, cfg.dropout)
    clean.set_weights(model.get_weights())
    return clean


def stop_clock(run: Run, photos: Photos, acts: Activations | None,
               features: Features | None) -> None:
    """Training is over: close the cache files, record the training time."""
    photos.reader.close()
    for readers in (acts, features):
        if readers is not None:
            readers.close()
    run.timing["train_seconds"] = time.perf_counter() - run.t_start
    log.info("training took %.1f min", run.timing["train_seconds"] / 60)


def save_trained_model(run: Run, clean: Any, data: TrainingData, photos: Photos,
                       calibration: Calibration) -> Path:
    """Step 8: ``RUN/model.keras`` + its metadata; the cache goes unless ``keep_cache``."""
    cfg = run.cfg
    extra = run_record(cfg, run.settings.base_dir, data, photos, run.weights, run.timing,
                       calibration, run.epoch_log.rows, run.notes)
    meta = ModelMeta(class_names=data.class_names, input_size=cfg.input_size,
                     temperature=calibration.temperature,
                     version=model_version(clean.get_weights()),
                     target_layer=model_lib.TARGET_LAYER, extra=extra)
    model_path = save_model(clean, meta, run.folder / "model.keras")
    log.info("model saved: %s (version %s)", model_path, meta.version)
    if not cfg.keep_cache:
        cache.remove(run.cache_root)
        log.info("removed the training cache %s ([training] keep_cache = false)", run.cache_root)
    return model_path


def evaluate_on_test(run: Run, model_path: Path, test_dir: Path
                     ) -> tuple[Evaluation, ModelMeta]:
    """Step 9: the saved model on the test split through the engine; metrics, report, card."""
    loaded = load_model(model_path)
    evaluation = evaluate_folder(run.settings, loaded, test_dir, run.cfg.gallery_size)
    meta = dataclasses.replace(loaded.meta, metrics=evaluation_summary(evaluation))
    _write_meta(model_path, meta)   # keeps model_sha256
    write_report(model_path, meta, evaluation)
    return evaluation, meta


def export_for_serving(settings: Settings, model_path: Path,
                       data: Path | Sequence[Path]) -> None:
    """Step 11: the compiled copies the CPU runtime serves, beside the model training left
    behind. A failure is logged: the model itself is saved and TensorFlow can serve it."""
    from training.export import export_model

    try:
        manifest = export_model(model_path, settings, data=data)
    except Exception as exc:
        log.error("ONNX export of %s failed (%s: %s); the model is saved and TensorFlow can "
                  "serve it; run `pawcam export --model %s` to retry", model_path,
                  type(exc).__name__, exc, model_path)
        return
    log.info("exported ONNX copies beside %s (int8 %s)", model_path,
             "ready" if manifest.int8_ok else "not served")


def _write_meta(model_path: Path, meta: ModelMeta) -> None:
    write_meta(model_path, meta)


def _roots(data: Path | Sequence[Path]) -> list[Path]:
    return [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(d) for d in data]
