"""The model on disk: .keras + metadata JSON, safe mode, clear errors that say what to do."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ModelLoadError
from engine.modelio import (HOW_TO_GET_A_MODEL, META_FORMAT, ModelMeta, file_sha256, load_model,
                            meta_path_for, read_meta, save_model)
from tests.helpers import save_tiny_model, tiny_model

HOW = "pawcam train"  # every "missing or corrupt model" message says how to get one


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m"), size=32, threshold=0.4,
                           temperature=1.5, metrics={"accuracy": 0.9})


@pytest.fixture()
def copy(saved, tmp_path) -> Path:
    """A private copy of the saved model and its metadata, free to damage."""
    dst = tmp_path / saved.name
    shutil.copy(saved, dst)
    shutil.copy(meta_path_for(saved), meta_path_for(dst))
    return dst


def test_round_trip(saved):
    assert saved.suffix == ".keras" and meta_path_for(saved).is_file()
    loaded = load_model(saved)
    meta = loaded.meta
    assert meta.class_names == ("cat", "dog") and meta.input_size == (32, 32)
    assert meta.threshold == 0.4 and meta.temperature == 1.5
    assert meta.version == "tiny-test-1" and meta.metrics == {"accuracy": 0.9}
    assert meta.format == META_FORMAT and meta.binary and meta.num_classes == 2
    assert loaded.path == saved
    original = tiny_model(("cat", "dog"), size=32)  # same seed: same weights
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded.model(x)), np.asarray(original(x)), atol=1e-6)
    assert read_meta(saved) == meta
    assert not list(saved.parent.glob("*.tmp*"))  # atomic save leaves no temp files


def test_softmax_and_nested_round_trip(tmp_path):
    path = save_tiny_model(tmp_path / "three", ("cat", "dog", "fox"), size=24)
    loaded = load_model(path)
    assert loaded.meta.class_names == ("cat", "dog", "fox") and not loaded.meta.binary
    assert loaded.model.outputs[0].shape[-1] == 3
    nested = load_model(save_tiny_model(tmp_path / "nested", nested=True))
    assert nested.model.get_layer("backbone") is not None


def test_meta_json_is_plain_and_complete(saved):
    data = json.loads(meta_path_for(saved).read_text(encoding="utf-8"))
    for key in ("class_names", "input_size", "preprocessing", "threshold", "temperature",
                "version", "metrics", "format"):
        assert key in data
    assert ModelMeta.from_dict(data, "x") == read_meta(saved)


def test_missing_model_file_says_how_to_get_one(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "models" / "cat_dog_model.keras")
    message = str(info.value)
    assert "not found" in message and "cat_dog_model.keras" in message and HOW in message


def test_missing_metadata(copy):
    meta_path_for(copy).unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(copy)
    message = str(info.value)
    assert str(meta_path_for(copy)) in message and "not found" in message and HOW in message


@pytest.mark.parametrize("text,fragment", [
    ("{ not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"class_names": ["cat", "dog"], "colour": 1}', "unknown metadata key"),
    ('{"input_size": [32, 32]}', "class_names"),
    ('{"class_names": ["cat"], "input_size": [32, 32]}', "two or more"),
    ('{"class_names": ["cat", "cat"], "input_size": [32, 32]}', "distinct"),
    ('{"class_names": ["cat", "dog"], "input_size": [32]}', "malformed"),
    ('{"class_names": ["cat", "dog"], "input_size": [32, 32], "threshold": "high"}', "malformed"),
    ('{"class_names": ["cat", "dog"], "input_size": [32, 32], "threshold": 1.5}', "threshold"),
    ('{"class_names": ["cat", "dog"], "input_size": [32, 32], "temperature": 0}', "temperature"),
    ('{"class_names": ["cat", "dog"], "input_size": [32, 32], "preprocessing": "imagenet"}',
     "preprocessing"),
    ('{"class_names": ["cat", "dog"], "input_size": [32, 32], "format": "other/9"}', "format"),
    ('{"class_names": ["cat", "dog"], "input_size": [2, 2]}', "input_size"),
])
def test_corrupt_or_invalid_metadata(copy, text, fragment):
    meta_path_for(copy).write_text(text, encoding="utf-8")
    with pytest.raises(ModelLoadError) as info:
        load_model(copy)
    message = str(info.value)
    assert fragment in message and str(meta_path_for(copy)) in message, message


def test_undecodable_metadata(copy):
    meta_path_for(copy).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(copy)


def test_non_zip_keras_file(copy):
    copy.write_text("this is not a zip archive", encoding="utf-8")
    with pytest.raises(ModelLoadError) as info:
        load_model(copy)
    assert "not a Keras 3" in str(info.value) and HOW in str(info.value)


def test_truncated_keras_archive(copy):
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        load_model(copy)
    assert HOW in str(info.value)


def test_zip_without_a_model_inside(copy):
    copy.unlink()
    with zipfile.ZipFile(copy, "w") as zf:
        zf.writestr("hello.txt", "not a model")
    with pytest.raises(ModelLoadError, match="do not belong together"):
        load_model(copy)  # the metadata's recorded hash catches it first
    meta = json.loads(meta_path_for(copy).read_text(encoding="utf-8"))
    del meta["model_sha256"]  # metadata without a recorded hash: Keras itself must refuse
    meta_path_for(copy).write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ModelLoadError) as info:
        load_model(copy)
    assert "cannot load" in str(info.value) and HOW in str(info.value)


def test_wrong_suffix(copy, tmp_path):
    h5 = tmp_path / "model.h5"
    shutil.copy(copy, h5)
    shutil.copy(meta_path_for(copy), meta_path_for(h5))
    with pytest.raises(ModelLoadError, match="keras"):
        load_model(h5)
    with pytest.raises(ValueError):
        save_model(tiny_model(), ModelMeta(("cat", "dog"), (32, 32)), tmp_path / "x.h5")


@pytest.mark.parametrize("names", [("cat", "dog", "fox"), ("a", "b", "c", "d")])
def test_class_count_disagreeing_with_output_units(copy, names):
    data = json.loads(meta_path_for(copy).read_text(encoding="utf-8"))
    data["class_names"] = list(names)
    meta_path_for(copy).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelLoadError) as info:
        load_model(copy)
    message = str(info.value)
    assert "1 output unit" in message and f"{len(names)} classes" in message


def test_two_classes_need_one_unit_on_save(tmp_path):
    three_unit = tiny_model(("a", "b", "c"), size=32)
    with pytest.raises(ModelLoadError, match="output unit"):
        save_model(three_unit, ModelMeta(("cat", "dog"), (32, 32)), tmp_path / "m.keras")
    assert not (tmp_path / "m.keras").exists()


def test_input_size_disagreeing_with_the_model(copy):
    data = json.loads(meta_path_for(copy).read_text(encoding="utf-8"))
    data["input_size"] = [64, 64]
    meta_path_for(copy).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="input_size"):
        load_model(copy)


def test_lambda_layer_is_refused_by_safe_mode(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t / 255.0, name="sneaky")(inputs)
    x = keras.layers.Conv2D(4, 3, name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="head")(x))
    path = save_model(model, ModelMeta(("cat", "dog"), (32, 32)), tmp_path / "lambda.keras")
    assert path.is_file()
    # the archive itself is fine: unsafe loading would work, so the refusal is safe mode's
    unsafe = keras.saving.load_model(path, compile=False, safe_mode=False)
    assert unsafe.get_layer("sneaky") is not None
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert "safe" in str(info.value).lower() or "lambda" in str(info.value).lower()


def test_uncertain_is_a_reserved_class_name(tmp_path, copy):
    with pytest.raises(ModelLoadError, match="uncertain"):
        save_model(tiny_model(), ModelMeta(("cat", "uncertain"), (32, 32)), tmp_path / "u.keras")
    assert not (tmp_path / "u.keras").exists()
    data = json.loads(meta_path_for(copy).read_text(encoding="utf-8"))
    data["class_names"] = ["uncertain", "dog"]
    meta_path_for(copy).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="reserved"):
        load_model(copy)


@pytest.mark.parametrize("names", [("cat", ""), ("cat", "   "), ("cat",)])
def test_bad_class_names(names):
    with pytest.raises(ModelLoadError, match="class_names"):
        ModelMeta(class_names=names).validate("here")


def test_no_class_name_is_hard_coded(tmp_path):
    path = save_tiny_model(tmp_path, ("hamster", "rabbit"), size=16)
    loaded = load_model(path)
    assert loaded.meta.class_names == ("hamster", "rabbit")


def test_predicted_indices_binary_threshold_and_argmax():
    binary = ModelMeta(("cat", "dog"), threshold=0.7)
    probs = np.array([[0.4, 0.6], [0.3, 0.7], [0.1, 0.9]])
    assert binary.predicted_indices(probs).tolist() == [0, 1, 1]
    multi = ModelMeta(("a", "b", "c"))
    assert multi.predicted_indices(np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])).tolist() == [1, 0]


def test_how_to_get_a_model_is_actionable():
    assert "pawcam train" in HOW_TO_GET_A_MODEL and "config.toml" in HOW_TO_GET_A_MODEL


def test_model_and_metadata_from_different_saves_are_refused(tmp_path):
    """An install interrupted between replacing the model and its metadata is caught."""
    import shutil

    from tests.helpers import save_tiny_model

    first = save_tiny_model(tmp_path / "a")
    second = save_tiny_model(tmp_path / "b", nested=True, temperature=2.0)
    assert read_meta(first).model_sha256 and read_meta(first).model_sha256 == file_sha256(first)
    shutil.copyfile(second, first)  # new model, old metadata
    with pytest.raises(ModelLoadError, match="do not belong together"):
        load_model(first)
