"""The ONNX Runtime runtime: the compiled model ``pawcam export`` wrote, without TensorFlow.

    runtime = OrtRuntime.open(Path("models/cat_dog_model.keras"), settings, need_maps=True)
    probs, cams = runtime.run(batch, maps=True)     # same answers as TensorFlow's

The graph returns the logits and, for a global-average-pooling -> Dense head, each unit's class
map and each class's positive-weight map (see :mod:`engine.onnxio`): Grad-CAM and Grad-CAM++ in
closed form, no gradient needed. Probabilities and the predicted class's map are formed
here with the same math as :mod:`engine.gradcam` (float64 calibrated probabilities, the
predicted-class sign rule, ReLU, per-map normalisation).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from engine.config import Settings
from engine.errors import ModelLoadError
from engine.gradcam import calibrated_probabilities
from engine.modelio import ModelMeta, file_sha256, read_meta
from engine.onnxio import HOW_TO_EXPORT, ExportManifest, read_manifest

log = logging.getLogger(__name__)


def cams_from_class_maps(class_maps: np.ndarray, predicted: np.ndarray, binary: bool
                         ) -> np.ndarray:
    """Grad-CAM maps (N, h, w) in [0, 1] of the ``predicted`` classes from ``class_maps``.

    ``class_maps[n, :, :, u] = sum_k A[n, :, :, k] * W[k, u]`` (W: the Dense kernel). For a GAP
    head, Grad-CAM's channel weights of unit ``u`` are ``W[:, u] / (h * w)``, so the map is this
    slice up to a positive factor, which the normalisation removes. A single sigmoid unit
    explains the negative class with ``-z``, hence the sign flip.
    """
    maps = np.asarray(class_maps, dtype=np.float32)
    predicted = np.asarray(predicted)
    if binary:
        sign = np.where(predicted == 1, 1.0, -1.0).astype(np.float32)
        cams = maps[..., 0] * sign[:, None, None]
    else:
        cams = np.take_along_axis(maps, predicted.reshape(-1, 1, 1, 1), axis=3)[..., 0]
    cams = np.maximum(cams, 0.0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0).astype(np.float32)


def cams_from_positive_maps(positive_maps: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Grad-CAM++ maps (N, h, w) in [0, 1] of the ``predicted`` classes (closed form).

    ``positive_maps[n, :, :, c] = sum_k A[n, :, :, k] * ReLU(v[k, c])`` with ``v`` the explained
    score's Dense weights (``W[:, c]``; for one sigmoid unit column 0 is ``-w``, column 1 ``+w``).
    For a GAP head the gradient ``g = v / (h w)`` is the same at every position, so Grad-CAM++'s
    ``alpha = g^2 / (2 g^2 + sum A g^3)`` is constant over positions and, normalised to sum 1,
    equals ``1 / (h w)``: the channel weight ``sum_ij alpha ReLU(g)`` is ``ReLU(v) / (h w)``.
    """
    maps = np.asarray(positive_maps, np.float32)
    idx = np.asarray(predicted).reshape(-1, 1, 1, 1)
    cams = np.maximum(np.take_along_axis(maps, idx, axis=3)[..., 0], 0.0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0).astype(np.float32)


#: ONNX Runtime hands out an operator's work in shrinking blocks (``session.dynamic_block_base``)
#: instead of one equal share per thread, so a thread that the decode and picture threads (or
#: another process) preempt holds the others up less: measured 4-5 % less CPU and 11-26 % more
#: photos/s for a bulk run with pictures on the busy 2-core machine, in three interleaved runs.
DYNAMIC_BLOCK_BASE = 4
#: method -> the graph output that serves it
METHOD_OUTPUTS = {"gradcam": "class_maps", "gradcampp": "positive_class_maps"}


def choose_precision(requested: str, manifest: ExportManifest) -> str:
    """``auto`` -> int8 when its recorded check passed, else fp32; ``int8`` must have passed."""
    if requested == "fp32":
        return "fp32"
    refusal = manifest.int8_refusal()
    if requested == "int8":
        if refusal:
            raise ModelLoadError(f"int8 cannot be used: {refusal}; use precision \"fp32\" (or "
                                 "\"auto\"), or export again with more calibration data")
        return "int8"
    if refusal:
        log.warning("int8 not used: %s; serving fp32", refusal)
        return "fp32"
    return "int8"


