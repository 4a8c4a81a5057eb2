"""The compiled copies of a model on disk: ONNX files plus an export manifest beside the .keras.

    models/cat_dog_model.keras          the model (TensorFlow / Keras 3)
    models/cat_dog_model.fp32.onnx      the same graph for ONNX Runtime, float32 (exact)
    models/cat_dog_model.int8.onnx      statically quantized (QDQ, per-channel weights)
    models/cat_dog_model.export.json    ExportManifest: hashes, outputs, the export's own checks

    manifest = read_manifest("models/cat_dog_model.keras", meta)   # raises if stale or missing
    manifest.path_for("int8")                                      # Path to the .onnx file
    manifest.int8_ok                                               # recorded check passed?

Each ONNX file takes raw RGB 0-255 float32 NHWC, like the Keras model, and returns
``logits`` (N, units: the last Dense layer before its activation) and, when the model's head is
global-average-pooling -> Dense (so Grad-CAM's channel weights are exactly the Dense weights of
the explained class), ``class_maps`` (N, h, w, units): the feature map at the Grad-CAM layer
projected on each unit's Dense weights, and ``positive_class_maps`` (N, h, w, classes): the
feature map projected on the positive part of each class's weights (for one sigmoid unit,
``[ReLU(-w), ReLU(w)]``). The Grad-CAM map of the predicted class is the class map's slice
(sign-flipped for the negative class of a sigmoid unit), ReLU'd and normalised; the Grad-CAM++
map the positive map's slice (its closed form for this head): see
:func:`engine.runtime_ort.cams_from_class_maps` and :func:`~engine.runtime_ort.cams_from_positive_maps`.

This module reads and checks; training/export.py writes. Nothing here imports TensorFlow.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.modelio import ModelMeta, file_sha256

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "pawcam-export/1"
ONNX_PRECISIONS = ("fp32", "int8")
HOW_TO_EXPORT = ("run `pawcam export --model {model}` (or `make export`) to compile it again, or "
                 "serve with TensorFlow: [inference] runtime = \"tensorflow\" / --runtime tensorflow")


def onnx_path_for(model_path: str | Path, precision: str) -> Path:
    """``models/x.keras`` + ``"int8"`` -> ``models/x.int8.onnx``."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.{precision}.onnx")


def manifest_path_for(model_path: str | Path) -> Path:
    """``models/x.keras`` -> ``models/x.export.json``."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.export.json")


@dataclass(frozen=True)
class ExportManifest:
    """What ``pawcam export`` wrote and what it measured (the JSON beside the model)."""

    #: sha256 of the .keras file these ONNX files were compiled from
    keras_sha256: str
    #: precision -> {"file": name beside the model, "sha256": ...}
    files: dict[str, dict[str, str]]
    #: whether the graphs return ``class_maps`` (exact Grad-CAM), and why not when they don't
    gradcam: dict[str, Any]
    #: the export's own checks: "fp32" (vs Keras) and "int8" (vs fp32 on the validation split)
    checks: dict[str, Any] = field(default_factory=dict)
    #: int8's own temperature (its logits are on a slightly different scale), or None
    int8_temperature: float | None = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    #: the .keras file's folder (not stored: set when read)
    folder: Path = field(default=Path("."), compare=False)

    @property
    def has_maps(self) -> bool:
        return bool(self.gradcam.get("exact"))

    @property
    def methods(self) -> tuple[str, ...]:
        """The ``[gradcam] method`` values the graphs serve (older exports: Grad-CAM only)."""
        if not self.has_maps:
            return ()
        return tuple(self.gradcam.get("methods") or (self.gradcam.get("method") or "gradcam",))

    @property
    def int8_ok(self) -> bool:
        """int8 exists and its recorded check passed (never use it silently otherwise)."""
        return "int8" in self.files and bool(self.checks.get("int8", {}).get("passed"))

    def int8_refusal(self) -> str:
        """Why int8 cannot be used ("" when it can)."""
        if "int8" not in self.files:
            return "no int8 file was exported (" + str(
                self.checks.get("int8", {}).get("reason", "pass --data to calibrate it")) + ")"
        if not self.int8_ok:
            c = self.checks.get("int8", {})
            return (f"its recorded check failed (accuracy {c.get('accuracy')} vs fp32 "
                    f"{c.get('fp32_accuracy')}, label agreement {c.get('agreement')})")
        return ""

    def path_for(self, precision: str) -> Path:
        return self.folder / self.files[precision]["file"]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("folder")
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def read_manifest(model_path: str | Path, meta: ModelMeta, *, verify: tuple[str, ...] = ()
                  ) -> ExportManifest:
    """Read the export manifest of ``model_path`` and check it still belongs to the model.

    ``verify`` lists precisions whose ONNX file must exist with the recorded sha256. Raises
    :class:`ModelLoadError` saying to run ``pawcam export`` when anything is missing or stale.
    """
    model_path = Path(model_path)
    how = HOW_TO_EXPORT.format(model=model_path)
    path = manifest_path_for(model_path)
    if not path.is_file():
        raise ModelLoadError(f"{model_path} has no ONNX export ({path.name} not found); {how}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("folder", None)
        manifest = ExportManifest(**data, folder=model_path.parent)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise ModelLoadError(f"export manifest {path} is unreadable ({exc}); {how}") from exc
    if manifest.format != MANIFEST_FORMAT:
        raise ModelLoadError(f"export manifest {path} has format {manifest.format!r}, not "
                             f"{MANIFEST_FORMAT!r}; {how}")
    if not meta.model_sha256 or manifest.keras_sha256 != meta.model_sha256:
        raise ModelLoadError(f"the ONNX export beside {model_path} is stale: it was compiled from "
                             "another version of the model; " + how)
    for precision in verify:
        if precision not in manifest.files:
            raise ModelLoadError(f"{model_path} has no {precision} ONNX file; {how}")
        onnx = manifest.path_for(precision)
        if not onnx.is_file():
            raise ModelLoadError(f"{onnx} not found; {how}")
        if file_sha256(onnx) != manifest.files[precision]["sha256"]:
            raise ModelLoadError(f"{onnx} does not match its export manifest (sha256 differs: "
                                 f"replaced or corrupted); {how}")
    return manifest
