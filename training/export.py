"""``pawcam export``: compile a .keras model to ONNX (fp32 exact, int8 quantized) and check both.

    manifest = export_model(Path("models/cat_dog_model.keras"), settings, data=Path("data"))
    manifest.checks["fp32"]     # {"max_prob_diff": 0.0, "max_map_diff": 1e-06, "images": 64}
    manifest.checks["int8"]     # {"accuracy": .., "fp32_accuracy": .., "agreement": .., "passed": ..}

Steps, each a function:

1. :func:`serving_graph` -- the model's own layers up to the Grad-CAM feature map, with
   outputs: ``logits`` (the last Dense layer without its activation) and, when the head is
   global-average-pooling -> Dense (checked numerically: the Dense input equals the mean of the
   feature map), ``class_maps`` = the feature map projected on the Dense weights (a 1x1
   convolution), which is exactly what Grad-CAM needs, and ``positive_class_maps`` (projected
   on :func:`positive_weights`), exactly what Grad-CAM++ needs (see :mod:`engine.onnxio`).
2. Keras' own ONNX export (``model.export(format="onnx")``) writes the fp32 file.
3. :func:`check_fp32` -- ONNX Runtime's probabilities and maps against TensorFlow's Grad-CAM.
4. :func:`quantize_int8` -- ONNX Runtime static quantization (QDQ, per-channel weights),
   calibrated on a seeded sample of the training photos decoded by the engine's decode path.
5. :func:`check_int8` -- accuracy and label agreement with fp32 on the validation split (the
   photos training held out), and int8's own temperature when its logits' scale moved.
6. The manifest (hashes, outputs, checks) is written last, atomically: the runtime trusts only
   files it lists with their sha256.

The photos steps 4-5 use (the model's training folders, split as training split them) come
from :mod:`training.export_data`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from engine.config import Settings
from engine.durable import atomic_path, write_atomic
from engine.errors import ConfigError, ModelLoadError
from engine.gradcam import CLOSED_FORM_METHODS, GradCam
from engine.modelio import LoadedModel, ModelMeta, file_sha256, load_model
from engine.onnxio import ExportManifest, manifest_path_for, onnx_path_for
from engine.runtime_ort import OrtRuntime, cams_from_class_maps
from training.export_data import (CALIBRATION_IMAGES, CalibrationReader, ExportData,
                                  decode_batches, export_data)
from training.metrics import map_correlation

log = logging.getLogger("pawcam.export")

#: photos the fp32 check compares with TensorFlow
FP32_CHECK_IMAGES = 64
#: int8 passes when it loses at most this much validation accuracy against fp32 ...
INT8_MAX_ACCURACY_DROP = 0.01
#: ... and agrees with fp32's label on at least this share of the validation photos
INT8_MIN_AGREEMENT = 0.98


# -- 1. the graph -------------------------------------------------------------------------
def serving_graph(loaded: LoadedModel, target_layer: str = "") -> tuple[Any, dict[str, Any]]:
    """A Keras model ``image -> {"logits", "class_maps"?}`` and what it says about Grad-CAM."""
    import keras

    meta = loaded.meta
    cam = GradCam(loaded.model, meta, target_layer)
    h, w = meta.input_size
    image = keras.Input(shape=(h, w, 3), dtype="float32", name="image")
    acts, head_input = cam.features(image)
    head = cam.head
    outputs: dict[str, Any] = {}
    if hasattr(head, "kernel"):
        kernel = np.asarray(head.kernel)
        bias = np.asarray(head.bias) if head.use_bias else None
        dense = keras.layers.Dense(kernel.shape[1], use_bias=bias is not None, name="logits")
        outputs["logits"] = dense(head_input)
        dense.set_weights([kernel] + ([bias] if bias is not None else []))
    else:  # an Activation after a linear layer: its input already is the logits
        kernel = None
        outputs["logits"] = keras.layers.Identity(name="logits")(head_input)
    info: dict[str, Any] = {"target_layer": cam.target_layer, "exact": False}
    reason = _gap_dense_reason(cam, kernel, meta)
    if reason:
        info["reason"] = reason
        log.warning("the ONNX export will have no Grad-CAM maps: %s (TensorFlow still serves "
                    "them)", reason)
    else:
        k, units = kernel.shape
        project = keras.layers.Conv2D(units, 1, use_bias=False, name="class_maps")
        outputs["class_maps"] = project(acts)
        project.set_weights([kernel.reshape(1, 1, k, units)])
        positive = positive_weights(kernel)
        project_pp = keras.layers.Conv2D(positive.shape[1], 1, use_bias=False,
                                         name="positive_class_maps")
        outputs["positive_class_maps"] = project_pp(acts)
        project_pp.set_weights([positive.reshape(1, 1, k, positive.shape[1])])
        info["exact"] = True
        info["methods"] = list(CLOSED_FORM_METHODS)
    model = keras.Model(image, outputs, name="pawcam_serving")
    model(np.zeros((1, h, w, 3), np.float32))  # Keras exports only a model that was called
    return model, info


def positive_weights(kernel: np.ndarray) -> np.ndarray:
    """Grad-CAM++'s closed-form channel weights per class for a GAP -> Dense head (up to 1/(h w)):
    ``ReLU(W)``; one sigmoid unit explains class 0 with ``-w``: ``[ReLU(-w), ReLU(w)]``."""
    kernel = np.asarray(kernel, np.float32)
    if kernel.shape[1] == 1:
        return np.maximum(np.concatenate([-kernel, kernel], axis=1), 0.0)
    return np.maximum(kernel, 0.0)


def _gap_dense_reason(cam: GradCam, kernel: np.ndarray | None, meta: ModelMeta) -> str:
    """"" when the head input is the spatial mean of the Grad-CAM layer (exact class maps)."""
    if kernel is None:
        return "the head is not a Dense layer on pooled features"
    h, w = meta.input_size
    x = np.random.default_rng(1).uniform(0, 255, size=(2, h, w, 3)).astype(np.float32)
    acts, head_input = cam.features(x, training=False)
    acts, head_input = np.asarray(acts), np.asarray(head_input)
    if acts.ndim != 4 or head_input.shape != (2, acts.shape[-1]):
        return (f"the Dense layer does not read the Grad-CAM layer's {acts.shape[-1]} channels "
                "through global average pooling")
    if not np.allclose(acts.mean(axis=(1, 2)), head_input, rtol=1e-4, atol=1e-5):
        return "the layers between the Grad-CAM layer and the Dense head are not a global average pool"
    return ""


def export_layer(settings: Settings) -> str:
    """The one layer the export explains: ``[gradcam] target_layer`` when it names one layer,
    else "" (automatic: the last feature map; a list is for TensorFlow's multi-layer methods)."""
    layers = settings.gradcam.target_layers
    if len(layers) > 1:
        log.info("[gradcam] target_layer lists %d layers: the ONNX export explains the last "
                 "feature map (closed-form methods); the list is served by TensorFlow", len(layers))
    return layers[0] if len(layers) == 1 else ""


# -- 2-5. files and checks ------------------------------------------------------------------
def write_onnx(model: Any, path: Path) -> None:
    """Keras' ONNX export into ``path`` (atomically, durably)."""
    with atomic_path(path) as tmp:
        model.export(str(tmp), format="onnx", verbose=False)


def check_fp32(loaded: LoadedModel, runtime: OrtRuntime, images: np.ndarray,
               target_layer: str = "", methods: Sequence[str] = CLOSED_FORM_METHODS
               ) -> dict[str, Any]:
    """Largest differences between ONNX Runtime fp32 and TensorFlow (probabilities, and the
    maps of each method: ``max_map_diff`` for Grad-CAM, ``max_map_diff_<method>`` else)."""
    prob_diff = 0.0
    result: dict[str, Any] = {"images": int(len(images))}
    for method in methods if runtime.has_maps else methods[:1]:
        cam = GradCam(loaded.model, loaded.meta, target_layer, method=method)
        ort = runtime.with_method(method)
        map_diff = 0.0
        for start in range(0, len(images), 16):
            x = images[start:start + 16]
            tf_probs, tf_maps = cam(x)
            ort_probs, ort_maps = ort.run(x, maps=runtime.has_maps)
            prob_diff = max(prob_diff, float(np.abs(tf_probs - ort_probs).max()))
            if ort_maps is not None:
                map_diff = max(map_diff, float(np.abs(tf_maps - ort_maps).max()))
        if runtime.has_maps:
            result["max_map_diff" if method == "gradcam" else f"max_map_diff_{method}"] = map_diff
    result["max_prob_diff"] = prob_diff
    return result


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    """onnxruntime's quantizer logs every rescaled weight at INFO on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32: Path, int8: Path, calibration: Sequence[Path], settings: Settings,
                  meta: ModelMeta) -> None:
    """Static QDQ quantization with per-channel weights, calibrated on ``calibration``."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="pawcam-export-") as tmp, _quiet_root():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        with atomic_path(int8) as tmp_out:
            quantize_static(
                str(prepared), str(tmp_out),
                CalibrationReader(decode_batches(calibration, settings, meta, 16), "image"),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax)


def check_int8(fp32: OrtRuntime, int8: OrtRuntime, data: ExportData, settings: Settings
               ) -> dict[str, Any]:
    """int8 vs fp32 on the validation photos: accuracy, agreement, logit scale, passed."""
    meta = fp32.meta
    z32, z8, labels, correlations = [], [], [], []
    for images, kept in decode_batches(data.validation, settings, meta):
        p32, maps32 = fp32.run(images, maps=fp32.has_maps)
        z32.append(fp32.session.run(["logits"], {fp32.input_name: images})[0])
        z8.append(int8.session.run(["logits"], {int8.input_name: images})[0])
        labels.extend(data.validation_labels[i] for i in kept)
        if maps32 is not None:  # int8's map of the class fp32 predicts, against fp32's
            outputs = int8.session.run(["class_maps"], {int8.input_name: images})[0]
            maps8 = cams_from_class_maps(outputs, meta.predicted_indices(p32), meta.binary)
            correlations.extend(map_correlation(maps8, maps32))
    if not labels:
        return {"passed": False, "reason": "no validation photo could be decoded"}
    z32_all, z8_all = np.concatenate(z32), np.concatenate(z8)
    y = np.asarray(labels)
    from engine.gradcam import calibrated_probabilities

    p32 = calibrated_probabilities(z32_all, meta)
    pred32 = meta.predicted_indices(p32)
    # int8's own temperature: the least-squares scale of its logits against fp32's
    scale = float((z8_all * z32_all).sum() / max((z32_all ** 2).sum(), 1e-12))
    temperature = meta.temperature * scale if abs(scale - 1.0) > 0.02 and scale > 0 else None
    meta8 = dataclasses.replace(meta, temperature=temperature or meta.temperature)
    p8 = calibrated_probabilities(z8_all, meta8)
    pred8 = meta8.predicted_indices(p8)
    acc32, acc8 = float((pred32 == y).mean()), float((pred8 == y).mean())
    agreement = float((pred8 == pred32).mean())
    passed = acc8 >= acc32 - INT8_MAX_ACCURACY_DROP and agreement >= INT8_MIN_AGREEMENT
    result: dict[str, Any] = {}
    finite = [c for c in correlations if np.isfinite(c)]  # a constant map has no correlation
    if finite:
        result["map_correlation_mean"] = round(float(np.mean(finite)), 4)
    return result | {"images": int(len(y)), "fp32_accuracy": round(acc32, 5), "accuracy": round(acc8, 5),
            "agreement": round(agreement, 5), "logit_scale": round(scale, 5),
            "max_prob_diff": round(float(np.abs(p8 - p32).max()), 5),
            "temperature": temperature, "passed": bool(passed),
            "rule": f"accuracy >= fp32 - {INT8_MAX_ACCURACY_DROP} and agreement >= "
                    f"{INT8_MIN_AGREEMENT}"}


# -- all of it ------------------------------------------------------------------------------
def export_model(model_path: Path, settings: Settings, *,
                 data: Path | Sequence[Path] | None = None,
                 int8: bool = True, calibration_images: int = CALIBRATION_IMAGES
                 ) -> ExportManifest:
    """Write ``<model>.fp32.onnx``, ``<model>.int8.onnx`` and ``<model>.export.json``."""
    import keras
    import onnx
    import onnxruntime

    t0 = time.perf_counter()
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    model_path = Path(model_path)
    loaded = load_model(model_path)
    meta = loaded.meta
    layer = export_layer(settings)
    graph, gradcam = serving_graph(loaded, layer)
    fp32_path = onnx_path_for(model_path, "fp32")
    write_onnx(graph, fp32_path)
    files = {"fp32": {"file": fp32_path.name, "sha256": file_sha256(fp32_path)}}
    source = ExportManifest(meta.model_sha256, files, gradcam, folder=model_path.parent)
    fp32 = _runtime(source, meta, "fp32")

    found = export_data(meta, data, calibration_images=calibration_images) if int8 else None
    if found and found.validation:
        check_images = np.concatenate([x for x, _ in decode_batches(
            found.validation[:FP32_CHECK_IMAGES], settings, meta)])
    else:
        h, w = meta.input_size
        check_images = np.random.default_rng(0).uniform(
            0, 255, (16, h, w, 3)).astype(np.float32)
    checks: dict[str, Any] = {"fp32": check_fp32(loaded, fp32, check_images, layer)}
    log.info("fp32 ONNX vs TensorFlow on %d images: max probability difference %.2g%s",
             checks["fp32"]["images"], checks["fp32"]["max_prob_diff"],
             "".join(f", {k} {v:.2g}" for k, v in checks["fp32"].items()
                     if k.startswith("max_map_diff")))
    int8_temperature = None
    int8_path = onnx_path_for(model_path, "int8")
    if not int8:
        checks["int8"] = {"passed": False, "reason": "not requested (--no-int8)"}
    elif found is None or not found.calibration:
        checks["int8"] = {"passed": False, "reason": "no training photos to calibrate on; "
                                                     "pass --data DIR"}
        log.warning("int8 not exported: %s", checks["int8"]["reason"])
    else:
        log.info("quantizing to int8 (calibration: %d training photos of %s)",
                 len(found.calibration), found.source)
        quantize_int8(fp32_path, int8_path, found.calibration, settings, meta)
        files["int8"] = {"file": int8_path.name, "sha256": file_sha256(int8_path)}
        checks["int8"] = check_int8(fp32, _runtime(source, meta, "int8"), found, settings)
        checks["int8"]["calibration_images"] = len(found.calibration)
        checks["int8"]["data"] = found.source
        int8_temperature = checks["int8"]["temperature"]
        log.info("int8 vs fp32 on %d validation photos: accuracy %.4f vs %.4f, agreement %.4f: "
                 "%s", checks["int8"]["images"], checks["int8"]["accuracy"],
                 checks["int8"]["fp32_accuracy"], checks["int8"]["agreement"],
                 "passed" if checks["int8"]["passed"] else "FAILED (int8 will not be served)")
    if "int8" not in files:
        int8_path.unlink(missing_ok=True)  # never leave an int8 file the manifest does not vouch for
    manifest = dataclasses.replace(
        source, checks=checks, int8_temperature=int8_temperature,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        versions={"keras": keras.__version__, "onnx": onnx.__version__,
                  "onnxruntime": onnxruntime.__version__})
    path = manifest_path_for(model_path)
    write_atomic(path, manifest.to_json().encode("utf-8"))
    log.info("exported %s in %.1f s: %s", model_path, time.perf_counter() - t0,
             ", ".join(f["file"] for f in files.values()))
    return manifest


def _runtime(manifest: ExportManifest, meta: ModelMeta, precision: str) -> OrtRuntime:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    path = manifest.path_for(precision)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return OrtRuntime(session, meta, precision, manifest.has_maps, path)


def require_export_tools() -> None:
    """A clear error when the export's packages are missing."""
    for name in ("onnx", "onnxruntime", "tf2onnx"):
        try:
            __import__(name)
        except ImportError as exc:
            raise ConfigError(f"`pawcam export` needs {name}: pip install onnx onnxruntime "
                              "tf2onnx (or `make setup`)") from exc


__all__ = ["export_model", "serving_graph", "check_fp32", "check_int8", "quantize_int8",
           "export_data", "ModelLoadError"]
