"""Grad-CAM against its closed form on real (tiny) Keras models.

For a GAP -> Dense head the score of class c is ``b_c + sum_k w_kc * mean(A_k)``, so its
gradient at A_k is ``w_kc / (h*w)`` everywhere and Grad-CAM reduces to
``ReLU(sum_k w_kc A_k) / max``. For one sigmoid unit the explained score is +logit when the
positive class is predicted and -logit otherwise.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ModelLoadError
from engine.gradcam import GradCam, find_target_layer, resolve_target_layer
from engine.modelio import ModelMeta
from tests.helpers import photo_like, tiny_model

SIZE = 32
TOL = 1e-4


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Photo-like and noisy pictures, float32 0-255, (n, SIZE, SIZE, 3)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append(rng.uniform(0, 255, size=(SIZE, SIZE, 3)))
        else:
            out.append(photo_like(SIZE, SIZE, seed=seed * 100 + i).astype(np.float64))
    return np.stack(out).astype(np.float32)


def _conv_and_gap(model, nested: bool = False):
    """Activations A (n, h, w, k) of last_conv, and the head's Dense kernel/bias, via Keras."""
    import keras

    if nested:
        backbone = model.get_layer("backbone")
        feat = keras.Model(backbone.inputs, backbone.get_layer("last_conv").output)
    else:
        feat = keras.Model(model.inputs, model.get_layer("last_conv").output)
    kernel, bias = (np.asarray(v, np.float64) for v in model.get_layer("head").get_weights())
    return feat, kernel, bias


