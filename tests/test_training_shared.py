"""The shipped model on real photos, through the engine (runs whenever ../shared exists)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.config import load_settings

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "cat_dog_model.keras"

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def test_shipped_model_scores_on_real_test_photos(shared_dir, tmp_path):
    """First 100 sorted cats + first 100 sorted dogs of ../shared/dataset/test: >= 98%."""
    if not MODEL.is_file():
        pytest.skip(f"{MODEL} is absent")
    from engine.classifier import Classifier, Job
    from engine.config import replace

    settings = load_settings(None)
    settings = replace(settings, model=replace(settings.model, path=MODEL),
                       gradcam=replace(settings.gradcam, enabled=False))
    clf = Classifier.from_settings(settings)
    assert clf.meta.class_names == ("cat", "dog")
    jobs, truth = [], []
    for label in ("cat", "dog"):
        files = sorted((shared_dir / "dataset" / "test" / label).glob("*.jpg"))[:100]
        assert len(files) == 100
        jobs += [Job(f, f.name, f"s{len(jobs) + i}") for i, f in enumerate(files)]
        truth += [label] * len(files)
    results = clf.process(jobs, out_dir=tmp_path)
    assert all(r.status != "error" for r in results)
    predicted = [max(r.probabilities, key=r.probabilities.get) for r in results]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth)]))
    assert accuracy >= 0.98, f"accuracy {accuracy:.3f} on the 200-photo sample"
    # calibrated probabilities, temperature from the metadata
    assert clf.meta.temperature > 0 and clf.meta.target_layer == "out_relu"


def test_shipped_int8_is_within_two_tenths_of_a_point_of_fp32(shared_dir):
    """All 2,000 test photos through ONNX Runtime fp32 and int8 (the shipped export)."""
    from engine.config import replace
    from engine.onnxio import manifest_path_for
    from engine.runtime import open_runtime
    from training.evaluate import evaluate_folder

    if not manifest_path_for(MODEL).is_file():
        pytest.skip("the shipped model has no ONNX export")
    settings = load_settings(None)
    settings = replace(settings, model=replace(settings.model, path=MODEL))
    accuracy = {}
    for precision in ("fp32", "int8"):
        s = replace(settings, inference=replace(settings.inference, runtime="onnxruntime",
                                                precision=precision))
        runtime = open_runtime(s, need_maps=False)
        assert runtime.precision == precision
        accuracy[precision] = evaluate_folder(s, runtime, shared_dir / "dataset" / "test",
                                              gallery_size=0).metrics["accuracy"]
    assert accuracy["fp32"] >= 0.985, accuracy
    assert accuracy["int8"] >= accuracy["fp32"] - 0.002, accuracy


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_shipped_export_serves_each_closed_form_method_equal_to_tensorflow(shared_dir, method):
    """16 real test photos: ONNX Runtime fp32's maps equal TensorFlow's within 1e-3."""
    from engine.config import replace
    from engine.decode import load_model_input
    from engine.runtime import open_runtime

    if not MODEL.is_file():
        pytest.skip(f"{MODEL} is absent")
    s = load_settings(None)
    s = replace(s, model=replace(s.model, path=MODEL),
                gradcam=replace(s.gradcam, method=method))
    ort = open_runtime(replace(s, inference=replace(s.inference, runtime="onnxruntime",
                                                    precision="fp32")))
    tf = open_runtime(replace(s, inference=replace(s.inference, runtime="tensorflow")))
    files = sorted((shared_dir / "dataset" / "test" / "cat").glob("*.jpg"))[:8] + \
        sorted((shared_dir / "dataset" / "test" / "dog").glob("*.jpg"))[:8]
    x = np.stack([load_model_input(f, input_size=(224, 224), max_pixels=40_000_000,
                                   max_bytes=100_000_000) for f in files])
    (p_ort, m_ort), (p_tf, m_tf) = ort.run(x, maps=True), tf.run(x, maps=True)
    assert ort.method == method and tf.cam.method == method
    np.testing.assert_allclose(p_ort, p_tf, atol=1e-5)
    np.testing.assert_allclose(m_ort, m_tf, atol=1e-3)
