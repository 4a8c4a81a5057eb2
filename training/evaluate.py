"""Evaluate a saved model on a labelled folder, exactly as the engine serves it.

    loaded = load_model("models/cat_dog_model.keras")
    result = evaluate_folder(settings, loaded, Path("data/test"))
    result.metrics["accuracy"], result.metrics["ece"], result.gallery  # worst mistakes + CAMs

Images stream through :class:`engine.classifier.Classifier` (the engine's decode, batched
inference with the calibrated temperature, Grad-CAM), so the numbers measure what
``pawcam predict`` and the daemon do. Uncalibrated probabilities (for "ECE before") are
recovered from the calibrated ones: for a sigmoid unit ``z = T * logit(p)``, for a softmax
``z = T * log p`` up to a constant that the softmax ignores; probabilities are clipped at
1e-12 first, which only affects confidences already indistinguishable from 1.

The engine computes calibrated probabilities in float64 from the logits, so confident images
do not saturate to exactly 0 or 1 and the ROC ranking keeps its resolution.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.classifier import Classifier, Job, format_confidence
from engine.config import Settings, replace
from engine.decode import DecodedImage
from engine.errors import ConfigError
from engine.modelio import LoadedModel
from engine.pipeline import Pipeline
from engine.render import PictureOptions, overlay
from engine.runtime import Runtime
from training import calibration, metrics
from training.dataset import Skipped, scan_split

log = logging.getLogger(__name__)

GALLERY_SIDE = 256


@dataclass
class GalleryItem:
    path: str             # relative to the evaluated folder
    true_label: str
    predicted: str
    confidence: float
    picture: np.ndarray   # Grad-CAM overlay, RGB uint8


@dataclass
class Evaluation:
    split_dir: str
    metrics: dict[str, Any]
    reliability_before: dict[str, list]
    reliability_after: dict[str, list]
    roc: dict[str, Any]
    skipped: list[Skipped] = field(default_factory=list)
    gallery: list[GalleryItem] = field(default_factory=list)
    seconds: float = 0.0
    #: {method: faithfulness numbers} (training/explanations.py); empty when not scored
    faithfulness: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split_dir": self.split_dir,
            "metrics": self.metrics,
            "reliability_before": self.reliability_before,
            "reliability_after": self.reliability_after,
            "roc": self.roc,
            "skipped": [s.as_dict() for s in self.skipped],
            "most_confidently_wrong": [
                {"path": g.path, "true": g.true_label, "predicted": g.predicted,
                 "confidence": g.confidence} for g in self.gallery],
            "seconds": self.seconds,
            "faithfulness": self.faithfulness,
        }


def resolve_split(data: Path, split: str) -> Path:
    """``DIR`` holding ``split/`` -> ``DIR/split``; otherwise ``DIR`` itself (``<class>/`` layout)."""
    data = Path(data)
    if (data / split).is_dir():
        return data / split
    if data.is_dir():
        return data
    raise ConfigError(f"evaluation data {data} not found; pass --data DIR with DIR/{split}/<class>/ "
                      "or DIR/<class>/ folders of images")


def uncalibrated(probs: np.ndarray, temperature: float, binary: bool) -> np.ndarray:
    """Probabilities at temperature 1 recovered from calibrated ones (see module docstring)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0 - 1e-12)
    if binary:
        z = temperature * np.log(p[:, 1] / p[:, 0])
        return calibration.probabilities(z)
    return calibration.probabilities(temperature * np.log(p))