def _closed_form(acts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ReLU(sum_k w_k A_k) / max (zeros stay zeros). acts (h, w, k), weights (k,)."""
    cam = np.maximum(np.tensordot(np.asarray(acts, np.float64), weights, axes=([2], [0])), 0.0)
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _set_bias(model, bias_value):
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    head.set_weights([kernel, np.full_like(bias, bias_value)])


@pytest.fixture(scope="module")
def binary_model():
    return tiny_model(("cat", "dog"), size=SIZE, seed=0)


@pytest.fixture(scope="module")
def binary_meta():
    return ModelMeta(class_names=("cat", "dog"), input_size=(SIZE, SIZE))


def _logits_binary(model, x):
    import keras

    pooled = np.asarray(keras.Model(model.inputs, model.get_layer("pool").output)(x), np.float64)
    kernel, bias = (np.asarray(v, np.float64) for v in model.get_layer("head").get_weights())
    return (pooled @ kernel + bias)[:, 0]


# --- binary (one sigmoid unit) -----------------------------------------------------------------
def test_binary_cam_matches_closed_form_for_both_predicted_classes(binary_model, binary_meta):
    model = binary_model
    x = _images(6)
    feat, kernel, _ = _conv_and_gap(model)
    acts = np.asarray(feat(x), np.float64)
    seen = set()
    original = model.get_layer("head").get_weights()
    try:
        for bias_value, expected_class in ((40.0, 1), (-40.0, 0)):
            _set_bias(model, bias_value)
            cam = GradCam(model, binary_meta)
            probs, maps = cam(x)
            predicted = binary_meta.predicted_indices(probs)
            assert (predicted == expected_class).all()
            sign = 1.0 if expected_class == 1 else -1.0
            assert maps.shape == acts.shape[:3]
            for i in range(len(x)):
                expected = _closed_form(acts[i], sign * kernel[:, 0])
                assert expected.max() > 0, "test input gives an all-zero map; pick other inputs"
                np.testing.assert_allclose(maps[i], expected, atol=TOL)
                seen.add(int(predicted[i]))
    finally:
        model.get_layer("head").set_weights(original)
    assert seen == {0, 1}


def test_binary_predicted_class_follows_threshold_and_sign_flips(binary_model):
    """Same image, same probability: the explained class (and map sign) follows the threshold."""
    model = binary_model
    x = _images(3, seed=3)
    feat, kernel, _ = _conv_and_gap(model)
    acts = np.asarray(feat(x), np.float64)
    original = model.get_layer("head").get_weights()
    try:
        # put every logit near +1 (p ~ 0.73): above a 0.5 threshold, below a 0.9 threshold
        logits = _logits_binary(model, x)
        _set_bias(model, original[1][0] + (1.0 - logits.mean()))
        logits = _logits_binary(model, x)
        p = _sigmoid(logits)
        assert ((p > 0.55) & (p < 0.88)).all(), p
        low = GradCam(model, ModelMeta(("cat", "dog"), (SIZE, SIZE), threshold=0.5))
        high = GradCam(model, ModelMeta(("cat", "dog"), (SIZE, SIZE), threshold=0.9))
        p_low, maps_dog = low(x)
        p_high, maps_cat = high(x)
        np.testing.assert_allclose(p_low, p_high, atol=1e-6)
        np.testing.assert_allclose(p_low[:, 1], p, atol=1e-5)
        for i in range(len(x)):
            dog = _closed_form(acts[i], kernel[:, 0])
            cat = _closed_form(acts[i], -kernel[:, 0])
            np.testing.assert_allclose(maps_dog[i], dog, atol=TOL)
            np.testing.assert_allclose(maps_cat[i], cat, atol=TOL)
            # complementary evidence: the supports of the two maps are disjoint, both non-empty
            assert (maps_dog[i] > 0).any() and (maps_cat[i] > 0).any()
            assert not ((maps_dog[i] > 1e-6) & (maps_cat[i] > 1e-6)).any()
            assert not np.allclose(maps_dog[i], maps_cat[i], atol=1e-3)
    finally:
        model.get_layer("head").set_weights(original)


def test_probabilities_equal_model_output_and_temperature_divides_logits(binary_model):
    model = binary_model
    x = _images(5, seed=7)
    expected = np.asarray(model(x, training=False), np.float64)[:, 0]
    cam = GradCam(model, ModelMeta(("cat", "dog"), (SIZE, SIZE)))
    probs, _ = cam(x)
    np.testing.assert_allclose(probs[:, 1], expected, atol=1e-6)
    np.testing.assert_allclose(probs[:, 0], 1.0 - expected, atol=1e-6)
    np.testing.assert_allclose(cam.probabilities(x), probs, atol=1e-6)

    logits = _logits_binary(model, x)
    assert np.ptp(logits) > 0 or abs(logits[0]) > 1e-3
    for t in (0.25, 3.0):
        hot = GradCam(model, ModelMeta(("cat", "dog"), (SIZE, SIZE), temperature=t))
        p_t, _ = hot(x)
        np.testing.assert_allclose(p_t[:, 1], _sigmoid(logits / t), atol=1e-5)
        np.testing.assert_allclose(hot.probabilities(x), p_t, atol=1e-6)
        np.testing.assert_allclose(p_t.sum(axis=1), 1.0, atol=1e-6)


def test_temperature_divides_softmax_logits():
    import keras

    model = tiny_model(("a", "b", "c"), size=SIZE, seed=2)
    x = _images(4, seed=2)
    pooled = np.asarray(keras.Model(model.inputs, model.get_layer("pool").output)(x), np.float64)
    kernel, bias = (np.asarray(v, np.float64) for v in model.get_layer("head").get_weights())
    logits = pooled @ kernel + bias
    for t in (1.0, 2.5):
        cam = GradCam(model, ModelMeta(("a", "b", "c"), (SIZE, SIZE), temperature=t))
        probs = cam.probabilities(x)
        e = np.exp(logits / t - (logits / t).max(axis=1, keepdims=True))
        np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), atol=1e-5)
        if t == 1.0:
            np.testing.assert_allclose(probs, np.asarray(model(x), np.float64), atol=1e-6)


# --- softmax ---------------------------------------------------------------------------------
def test_softmax_cam_uses_the_predicted_class_column():
    model = tiny_model(("cat", "dog", "fox"), size=SIZE, seed=1)
    meta = ModelMeta(class_names=("cat", "dog", "fox"), input_size=(SIZE, SIZE))
    x = _images(4, seed=1)
    feat, kernel, _ = _conv_and_gap(model)
    acts = np.asarray(feat(x), np.float64)
    head = model.get_layer("head")
    original = head.get_weights()
    try:
        for c in range(3):
            bias = np.full(3, -30.0, np.float32)
            bias[c] = 30.0
            head.set_weights([original[0], bias])
            probs, maps = GradCam(model, meta)(x)
            assert (np.argmax(probs, axis=1) == c).all()
            np.testing.assert_allclose(probs, np.asarray(model(x), np.float64), atol=1e-6)
            for i in range(len(x)):
                expected = _closed_form(acts[i], kernel[:, c])
                np.testing.assert_allclose(maps[i], expected, atol=TOL)
            # another class's column would give a different map
            other = _closed_form(acts[0], kernel[:, (c + 1) % 3])
            assert not np.allclose(maps[0], other, atol=1e-2)
    finally:
        head.set_weights(original)

    # with the trained-as-is bias, each image still follows its own argmax class
    probs, maps = GradCam(model, meta)(x)
    for i, c in enumerate(np.argmax(probs, axis=1)):
        np.testing.assert_allclose(maps[i], _closed_form(acts[i], kernel[:, c]), atol=TOL)


# --- nested backbone -------------------------------------------------------------------------
def test_nested_backbone_matches_flat_model_and_closed_form(binary_model, binary_meta):
    flat = binary_model
    nested = tiny_model(("cat", "dog"), size=SIZE, seed=5, nested=True)
    backbone = nested.get_layer("backbone")
    for name in ("conv1", "last_conv"):
        backbone.get_layer(name).set_weights(flat.get_layer(name).get_weights())
    nested.get_layer("head").set_weights(flat.get_layer("head").get_weights())
    x = _images(4, seed=11)
    np.testing.assert_allclose(np.asarray(nested(x)), np.asarray(flat(x)), atol=1e-6)

    cam_flat = GradCam(flat, binary_meta)
    cam_nested = GradCam(nested, binary_meta)
    assert cam_nested.target_path == ("backbone", "last_conv")
    p_flat, m_flat = cam_flat(x)
    p_nested, m_nested = cam_nested(x)
    np.testing.assert_allclose(p_nested, p_flat, atol=1e-6)
    np.testing.assert_allclose(m_nested, m_flat, atol=TOL)

    feat, kernel, _ = _conv_and_gap(nested, nested=True)
    acts = np.asarray(feat(x), np.float64)
    predicted = binary_meta.predicted_indices(p_nested)
    for i in range(len(x)):
        sign = 1.0 if predicted[i] == 1 else -1.0
        np.testing.assert_allclose(m_nested[i], _closed_form(acts[i], sign * kernel[:, 0]),
                                   atol=TOL)


def test_nested_backbone_survives_save_and_load(tmp_path):
    from engine.modelio import load_model
    from tests.helpers import save_tiny_model

    path = save_tiny_model(tmp_path, size=SIZE, nested=True)
    loaded = load_model(path)
    cam = GradCam(loaded.model, loaded.meta)
    assert cam.target_path == ("backbone", "last_conv")
    x = _images(2, seed=4)
    probs, maps = cam(x)
    np.testing.assert_allclose(probs[:, 1], np.asarray(loaded.model(x))[:, 0], atol=1e-6)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6


# --- degenerate maps -------------------------------------------------------------------------
def test_all_zero_map_stays_zero_not_nan(binary_meta):
    model = tiny_model(("cat", "dog"), size=SIZE, seed=0)
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    x = _images(3, seed=9)

    # zero kernel: the score does not depend on the feature map at all
    head.set_weights([np.zeros_like(kernel), np.full_like(bias, 2.0)])
    probs, maps = GradCam(model, binary_meta)(x)
    assert np.isfinite(maps).all() and np.isfinite(probs).all()
    assert (maps == 0).all()
    np.testing.assert_allclose(probs[:, 1], _sigmoid(2.0), atol=1e-6)

    # all-negative weights for the predicted (positive) class: ReLU removes every pixel
    head.set_weights([-np.abs(kernel), np.full_like(bias, 60.0)])
    probs, maps = GradCam(model, binary_meta)(x)
    assert (binary_meta.predicted_indices(probs) == 1).all()
    assert np.isfinite(maps).all()
    assert (maps == 0).all()

    # a black image makes activations constant; still finite, in [0, 1]
    probs, maps = GradCam(model, binary_meta)(np.zeros((2, SIZE, SIZE, 3), np.float32))
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_maps_are_normalised_to_unit_peak(binary_model, binary_meta):
    probs, maps = GradCam(binary_model, binary_meta)(_images(4, seed=21))
    assert maps.dtype == np.float32 and probs.dtype == np.float64
    for m in maps:
        assert m.min() >= 0.0
        assert m.max() == pytest.approx(1.0, abs=1e-6) or m.max() == 0.0


# --- target layer ----------------------------------------------------------------------------
def test_find_target_layer_flat_and_nested(binary_model):
    assert find_target_layer(binary_model) == ("last_conv",)
    nested = tiny_model(("cat", "dog"), size=SIZE, nested=True)
    assert find_target_layer(nested) == ("backbone", "last_conv")
    assert resolve_target_layer(nested, "conv1") == ("backbone", "conv1")
    assert resolve_target_layer(binary_model, "conv1") == ("conv1",)


def test_find_target_layer_without_a_4d_layer_is_a_clear_error():
    import keras

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
    with pytest.raises(ModelLoadError, match="4-D"):
        find_target_layer(model)


def test_explicit_target_layer_is_used(binary_model, binary_meta):
    import keras

    cam = GradCam(binary_model, binary_meta, target_layer="conv1")
    assert cam.target_layer == "conv1"
    x = _images(2, seed=13)
    _, maps = cam(x)
    h = keras.Model(binary_model.inputs, binary_model.get_layer("conv1").output)(x).shape[1]
    assert maps.shape == (2, h, h)
    # metadata's recorded layer is used when settings leave it empty
    meta = ModelMeta(("cat", "dog"), (SIZE, SIZE), target_layer="conv1")
    assert GradCam(binary_model, meta).target_path == ("conv1",)
    assert GradCam(binary_model, meta, target_layer="last_conv").target_path == ("last_conv",)


@pytest.mark.parametrize("name", ["no_such_layer", "backbone/no_such_layer", "nope/last_conv"])
def test_bad_target_layer_is_model_load_error(binary_model, binary_meta, name):
    with pytest.raises(ModelLoadError) as info:
        GradCam(binary_model, binary_meta, target_layer=name)
    message = str(info.value)
    assert name in message
    assert "target_layer" in message


# --- batching --------------------------------------------------------------------------------
def test_batch_of_n_equals_n_batches_of_one(binary_model, binary_meta):
    cam = GradCam(binary_model, binary_meta)
    x = _images(5, seed=17)
    probs, maps = cam(x)
    predicted = binary_meta.predicted_indices(probs)
    for i in range(len(x)):
        p1, m1 = cam(x[i:i + 1])
        np.testing.assert_allclose(p1[0], probs[i], atol=1e-6)
        np.testing.assert_allclose(m1[0], maps[i], atol=1e-5)
    np.testing.assert_allclose(cam.probabilities(x[2:3])[0], probs[2], atol=1e-6)
    # the batch held images explained as different classes, so independence was really tested
    original = binary_model.get_layer("head").get_weights()
    try:
        logits = _logits_binary(binary_model, x)
        _set_bias(binary_model, original[1][0] - np.median(logits))
        cam2 = GradCam(binary_model, binary_meta)
        probs2, maps2 = cam2(x)
        predicted = binary_meta.predicted_indices(probs2)
        assert set(predicted.tolist()) == {0, 1}
        for i in range(len(x)):
            p1, m1 = cam2(x[i:i + 1])
            np.testing.assert_allclose(p1[0], probs2[i], atol=1e-6)
            np.testing.assert_allclose(m1[0], maps2[i], atol=1e-5)
    finally:
        binary_model.get_layer("head").set_weights(original)


def test_calibrated_probabilities_keep_confident_images_apart():
    """Float64 from logits: a very confident image is not rounded to exactly 1 (ROC ranking)."""
    from engine.gradcam import calibrated_probabilities
    from engine.modelio import ModelMeta

    meta = ModelMeta(class_names=("cat", "dog"), temperature=2.0)
    p = calibrated_probabilities(np.array([[40.0], [46.0], [-40.0], [0.0]], np.float32), meta)
    assert p[0, 1] < p[1, 1] < 1.0 and p[2, 0] < 1.0
    assert p[0, 0] == pytest.approx(1 / (1 + np.exp(20.0)), rel=1e-9)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(p[3], [0.5, 0.5])
    three = ModelMeta(class_names=("a", "b", "c"), temperature=0.5)
    q = calibrated_probabilities(np.array([[1.0, 2.0, 3.0]]), three)
    e = np.exp(np.array([2.0, 4.0, 6.0]))
    np.testing.assert_allclose(q[0], e / e.sum())
