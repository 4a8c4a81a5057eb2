"""ONNX Runtime against TensorFlow on tiny real models: export, same answers, refusals, imports.

Each model is built and saved here, compiled by the real `pawcam export` code (Keras' ONNX
export, onnxruntime's static quantizer) and served by both runtimes on the same pixels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.config import Settings, load_settings, replace
from engine.errors import ModelLoadError
from engine.modelio import ModelMeta, save_model
from engine.onnxio import manifest_path_for, onnx_path_for
from engine.runtime import choose_runtime, open_runtime
from engine.runtime_ort import OrtRuntime, cams_from_class_maps
from engine.runtime_tf import TfRuntime
from tests.helpers import photo_like, tiny_model, write_image

SIZE = 32
ROOT = Path(__file__).resolve().parents[1]


def _settings(model_path: Path, method: str = "gradcam", **inference) -> Settings:
    s = load_settings(None)
    return replace(s, model=replace(s.model, path=model_path),
                   inference=replace(s.inference, **inference),
                   gradcam=replace(s.gradcam, method=method))


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = [photo_like(SIZE, SIZE, seed=seed * 100 + i) if i % 2 == 0
           else rng.integers(0, 256, (SIZE, SIZE, 3)) for i in range(n)]
    return np.stack(out).astype(np.uint8)


def _dataset(root: Path, class_names=("cat", "dog"), per_class: int = 12) -> Path:
    """A tiny dataset in the layout `pawcam train` reads (train/ and test/ per class) of real
    image files: the export calibrates int8 on its training part and checks it on the
    validation part, rebuilt as training built it."""
    for c, name in enumerate(class_names):
        for i in range(per_class):
            write_image(root / "train" / name / f"{name}{i}.png", fmt="PNG", width=40, height=40,
                        seed=100 * c + i)
        write_image(root / "test" / name / f"{name}.png", fmt="PNG", width=40, height=40,
                    seed=1000 + c)
    return root


def _export(model_path: Path, data: Path | None = None, int8: bool = True):
    from training.export import export_model

    return export_model(model_path, _settings(model_path), data=data, int8=int8)


def _save(folder: Path, model, class_names=("cat", "dog"), **meta) -> Path:
    m = ModelMeta(class_names=tuple(class_names), input_size=(SIZE, SIZE), version="t1", **meta)
    return save_model(model, m, folder / "m.keras")


@pytest.fixture(scope="module")
def binary_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("binary")
    path = _save(folder, tiny_model(size=SIZE, seed=3), threshold=0.5, temperature=1.3)
    manifest = _export(path, _dataset(tmp_path_factory.mktemp("data")))
    return path, manifest


@pytest.fixture(scope="module")
def softmax_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("softmax")
    names = ("ant", "bee", "cow")
    path = _save(folder, tiny_model(names, size=SIZE, seed=4), class_names=names)
    return path, _export(path, int8=False)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
@pytest.mark.parametrize("which", ["binary_export", "softmax_export"])
def test_ort_fp32_equals_tensorflow(request, which, method):
    path, manifest = request.getfixturevalue(which)
    assert manifest.has_maps and manifest.checks["fp32"]["max_prob_diff"] <= 1e-5
    assert manifest.methods == ("gradcam", "gradcampp")
    assert manifest.checks["fp32"]["max_map_diff_gradcampp"] <= 1e-3
    settings = _settings(path, method, runtime="onnxruntime", precision="fp32")
    ort = open_runtime(settings)
    assert ort.method == method
    tf = TfRuntime.open(path, settings)
    assert isinstance(ort, OrtRuntime) and ort.precision == "fp32"
    x = _images(24, seed=7)
    p_ort, m_ort = ort.run(x, maps=True)
    p_tf, m_tf = tf.run(x, maps=True)
    np.testing.assert_allclose(p_ort, p_tf, atol=1e-5)
    np.testing.assert_allclose(m_ort, m_tf, atol=1e-3)
    assert p_ort.dtype == np.float64 and m_ort.shape == m_tf.shape
    # the forward-only call gives the same probabilities and no maps
    p_only, none = ort.run(x, maps=False)
    assert none is None and np.allclose(p_only, p_ort, atol=1e-12)


def test_sign_rule_explains_the_negative_class(tmp_path):
    """Images predicted as class 0 of a sigmoid unit get the map of -logit, as in TensorFlow."""
    model = tiny_model(size=SIZE, seed=5)
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    x = _images(16, seed=9)
    for b in (-3.0, 3.0):  # all-cat, then all-dog predictions
        head.set_weights([kernel, np.full_like(bias, b)])
        path = _save(tmp_path / f"b{b}", model)
        _export(path, int8=False)
        for method in ("gradcam", "gradcampp"):
            settings = _settings(path, method, runtime="onnxruntime", precision="fp32")
            p_ort, m_ort = open_runtime(settings).run(x, maps=True)
            p_tf, m_tf = TfRuntime.open(path, settings).run(x, maps=True)
            predicted = (p_tf[:, 1] >= 0.5).astype(int)
            assert set(predicted) == {0 if b < 0 else 1}
            np.testing.assert_allclose(m_ort, m_tf, atol=1e-3)
            assert (m_ort.max(axis=(1, 2)) > 0).any()


def test_cams_from_class_maps_closed_form():
    maps = np.array([[[[1.0], [-2.0]], [[3.0], [0.5]]]], np.float32)  # (1, 2, 2, 1)
    pos = cams_from_class_maps(maps, np.array([1]), binary=True)
    neg = cams_from_class_maps(maps, np.array([0]), binary=True)
    np.testing.assert_allclose(pos[0], [[1 / 3, 0], [1, 0.5 / 3]], atol=1e-7)
    np.testing.assert_allclose(neg[0], [[0, 1], [0, 0]], atol=1e-7)
    zero = cams_from_class_maps(np.zeros((1, 2, 2, 3), np.float32), np.array([2]), binary=False)
    assert not np.isnan(zero).any() and zero.max() == 0


def test_stale_or_tampered_export_is_refused(tmp_path):
    path = _save(tmp_path, tiny_model(size=SIZE, seed=6))
    _export(path, int8=False)
    settings = _settings(path, runtime="onnxruntime", precision="fp32")
    open_runtime(settings)  # fresh export loads
    # a byte changed in the ONNX file: refused, naming the fix
    fp32 = onnx_path_for(path, "fp32")
    data = bytearray(fp32.read_bytes())
    data[-10] ^= 0xFF
    fp32.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="pawcam export"):
        open_runtime(settings)
    # a new model saved over the old one: the export is stale
    _export(path, int8=False)
    _save(tmp_path, tiny_model(size=SIZE, seed=7))
    with pytest.raises(ModelLoadError, match="stale.*pawcam export"):
        open_runtime(settings)
    # auto falls back to TensorFlow (with a warning) instead of serving a stale file
    auto = open_runtime(_settings(path, runtime="auto", precision="auto"))
    assert auto.name == "tensorflow"
    # and no export at all
    manifest_path_for(path).unlink()
    with pytest.raises(ModelLoadError, match="no ONNX export.*pawcam export"):
        open_runtime(settings)


def _flatten_head_model():
    """Conv -> Flatten -> Dense: the Dense weights are not Grad-CAM's channel weights."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu", name="last_conv")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    return keras.Model(inputs, outputs)


