"""The TensorFlow runtime: the .keras model and its maps with TensorFlow's gradients.

    runtime = TfRuntime.open(Path("models/cat_dog_model.keras"), settings)
    probs, cams = runtime.run(batch, maps=True)

The GPU path (``[device]``), the path of the methods that need gradients below the last
feature map (``layercam``), and the reference the ONNX runtime is checked against.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.config import Settings
from engine.device import configure_device
from engine.modelio import LoadedModel, load_model


class TfRuntime:
    name = "tensorflow"
    precision = "fp32"
    has_maps = True

    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self.device = configure_device(settings.device)  # imports TensorFlow quietly
        import tensorflow as tf

        from engine.gradcam import GradCam

        with tf.device(self.device):
            self.loaded = loaded
            self.meta = loaded.meta
            self.cam = GradCam(loaded.model, loaded.meta, settings.gradcam.target_layers,
                               method=settings.gradcam.method)

    @classmethod
    def open(cls, path: Path, settings: Settings) -> "TfRuntime":
        configure_device(settings.device)  # before the model is built
        return cls(load_model(path), settings)

    def run(self, images: np.ndarray, maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import tensorflow as tf

        batch = np.asarray(images, dtype=np.float32)
        with tf.device(self.device):
            if maps:
                return self.cam(batch)
            return self.cam.probabilities(batch), None

    def describe(self) -> str:
        return (f"tensorflow fp32 ({self.device.strip('/')}, {self.cam.method} at "
                f"{self.cam.target_layer})")
