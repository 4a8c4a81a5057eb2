"""Which photos ``pawcam export`` sees: int8 calibration and the int8 check's validation photos.

    found = export_data(meta, [Path("../shared/dataset")])   # None: the folders are not here
    found.calibration[:3], len(found.validation)
    for images, kept in decode_batches(found.validation, settings, meta):
        ...                                                  # float32 batches, bad files skipped
    CalibrationReader(decode_batches(found.calibration, settings, meta, 16), "image")  # int8

The photos are the model's own training folders (recorded in its metadata, or given), listed
and split exactly as training did, decoded by the engine's own decode path.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from engine.config import Settings
from engine.decode import decode_limits, load_model_input
from engine.errors import ConfigError, ImageError
from engine.modelio import ModelMeta
from training.dataset import scan_sources, stratified_split

log = logging.getLogger("pawcam.export")

#: photos the int8 calibration sees (seeded sample of the training part)
CALIBRATION_IMAGES = 200


@dataclasses.dataclass(frozen=True)
class ExportData:
    """Photos for calibration (training part) and the int8 check (validation part)."""

    calibration: list[Path]
    validation: list[Path]
    validation_labels: list[int]
    source: str


def decode_batches(paths: Sequence[Path], settings: Settings, meta: ModelMeta,
                   batch: int = 32) -> Iterator[tuple[np.ndarray, list[int]]]:
    """(images, kept indices) batches decoded by the engine's own path; bad files skipped."""
    d = settings.decode
    for start in range(0, len(paths), batch):
        images, kept = [], []
        for i in range(start, min(len(paths), start + batch)):
            try:
                images.append(load_model_input(paths[i], input_size=meta.input_size,
                                               max_bytes=d.max_file_bytes,
                                               **decode_limits(d)))
                kept.append(i)
            except ImageError as exc:
                log.warning("export: skipping %s: %s", paths[i], exc)
        if images:
            yield np.stack(images).astype(np.float32), kept


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over decoded photos (one batch at a time)."""

    def __init__(self, batches: Iterator[tuple[np.ndarray, list[int]]], input_name: str) -> None:
        self.batches = batches
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        for images, _ in self.batches:
            return {self.input_name: images}
        return None


def export_data(meta: ModelMeta, data: Path | Sequence[Path] | None, *,
                calibration_images: int = CALIBRATION_IMAGES, seed: int = 0) -> ExportData | None:
    """The training photos of ``data`` (default: the folders the model was trained on).

    The validation split is rebuilt as training built it (the same folders listed by
    :func:`training.dataset.scan_sources`, the seed and fraction recorded in the metadata), so
    the int8 check runs on photos the model did not train on (exactly so when no training photo
    was skipped as unreadable). None when the folders are not available.
    """
    recorded = meta.extra.get("data") or {}
    if data:
        roots = [Path(d) for d in ([data] if isinstance(data, (str, Path)) else data)]
    elif recorded.get("sources"):
        roots = [Path(src["root"]) for src in recorded["sources"]]
    elif recorded.get("root"):
        roots = [Path(recorded["root"])]
    else:
        return None
    if not all((r / "train").is_dir() for r in roots):
        return None
    try:
        found = scan_sources(roots)
    except ConfigError as exc:
        log.warning("export: cannot list the training photos (%s)", exc)
        return None
    if tuple(found.class_names) != tuple(meta.class_names):
        log.warning("export: the data folders' classes %s are not the model's %s",
                    list(found.class_names), list(meta.class_names))
        return None
    labels = np.asarray(found.labels)
    fraction = float(recorded.get("validation_fraction", 0.1))
    split_seed = int(meta.extra.get("seed", seed))
    train_idx, val_idx = stratified_split(labels, fraction, split_seed)
    rng = np.random.default_rng(split_seed + 7)
    calib = rng.permutation(train_idx)[:calibration_images]
    return ExportData([found.files[i] for i in sorted(calib)],
                      [found.files[i] for i in val_idx], [int(labels[i]) for i in val_idx],
                      ", ".join(str(r) for r in roots))