def test_cams_from_positive_maps_closed_form():
    from engine.runtime_ort import cams_from_positive_maps
    from training.export import positive_weights

    np.testing.assert_array_equal(positive_weights(np.array([[2.0], [-1.0]])),
                                  [[0.0, 2.0], [1.0, 0.0]])  # columns: class 0 (-w), class 1 (+w)
    maps = np.array([[[[4.0, 1.0], [2.0, 0.0]]]], np.float32)  # (1, 1, 2, 2)
    np.testing.assert_allclose(cams_from_positive_maps(maps, np.array([0]))[0], [[1.0, 0.5]])
    np.testing.assert_allclose(cams_from_positive_maps(maps, np.array([1]))[0], [[1.0, 0.0]])


def test_method_that_needs_gradients_goes_to_tensorflow_or_is_refused(binary_export, caplog):
    path, _ = binary_export
    with pytest.raises(ModelLoadError, match="layercam.*TensorFlow's gradients.*tensorflow"):
        open_runtime(_settings(path, "layercam", runtime="onnxruntime"))
    with caplog.at_level("INFO", logger="engine.runtime"):
        runtime = open_runtime(_settings(path, "layercam", runtime="auto",
                                         precision="fp32"))
    assert runtime.name == "tensorflow" and runtime.cam.method == "layercam"
    assert "needs TensorFlow's gradients" in caplog.text
    _, maps = runtime.run(_images(2), maps=True)
    assert maps.shape[0] == 2 and maps.max() <= 1.0
    # no pictures: ONNX Runtime still serves the probabilities
    s = _settings(path, "layercam", runtime="onnxruntime")
    probs_only = open_runtime(replace(s, gradcam=replace(s.gradcam, enabled=False)))
    assert probs_only.name == "onnxruntime" and not probs_only.has_maps
    assert probs_only.run(_images(2), maps=True)[1] is None


