"""What a trained model's metadata records about its run (the model card is written from it).

    extra = run_record(cfg, settings.base_dir, data, photos, weights, timing, calibration,
                       history, notes)
    meta = ModelMeta(..., version=model_version(model.get_weights()), extra=extra)
    meta = dataclasses.replace(meta, metrics=evaluation_summary(evaluation))

Sources with their counts, settings as written in config.toml, the skip list, timing per
step, calibration, every epoch, library versions and the machine: enough to reproduce the
run and for ``pawcam evaluate`` to rebuild the full card.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training.config import TrainingSettings
from training.crossfit import Calibration
from training.dataset import TrainingData
from training.evaluate import Evaluation
from training.photos import Photos


def run_record(cfg: TrainingSettings, base_dir: Path, data: TrainingData, photos: Photos,
               weights: str | None, timing: dict[str, float], calibration: Calibration,
               history: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """The ``extra`` entry of the model's metadata."""
    names = data.class_names
    return {
        "seed": cfg.seed,
        "settings": settings_dict(cfg, base_dir),
        "backbone_weights": cfg.backbone_weights if weights in (None, "imagenet") else weights,
        "data": {"root": ", ".join(str(s.root) for s in data.sources),
                 "sources": sources_info(data, photos), "test_dir": str(data.test_dir),
                 "train_counts": count(photos.y_tr, names),
                 "val_counts": count(photos.y_val, names),
                 "test_counts": data.test_layout.counts(),
                 "validation_fraction": cfg.validation_fraction},
        "skipped": [s.as_dict() for s in photos.skipped],
        "timing": {k: round(v, 1) for k, v in timing.items()},
        "calibration": calibration.as_dict(),
        "val_ece_before": calibration.ece_before, "val_ece_after": calibration.ece_after,
        "history": history,
        "versions": versions(),
        "machine": machine(),
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": notes,
    }


def model_version(weights: Sequence[np.ndarray]) -> str:
    """``YYYY.MM.DD-<sha256 of the weights, 8 hex>``: the day and what was learned."""
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes()
                                     for w in weights)).hexdigest()[:8]
    return f"{datetime.now(timezone.utc):%Y.%m.%d}-{digest}"


def sources_info(data: TrainingData, photos: Photos) -> list[dict[str, Any]]:
    """Every data folder with its files, the images used and the files skipped."""
    out = []
    for k, src in enumerate(data.sources):
        mine = photos.origin == k
        entry = src.as_dict()
        entry["used"] = count(photos.labels[mine], data.class_names)
        entry["skipped"] = int(np.sum(data.origin == k) - mine.sum()) + src.skipped
        out.append(entry)
    return out


def count(labels: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
    c = np.bincount(labels, minlength=len(names))
    return {n: int(v) for n, v in zip(names, c)}


def evaluation_summary(ev: Evaluation) -> dict[str, Any]:
    """The metadata's ``metrics``: the test-set figures (the full evaluation is in the report)."""
    m = ev.metrics
    keys = ("n", "accuracy", "roc_auc", "ece", "ece_uncalibrated", "log_loss",
            "log_loss_uncalibrated", "macro_f1", "confusion_matrix", "per_class", "skipped")
    out = {k: m[k] for k in keys}
    out["split"] = ev.split_dir
    return out


def versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    from engine import __version__

    return {"pawcam": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def machine() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return f"{os.cpu_count()} CPU core(s)" + (f", {len(gpus)} GPU(s)" if gpus else ", no GPU")


def settings_dict(cfg: TrainingSettings, base_dir: Path) -> dict[str, Any]:
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