class OrtRuntime:
    name = "onnxruntime"

    def __init__(self, session, meta: ModelMeta, precision: str, has_maps: bool,
                 source: Path, method: str = "gradcam") -> None:
        self.session = session
        self.method = method
        self.meta = meta
        self.precision = precision
        self.has_maps = has_maps
        self.source = source
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        if "logits" not in self.output_names:
            raise ModelLoadError(f"{source} has no 'logits' output; "
                                 + HOW_TO_EXPORT.format(model=source))
        if has_maps and METHOD_OUTPUTS.get(method) not in self.output_names:
            raise ModelLoadError(f"{source} cannot serve [gradcam] method = \"{method}\" (no "
                                 f"{METHOD_OUTPUTS.get(method, method)!r} output); "
                                 + HOW_TO_EXPORT.format(model=source))

    @classmethod
    def open(cls, model_path: Path, settings: Settings, *, need_maps: bool) -> "OrtRuntime":
        """Open the export beside ``model_path`` (checked against the model's metadata)."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError("onnxruntime is not installed; pip install onnxruntime (or "
                                 "`make setup`), or use [inference] runtime = \"tensorflow\"") from exc
        meta = read_meta(model_path)
        if model_path.is_file() and meta.model_sha256 and file_sha256(model_path) != meta.model_sha256:
            raise ModelLoadError(f"{model_path} and its metadata do not belong together; copy "
                                 "both files from the same training run, then `pawcam export`")
        manifest = read_manifest(model_path, meta)
        if need_maps and not manifest.has_maps:
            raise ModelLoadError(
                "this model's head has no exact Grad-CAM in the ONNX export ("
                f"{manifest.gradcam.get('reason', 'not exported')}); serve it with TensorFlow "
                "([inference] runtime = \"tensorflow\") or without pictures (--no-gradcam)")
        wanted = settings.gradcam.target_layers
        if len(wanted) > 1 or (wanted and manifest.gradcam.get("target_layer") not in (None, *wanted)):
            raise ModelLoadError(
                f"[gradcam] target_layer = {settings.gradcam.target_layer!r} but the ONNX export "
                f"explains {manifest.gradcam.get('target_layer')!r}; clear target_layer, or use "
                "[inference] runtime = \"tensorflow\"")
        method = settings.gradcam.method
        if need_maps and method not in manifest.methods:
            raise ModelLoadError(
                f"the ONNX export beside {model_path} serves {', '.join(manifest.methods)}, not "
                f"[gradcam] method = \"{method}\"; " + HOW_TO_EXPORT.format(model=model_path))
        precision = choose_precision(settings.inference.precision, manifest)
        read_manifest(model_path, meta, verify=(precision,))  # the file we load is the one checked
        if precision == "int8" and manifest.int8_temperature:
            meta = dataclasses.replace(meta, temperature=float(manifest.int8_temperature))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if settings.inference.model_threads:
            options.intra_op_num_threads = settings.inference.model_threads
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if settings.inference.model_spin else "0")
        options.add_session_config_entry("session.dynamic_block_base", str(DYNAMIC_BLOCK_BASE))
        onnx_path = manifest.path_for(precision)
        try:
            session = ort.InferenceSession(str(onnx_path), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a corrupt file
            raise ModelLoadError(f"cannot load {onnx_path} ({type(exc).__name__}: {exc}); "
                                 + HOW_TO_EXPORT.format(model=model_path)) from exc
        served = manifest.has_maps and method in manifest.methods  # else: probabilities only
        return cls(session, meta, precision, served, onnx_path, method)

    def with_method(self, method: str) -> "OrtRuntime":
        """The same session explaining with ``method`` (one of :data:`METHOD_OUTPUTS`)."""
        return type(self)(self.session, self.meta, self.precision, self.has_maps, self.source,
                          method)

    def run(self, images: np.ndarray, maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.asarray(images, dtype=np.float32)
        want = ["logits", METHOD_OUTPUTS[self.method]] if maps and self.has_maps else ["logits"]
        outputs = self.session.run(want, {self.input_name: batch})
        probs = calibrated_probabilities(outputs[0], self.meta)
        if len(outputs) == 1:
            return probs, None
        predicted = self.meta.predicted_indices(probs)
        if self.method == "gradcampp":
            return probs, cams_from_positive_maps(outputs[1], predicted)
        return probs, cams_from_class_maps(outputs[1], predicted, self.meta.binary)

    def describe(self) -> str:
        maps = f", {self.method}" if self.has_maps else ""
        return f"onnxruntime {self.precision} (CPU, {self.source.name}{maps})"