def test_head_without_exact_maps_falls_back_or_refuses(tmp_path):
    path = _save(tmp_path, _flatten_head_model())
    manifest = _export(path, int8=False)
    assert not manifest.has_maps and "average pool" in manifest.gradcam["reason"]
    with_pictures = _settings(path, runtime="onnxruntime", precision="fp32")
    with pytest.raises(ModelLoadError, match="no exact Grad-CAM.*tensorflow"):
        open_runtime(with_pictures)
    # auto: TensorFlow serves the pictures
    assert open_runtime(_settings(path, runtime="auto")).name == "tensorflow"
    # without pictures ONNX Runtime serves it, with TensorFlow's probabilities
    no_pics = replace(with_pictures, gradcam=replace(with_pictures.gradcam, enabled=False))
    ort = open_runtime(no_pics)
    x = _images(8)
    np.testing.assert_allclose(ort.run(x, maps=False)[0],
                               TfRuntime.open(path, no_pics).run(x, maps=False)[0], atol=1e-5)


def test_int8_is_exported_checked_and_never_used_silently_when_failed(binary_export):
    path, manifest = binary_export
    check = manifest.checks["int8"]
    assert "int8" in manifest.files and check["images"] >= 2
    assert {"accuracy", "fp32_accuracy", "agreement", "passed"} <= set(check)
    doc = json.loads(manifest_path_for(path).read_text())
    assert doc["files"]["int8"]["sha256"] == manifest.files["int8"]["sha256"]
    # mark the check failed: explicit int8 is refused, auto serves fp32
    failed = dict(doc, checks=dict(doc["checks"], int8=dict(check, passed=False)))
    manifest_path_for(path).write_text(json.dumps(failed))
    try:
        with pytest.raises(ModelLoadError, match="int8 cannot be used"):
            open_runtime(_settings(path, runtime="onnxruntime", precision="int8"))
        auto = open_runtime(_settings(path, runtime="onnxruntime", precision="auto"))
        assert auto.precision == "fp32"
    finally:
        manifest_path_for(path).write_text(json.dumps(doc))
    if check["passed"]:
        int8 = open_runtime(_settings(path, runtime="onnxruntime", precision="auto"))
        assert int8.precision == "int8"
        probs, maps = int8.run(_images(6), maps=True)
        assert probs.shape == (6, 2) and maps.shape[0] == 6
        np.testing.assert_allclose(probs.sum(axis=1), 1.0)


@pytest.mark.parametrize("spin", [False, True])
def test_model_threads_and_spinning_reach_the_session(softmax_export, spin):
    """[inference] model_threads and model_spin are the session's settings (spinning is off by
    default: it took the CPU the decode and picture threads need)."""
    path, _ = softmax_export
    assert load_settings(None).inference.model_spin is False
    rt = open_runtime(_settings(path, runtime="onnxruntime", model_threads=2, model_spin=spin))
    options = rt.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spin))
    assert options.get_session_config_entry("session.dynamic_block_base") == "4"
    probs, _ = rt.run(_images(2), maps=False)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_no_data_means_no_int8_and_a_recorded_reason(softmax_export):
    path, manifest = softmax_export
    assert "int8" not in manifest.files and not onnx_path_for(path, "int8").exists()
    assert manifest.int8_refusal()
    with pytest.raises(ModelLoadError, match="int8 cannot be used"):
        open_runtime(_settings(path, runtime="onnxruntime", precision="int8"))


def test_auto_choice_follows_the_device():
    s = load_settings(None)
    assert choose_runtime(replace(s, device=replace(s.device, device="cpu"))) == "onnxruntime"
    assert choose_runtime(replace(s, device=replace(s.device, device="gpu"))) == "tensorflow"
    assert choose_runtime(replace(s, inference=replace(s.inference, runtime="tensorflow"))) \
        == "tensorflow"


def test_onnx_runtime_path_never_imports_tensorflow(binary_export, tmp_path):
    """A whole `pawcam predict` under ONNX Runtime, in a fresh interpreter: no TensorFlow."""
    path, _ = binary_export
    photo = write_image(tmp_path / "in" / "a.jpg", width=50, height=40)
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\npath = "{path}"\n[inference]\nruntime = "onnxruntime"\n',
                      encoding="utf-8")
    script = (
        "import sys\n"
        "from engine.cli import main\n"
        f"code = main(['predict', {str(photo)!r}, '--out', {str(tmp_path / 'out')!r}, "
        f"'--config', {str(config)!r}, '-q'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print('CODE', code, 'HEAVY', bad)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ))
    assert "CODE 0 HEAVY []" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "out" / "predictions.csv").is_file()
