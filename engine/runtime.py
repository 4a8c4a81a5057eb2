"""Runtimes: what runs the model. One small interface, two implementations.

    runtime = open_runtime(settings)            # picks by [inference] runtime / precision
    probs, cams = runtime.run(batch, maps=True) # (N, C) float64, (N, h, w) float32 in [0, 1]
    runtime.name, runtime.precision, runtime.meta

- ``tensorflow`` (:mod:`engine.runtime_tf`): the .keras model and the batched Grad-CAM with
  TensorFlow's gradients; the GPU path, and the fallback for any head.
- ``onnxruntime`` (:mod:`engine.runtime_ort`): the ONNX files ``pawcam export`` compiled beside
  the model (fp32 exact, int8 quantized). It never imports TensorFlow: a serving process starts
  in a fraction of a second and of the memory.

``auto`` picks TensorFlow when a GPU is visible and ONNX Runtime otherwise; precision ``auto``
picks int8 when its recorded check passed and fp32 otherwise. An explicit choice that cannot be
honoured is a :class:`ModelLoadError` saying what to do; ``auto`` falls back with a warning.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.config import Settings
from engine.errors import ModelLoadError
from engine.modelio import ModelMeta

log = logging.getLogger(__name__)


class Runtime(Protocol):
    """The model as the pipeline sees it: a batch of pixels in, probabilities and maps out."""

    name: str          # "tensorflow" | "onnxruntime"
    precision: str     # "fp32" | "int8" | "mixed" ...
    meta: ModelMeta
    #: whether :meth:`run` can return Grad-CAM maps
    has_maps: bool

    def run(self, images: np.ndarray, maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """``images`` (N, H, W, 3) RGB 0-255 (uint8 or float32) -> calibrated probabilities
        (N, C) float64 and, with ``maps``, the predicted class's Grad-CAM maps (N, h, w)."""
        ...

    def describe(self) -> str:
        """One line for logs and status: ``onnxruntime int8 (CPU)``."""
        ...


def gpu_visible() -> bool:
    """An NVIDIA GPU is present and not hidden by CUDA_VISIBLE_DEVICES (no TensorFlow import)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def choose_runtime(settings: Settings) -> str:
    """``auto`` -> "tensorflow" with a GPU in play, else "onnxruntime"."""
    choice = settings.inference.runtime
    if choice != "auto":
        return choice
    if settings.device.device.startswith("gpu"):
        return "tensorflow"
    if settings.device.device == "cpu":
        return "onnxruntime"
    return "tensorflow" if gpu_visible() else "onnxruntime"


def open_runtime(settings: Settings, *, model_path: str | Path | None = None,
                 need_maps: bool | None = None) -> Runtime:
    """Open the runtime the settings ask for, falling back only where ``auto`` allows it.

    ``need_maps`` (default: pictures are on) makes a runtime that cannot produce exact Grad-CAM
    maps for this model unacceptable: ``auto`` then uses TensorFlow, ``onnxruntime`` refuses.
    """
    from engine.cam_methods import CLOSED_FORM_METHODS

    path = Path(model_path or settings.model.path)
    if need_maps is None:
        need_maps = bool(settings.gradcam.active_outputs)
    name = choose_runtime(settings)
    method = settings.gradcam.method
    explicit = settings.inference.runtime == "onnxruntime"
    if name == "onnxruntime" and need_maps and method not in CLOSED_FORM_METHODS:
        why = (f"[gradcam] method = \"{method}\" needs TensorFlow's gradients at layers below "
               f"the last feature map; the ONNX export serves {' and '.join(CLOSED_FORM_METHODS)}")
        if explicit:
            raise ModelLoadError(f"{why}: use [inference] runtime = \"tensorflow\" (or \"auto\"), "
                                 "or one of those methods")
        log.info("%s, so it is served by TensorFlow (slower start and throughput on a CPU)", why)
        name = "tensorflow"
    if name == "onnxruntime":
        try:
            from engine.runtime_ort import OrtRuntime

            runtime = OrtRuntime.open(path, settings, need_maps=need_maps)
            log.info("serving with %s", runtime.describe())
            return runtime
        except ModelLoadError as exc:
            if explicit:
                raise
            log.warning("ONNX Runtime not used: %s; serving with TensorFlow instead (slower "
                        "start and throughput on a CPU)", exc)
    if importlib.util.find_spec("tensorflow") is None:
        raise ModelLoadError("TensorFlow is not installed (the base install serves with ONNX "
                             "Runtime only): pip install 'pawcam[train]', or fix the ONNX export "
                             "as said above (`pawcam export` needs the train extra too)")
    from engine.runtime_tf import TfRuntime

    runtime = TfRuntime.open(path, settings)
    log.info("serving with %s", runtime.describe())
    return runtime
