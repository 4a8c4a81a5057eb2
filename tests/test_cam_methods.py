"""Grad-CAM++ and LayerCAM (engine/gradcam.py METHODS) against hand computations, on tiny models.

The gradients are known without TensorFlow when the path from the explained layer to the
score is linear:

- Flatten -> Dense head: the score is ``sum_ijk V_ijk A_ijk + b``, so the gradient at A is the
  Dense kernel reshaped to (h, w, k): different at every position (Grad-CAM++'s alphas matter).
- GAP -> Dense: the gradient is ``w / (h w)`` everywhere.
- a linear 1x1 convolution with stride 2 (kernel U) before GAP: the gradient at its input is
  ``U @ g`` at the even positions it reads, and 0 elsewhere.

(For one sigmoid unit the score is +logit for a "dog" prediction and -logit for "cat".)
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.faithfulness import upsample
from engine.gradcam import GradCam, find_multiscale_layers
from engine.modelio import ModelMeta
from tests.helpers import photo_like, tiny_model

SIZE = 32
TOL = 1e-4
META = ModelMeta(class_names=("cat", "dog"), input_size=(SIZE, SIZE))


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([photo_like(SIZE, SIZE, seed=seed * 100 + i) if i % 2 == 0
                     else rng.uniform(0, 255, (SIZE, SIZE, 3)) for i in range(n)]
                    ).astype(np.float32)


def _norm(cam: np.ndarray) -> np.ndarray:
    cam = np.maximum(cam, 0.0)
    return cam / cam.max() if cam.max() > 0 else cam


def _set_bias(model, value: float) -> None:
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    head.set_weights([kernel, np.full_like(bias, value)])


def _flatten_model():
    import keras

    keras.utils.set_random_seed(11)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="head")(x))


def _multiscale_model():
    import keras

    keras.utils.set_random_seed(12)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="scale")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(6, 1, strides=2, use_bias=False, name="down")(x)  # linear, 8 x 8
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="head")(x))


def _acts(model, name: str, x: np.ndarray) -> np.ndarray:
    import keras

    return np.asarray(keras.Model(model.inputs, model.get_layer(name).output)(x), np.float64)


def _gradcampp_by_hand(g: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Eq. 19 of Chattopadhyay et al. with alpha normalised per channel; g, a: (h, w, k)."""
    g2, g3 = g ** 2, g ** 3
    denom = 2 * g2 + a.sum(axis=(0, 1)) * g3
    alpha = np.where(g2 == 0, 0.0, g2 / np.where(g2 == 0, 1.0, denom))
    norm = alpha.sum(axis=(0, 1))
    alpha = alpha / np.where(norm == 0, 1.0, norm)
    weights = (alpha * np.maximum(g, 0)).sum(axis=(0, 1))
    return _norm(a @ weights)


@pytest.mark.parametrize("bias,sign", [(30.0, 1.0), (-30.0, -1.0)])
def test_flatten_head_gradcampp_and_layercam_by_hand(bias, sign):
    model = _flatten_model()
    _set_bias(model, bias)
    x = _images(4)
    a = _acts(model, "last_conv", x)                       # (n, 8, 8, 6)
    kernel = np.asarray(model.get_layer("head").get_weights()[0], np.float64)
    g = sign * kernel[:, 0].reshape(a.shape[1:])           # d(score)/dA, the same for every image
    pp = GradCam(model, META, method="gradcampp")(x)[1]
    lc = GradCam(model, META, "last_conv", method="layercam")(x)[1]
    gc = GradCam(model, META)(x)[1]
    for i in range(len(x)):
        np.testing.assert_allclose(pp[i], _gradcampp_by_hand(g, a[i]), atol=TOL)
        np.testing.assert_allclose(lc[i], _norm((np.maximum(g, 0) * a[i]).sum(-1)), atol=TOL)
        np.testing.assert_allclose(gc[i], _norm(a[i] @ g.mean(axis=(0, 1))), atol=TOL)
        assert pp[i].max() == pytest.approx(1.0)
    # the three methods weigh differently here: not the same map under three names
    assert np.abs(pp - gc).max() > 0.05 and np.abs(lc - gc).max() > 0.05


def test_gap_head_gradcampp_and_single_layer_layercam_are_positive_weight_gradcam():
    model = tiny_model(size=SIZE, seed=2)
    x = _images(6, seed=1)
    a = _acts(model, "last_conv", x)
    w = np.asarray(model.get_layer("head").get_weights()[0], np.float64)[:, 0]
    probs, pp = GradCam(model, META, method="gradcampp")(x)
    _, lc = GradCam(model, META, "last_conv", method="layercam")(x)
    sign = np.where(META.predicted_indices(probs) == 1, 1.0, -1.0)
    for i in range(len(x)):
        expected = _norm(a[i] @ np.maximum(sign[i] * w, 0))
        np.testing.assert_allclose(pp[i], expected, atol=TOL)
        np.testing.assert_allclose(lc[i], expected, atol=TOL)


def test_layercam_fuses_layers_by_hand():
    model = _multiscale_model()
    _set_bias(model, 30.0)  # every image "dog": score = +logit
    x = _images(3, seed=2)
    assert [p[-1] for p in find_multiscale_layers(model)] == ["down", "conv1"]
    cam = GradCam(model, META, method="layercam")  # "" -> the automatic multi-scale list
    assert cam.target_layer == "down, conv1"
    probs, maps = cam(x)
    assert maps.shape == (3, 16, 16)  # the finest layer's grid
    a2, a1 = _acts(model, "down", x), _acts(model, "conv1", x)        # 8x8x6, 16x16x8
    w = np.asarray(model.get_layer("head").get_weights()[0], np.float64)[:, 0]
    u = np.asarray(model.get_layer("down").get_weights()[0], np.float64)[0, 0]  # (8, 6)
    g2 = np.broadcast_to(w / 64.0, a2.shape[1:])
    g1 = np.zeros(a1.shape[1:])
    g1[::2, ::2] = g2 @ u.T
    for i in range(len(x)):
        coarse = _norm((np.maximum(g2, 0) * a2[i]).sum(-1))
        fine = _norm((np.maximum(g1, 0) * a1[i]).sum(-1))
        expected = _norm((upsample(coarse[None], (16, 16))[0] + fine) / 2)
        np.testing.assert_allclose(maps[i], expected, atol=TOL)
    # an explicit list means the same, in any order of writing
    _, again = GradCam(model, META, ["conv1", "down"], method="layercam")(x)
    np.testing.assert_allclose(again, maps, atol=TOL)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam"])
def test_batch_independence(method):
    model = _multiscale_model()
    cam = GradCam(model, META, method=method)
    x = _images(4, seed=5)
    _, together = cam(x)
    for i in range(len(x)):
        _, alone = cam(x[i:i + 1])
        np.testing.assert_allclose(alone[0], together[i], atol=1e-5)


def test_nested_backbone_multilayer():
    model = tiny_model(size=SIZE, seed=0, nested=True)
    x = _images(2)
    _, maps = GradCam(model, META, ["last_conv", "conv1"], method="layercam")(x)
    flat = tiny_model(size=SIZE, seed=0)
    _, expected = GradCam(flat, META, ["last_conv", "conv1"], method="layercam")(x)
    np.testing.assert_allclose(maps, expected, atol=TOL)


def test_unknown_method_is_a_clear_error():
    from engine.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="method.*gradcampp"):
        GradCam(tiny_model(size=SIZE), META, method="scorecam")