def evaluate_folder(settings: Settings, model: LoadedModel | Runtime, folder: Path,
                    gallery_size: int = 12, progress_every: int = 500) -> Evaluation:
    """Every photo of ``folder/<class>/`` through the engine's pipeline, as served.

    ``model`` is a runtime (``open_runtime(settings)``: what ``pawcam evaluate`` measures) or a
    Keras model in memory (served with TensorFlow: what training measures before export).
    """
    import time

    t0 = time.perf_counter()
    # Pictures only as overlays, small: the engine's preview is then at most GALLERY_SIDE px.
    pictures = replace(PictureOptions.from_settings(settings.gradcam),
                       outputs=("overlay",) if gallery_size > 0 else (),
                       max_side=min(settings.gradcam.max_side, GALLERY_SIDE))
    if isinstance(model, LoadedModel):
        clf = Classifier.from_settings(settings, loaded=model, pictures=pictures)
    else:
        clf = Classifier.from_settings(settings, runtime=model, pictures=pictures)
    meta = clf.meta
    layout = scan_split(folder, meta.class_names)
    n = len(layout.files)
    probs = np.zeros((n, meta.num_classes), np.float64)
    ok = np.zeros(n, bool)
    cams: dict[int, np.ndarray] = {}
    previews: dict[int, np.ndarray] = {}
    skipped: list[Skipped] = []
    jobs = [Job(p, str(p.relative_to(folder)), f"eval-{i:06d}") for i, p in enumerate(layout.files)]
    index = {job.job_id: i for i, job in enumerate(jobs)}

    def collect(job: Job, image: DecodedImage, p: np.ndarray, cam: np.ndarray | None) -> None:
        i = index[job.job_id]
        probs[i] = p
        ok[i] = True
        if cam is not None and int(meta.predicted_indices(p[None, :])[0]) != layout.labels[i]:
            cams[i] = cam
            previews[i] = image.preview if image.preview is not None else image.model_input

    def failed(job: Job, error: Exception) -> None:
        skipped.append(Skipped(job.input_path, getattr(error, "code", "image_error"), str(error)))
        log.warning("skipping %s: %s", job.input_path, error)

    batch = settings.inference.batch_size
    chunks = [jobs[i:i + batch] for i in range(0, n, batch)]
    done = 0
    with Pipeline(clf, finish=collect, on_error=failed) as pipe:
        for _, records in pipe.run(chunks):
            done += len(records)
            if progress_every and done % progress_every < len(records):
                log.info("evaluated %d/%d images", done, n)
    y = np.asarray(layout.labels, np.int64)[ok]
    p = probs[ok]
    pred = meta.predicted_indices(p)
    m = metrics.classification_metrics(y, p, pred, meta.class_names)
    raw = uncalibrated(p, meta.temperature, meta.binary)
    m["ece"] = calibration.expected_calibration_error(p, y)
    m["ece_uncalibrated"] = calibration.expected_calibration_error(raw, y)
    m["log_loss_uncalibrated"] = metrics.log_loss(y, raw)
    m["temperature"] = meta.temperature
    m["runtime"] = f"{clf.runtime.name} {clf.runtime.precision}"
    m["skipped"] = len(skipped)
    m["counts"] = {name: int((y == c).sum()) for c, name in enumerate(meta.class_names)}
    roc: dict[str, Any] = {}
    for c, name in enumerate(meta.class_names):
        if meta.binary and c == 0:
            continue
        fpr, tpr, _ = metrics.roc_curve(y == c, p[:, c])
        keep = _thin(len(fpr), 400)
        roc[name] = {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist(),
                     "auc": metrics.roc_auc(y == c, p[:, c])}
    # the most confidently wrong images, with their Grad-CAM overlays
    kept = np.flatnonzero(ok)
    wrong = [(float(probs[i, int(meta.predicted_indices(probs[i:i + 1])[0])]), int(i))
             for i in kept if i in cams]
    wrong.sort(reverse=True)
    gallery: list[GalleryItem] = []
    g = settings.gradcam
    for conf, i in wrong[:gallery_size]:
        pi = int(meta.predicted_indices(probs[i:i + 1])[0])
        caption = f"{meta.class_names[pi]} {format_confidence(conf)} (true {meta.class_names[layout.labels[i]]})"
        pic = overlay(previews[i], cams[i], alpha=g.overlay_alpha, colormap=g.colormap,
                      caption=caption)
        gallery.append(GalleryItem(jobs[i].input_path, meta.class_names[layout.labels[i]],
                                   meta.class_names[pi], conf, pic))
    seconds = time.perf_counter() - t0
    log.info("evaluated %d images in %.1f s: accuracy %.4f, ROC-AUC %.4f, ECE %.4f",
             len(y), seconds, m["accuracy"], m["roc_auc"], m["ece"])
    return Evaluation(str(folder), m, calibration.reliability_bins(raw, y),
                      calibration.reliability_bins(p, y), roc, skipped, gallery, seconds)


def _thin(n: int, most: int) -> np.ndarray:
    """At most ``most`` evenly spread indices of ``n`` points, always keeping both ends."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, most).round().astype(int))
