"""Each method's maps against an independent implementation: tf-keras-vis (Gradcam,
GradcamPlusPlus, Layercam), on the shipped model and 32 real test photos.

tf-keras-vis 0.8.7 runs on Keras 3 / TensorFlow 2.21 as it is (the ``dev`` extra installs it);
skipped where it is missing, and where ../shared is absent. Its maps are computed on the model
with the sigmoid replaced by a linear output (``ReplaceToLinear``) and ``BinaryScore`` (+logit
for "dog", -logit for "cat"): the same pre-activation score pawcam explains. tf-keras-vis
normalises min-max and pawcam by the maximum after the same ReLU, so the raw maps are compared
after pawcam's normalisation, and by correlation (blind to any affine rescaling).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tf_keras_vis", reason="tf-keras-vis is not installed (the dev extra)")

pytestmark = [pytest.mark.shared, pytest.mark.slow]

MODEL = Path(__file__).resolve().parents[1] / "models" / "cat_dog_model.keras"
LAYERCAM_LAYERS = ["out_relu", "block_13_expand_relu", "block_6_expand_relu"]


def _relu_max(maps: np.ndarray) -> np.ndarray:
    maps = np.maximum(np.asarray(maps, np.float64), 0.0)
    peak = maps.max(axis=(1, 2), keepdims=True)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(axis=1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


@pytest.fixture(scope="module")
def shipped(shared_dir):
    from engine.config import load_settings
    from engine.modelio import load_model
    from training.explanations import load_photos, sample_photos

    loaded = load_model(MODEL)
    settings = load_settings(Path("config.toml"), required=False)
    paths = sample_photos(shared_dir / "dataset" / "test", loaded.meta.class_names, 32, seed=7)
    photos, _ = load_photos(paths, settings, loaded.meta.input_size)
    return loaded, photos.astype(np.float32)


@pytest.mark.parametrize("method,layers", [
    ("gradcam", ["out_relu"]), ("gradcam", ["block_13_expand_relu"]),
    ("gradcampp", ["out_relu"]), ("gradcampp", ["block_13_expand_relu"]),
    ("layercam", ["block_6_expand_relu"]), ("layercam", LAYERCAM_LAYERS),
])
def test_maps_equal_tf_keras_vis(shipped, method, layers):
    """Per layer: the same map. Several layers: tf-keras-vis's per-layer maps fused the way
    pawcam fuses them (each normalised, bilinear to the finest grid, averaged, normalised)."""
    import tensorflow as tf
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.layercam import Layercam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import BinaryScore

    from engine.gradcam import GradCam, fuse_maps

    loaded, x = shipped
    ours_cam = GradCam(loaded.model, loaded.meta, layers, method=method)
    probs, ours = ours_cam(x)
    classes = loaded.meta.predicted_indices(probs)
    assert 0 < classes.sum() < len(classes)  # both classes explained in the sample
    kind = {"gradcam": Gradcam, "gradcampp": GradcamPlusPlus, "layercam": Layercam}[method]
    theirs_cam = kind(loaded.model, model_modifier=ReplaceToLinear(), clone=True)
    score = BinaryScore([bool(c == 1) for c in classes])
    per_layer = [_relu_max(theirs_cam(score, x, penultimate_layer=layer,
                                      seek_penultimate_conv_layer=False, expand_cam=False,
                                      normalize_cam=False)) for layer in layers]
    theirs = (per_layer[0] if len(layers) == 1 else
              fuse_maps([tf.constant(m, tf.float32) for m in per_layer]).numpy())
    assert ours.shape == theirs.shape
    corr = _correlation(ours, theirs)
    assert corr.min() > 0.9999, (method, layers, corr.min())
    np.testing.assert_allclose(ours, theirs, atol=2e-3)  # Grad-CAM++ at 14x14: 7e-4 (float32 g^3)
