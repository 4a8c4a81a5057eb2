"""Training end to end on tiny synthetic data (real TensorFlow, tiny MobileNetV2, no mocks)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main as pawcam
from engine.config import load_settings
from engine.errors import ConfigError

COLORS = {"cat": (200, 60, 40), "dog": (40, 80, 210), "fox": (60, 190, 60)}


def make_dataset(root: Path, classes=("cat", "dog"), n_train: int = 14, n_test: int = 6,
                 seed: int = 0) -> Path:
    """Noisy pictures whose class is their dominant colour (learnable in a few epochs)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array(COLORS[name], np.float64)
                img = base + rng.normal(0, 35, size=(40, 48, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


def write_config(tmp: Path, **overrides) -> Path:
    training = {
        "image_size": 32, "alpha": 0.35, "backbone_weights": "none", "batch_size": 8,
        "head_epochs": 6, "head_learning_rate": 0.01, "head_patience": 6,
        "fine_tune_epochs": 1, "fine_tune_from": "block_16_expand", "gallery_size": 3,
        "validation_fraction": 0.25, "output_dir": "runs", "install_to": "installed/m.keras",
        "install": "always",
        # op determinism is process-wide: keep it off so other test modules run as usual
        "deterministic": False,
    }
    training.update(overrides)
    lines = ["[training]"] + [f"{k} = {json.dumps(v)}" for k, v in training.items()]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_log(run: Path) -> list[dict[str, str]]:
    with (run / "log.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """One real training run shared by the binary tests (keeps the suite fast)."""
    tmp = tmp_path_factory.mktemp("train")
    data = make_dataset(tmp / "data")
    # unusable files the pre-scan must skip and report
    (data / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (data / "train" / "dog" / "notes.jpg").write_text("this is not a picture\n")
    good = (data / "train" / "dog" / "dog_000.jpg").read_bytes()
    (data / "train" / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (data / "test" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff")  # JPEG header only
    cfg = write_config(tmp)
    run = tmp / "run1"
    rc = pawcam(["train", "--config", str(cfg), "--data", str(data), "--run-dir", str(run)])
    return tmp, data, run, rc


def test_train_writes_model_log_card_plots(binary_run):
    tmp, data, run, rc = binary_run
    assert rc == 0
    for name in ("model.keras", "model.json", "model.md", "log.csv",
                 "checkpoints/last.keras", "checkpoints/best.keras",
                 "model_report/evaluation.json", "model_report/training_curves.png",
                 "model_report/confusion_matrix.png", "model_report/roc_curve.png",
                 "model_report/reliability_diagram.png"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "model.json").read_text())
    assert meta["class_names"] == ["cat", "dog"]
    assert meta["input_size"] == [32, 32]
    assert meta["target_layer"] == "out_relu"
    assert meta["temperature"] > 0
    assert meta["extra"]["seed"] == 1337
    assert {"accuracy", "roc_auc", "ece", "ece_uncalibrated"} <= set(meta["metrics"])
    assert meta["extra"]["timing"]["train_seconds"] > 0
    card = (run / "model.md").read_text()
    assert "accuracy" in card and "model_report/roc_curve.png" in card
    # installed copy, with its own card linking to its own report folder
    inst = tmp / "installed"
    assert (inst / "m.keras").is_file() and (inst / "m.json").is_file()
    assert "m_report/confusion_matrix.png" in (inst / "m.md").read_text()


def test_loss_goes_down_and_log_has_both_phases(binary_run):
    _, _, run, _ = binary_run
    rows = read_log(run)
    head = [r for r in rows if r["phase"] == "head"]
    assert len(head) >= 2 and any(r["phase"] == "fine-tune" for r in rows)
    # a random backbone learns too: BatchNorm statistics come from the data (see model.py)
    assert float(head[-1]["loss"]) < 0.5 * float(head[0]["loss"])
    assert set(rows[0]) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}


def test_corrupt_files_are_skipped_and_reported(binary_run):
    _, _, run, _ = binary_run
    skipped = json.loads((run / "model.json").read_text())["extra"]["skipped"]
    by_name = {Path(s["path"]).name: s["code"] for s in skipped}
    assert by_name == {"empty.jpg": "empty_file", "notes.jpg": "not_an_image",
                       "truncated.jpg": "corrupt_image"}
    card = (run / "model.md").read_text()
    assert "empty.jpg" in card and "truncated.jpg" in card
    # a broken test photo is left out of the metrics and listed by the evaluation
    ev = json.loads((run / "model_report" / "evaluation.json").read_text())
    assert [Path(s["path"]).name for s in ev["skipped"]] == ["broken.jpg"]
    assert ev["metrics"]["n"] == 12 and "broken.jpg" in card


def test_fine_tuning_unfreezes_top_blocks_with_batchnorm_frozen():
    import keras

    from training.model import backbone_layers, build_model, check_flat, set_backbone_trainable

    model = build_model(2, (32, 32), alpha=0.35, weights=None)
    check_flat(model)
    layers = backbone_layers(model)
    assert layers[0].name == "Conv1" and layers[-1].name == "out_relu"
    assert set_backbone_trainable(model, False) == 0
    assert not any(layer.trainable for layer in layers)
    set_backbone_trainable(model, True, "block_15_expand")
    names = [layer.name for layer in layers]
    start = names.index("block_15_expand")
    for i, layer in enumerate(layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (i >= start and not is_bn), layer.name
    assert model.get_layer("classifier").trainable
    with pytest.raises(ConfigError, match="fine_tune_from"):
        set_backbone_trainable(model, True, "block_99_expand")


def test_engine_loads_trained_model_and_predicts(binary_run):
    from engine.classifier import Classifier, Job
    from engine.modelio import load_model
    from training.model import TARGET_LAYER

    _, data, run, _ = binary_run
    loaded = load_model(run / "model.keras")
    assert TARGET_LAYER in [layer.name for layer in loaded.model.layers]  # flat graph
    settings = load_settings(None)
    clf = Classifier.from_settings(settings, loaded=loaded)
    files = sorted((data / "test").rglob("*.jpg"))
    jobs = [Job(f, f.name, f"t{i}") for i, f in enumerate(files)]
    results = clf.process(jobs, out_dir=run / "predict_out")
    assert len(results) == len(files)
    bad = [r for r in results if r.status == "error"]
    assert [r.input_path for r in bad] == ["broken.jpg"]
    good = [r for r in results if r.status != "error"]
    probs = np.array([[r.probabilities["cat"], r.probabilities["dog"]] for r in good])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_evaluate_command_writes_report(binary_run, tmp_path):
    _, data, run, _ = binary_run
    rc = pawcam(["evaluate", "--data", str(data), "--model", str(run / "model.keras"),
                 "--out", str(tmp_path), "--faithfulness", "6"])
    assert rc == 0
    ev = json.loads((tmp_path / "model_report" / "evaluation.json").read_text())
    assert ev["metrics"]["n"] == 12
    assert len(ev["metrics"]["confusion_matrix"]) == 2
    assert (tmp_path / "model.md").is_file()
    # every method scored on the same 6 photos; the curves start at the photo itself
    faith = ev["faithfulness"]
    assert list(faith) == ["gradcam", "gradcampp", "layercam"]
    for method, f in faith.items():
        assert f["images"] == 6 and 0 <= f["keep_top_win_rate"] <= 1
        assert len(f["curves"]["deletion"]) == 11 and len(f["curves"]["road_morf"]) == 4
        assert f["curves"]["deletion"][0] == pytest.approx(f["curves"]["insertion"][-1])
    assert "tensorflow" in faith["layercam"]["maps_by"]
    card = (tmp_path / "model.md").read_text()
    assert "## Explanations" in card and "| `gradcampp` |" in card
    assert (tmp_path / "model_report" / "faithfulness.png").stat().st_size > 1000
    assert pawcam(["evaluate", "--data", str(data), "--model", str(run / "model.keras"),
                   "--out", str(tmp_path), "--methods", "gradcam,nope"]) != 0


def test_method_figure(binary_run, tmp_path):
    from engine.config import load_settings, replace
    from training.explanations import main

    _, data, run, _ = binary_run
    photos = sorted((data / "test" / "cat").glob("cat_00[01].jpg"))
    out = tmp_path / "fig.jpg"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{run / "model.keras"}"\n')
    assert main([*map(str, photos), "--out", str(out), "--config", str(cfg),
                 "--methods", "gradcam,layercam"]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (3 * 256, 2 * 256 * 40 // 48)  # photo + 2 overlays; 48x40 photos


def test_three_classes_softmax(tmp_path):
    from engine.modelio import load_model

    data = make_dataset(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=10, n_test=4)
    cfg = write_config(tmp_path, head_epochs=3, fine_tune_epochs=1, install="never",
                       gallery_size=2)
    run = tmp_path / "run"
    assert pawcam(["train", "--config", str(cfg), "--data", str(data), "--run-dir", str(run)]) == 0
    loaded = load_model(run / "model.keras")
    assert loaded.meta.class_names == ("cat", "dog", "fox")
    assert loaded.model.outputs[0].shape[-1] == 3
    ev = json.loads((run / "model_report" / "evaluation.json").read_text())
    assert np.asarray(ev["metrics"]["confusion_matrix"]).shape == (3, 3)
    assert not (tmp_path / "installed").exists()  # install = "never"


def test_training_settings_are_strict(tmp_path):
    from training.config import training_settings

    cfg = write_config(tmp_path, epochs=3)
    with pytest.raises(ConfigError, match="epochs"):
        training_settings(load_settings(cfg))
    cfg = write_config(tmp_path, validation_fraction=0.9)
    with pytest.raises(ConfigError, match="validation_fraction"):
        training_settings(load_settings(cfg))
    cfg = write_config(tmp_path, backbone_weights="weights/x.h5")
    ts = training_settings(load_settings(cfg))
    assert ts.weights_spec(tmp_path) == str(tmp_path / "weights" / "x.h5")
    assert ts.output_dir == tmp_path / "runs"


def test_missing_weights_file_is_a_config_error(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=3, n_test=1)
    cfg = write_config(tmp_path, backbone_weights="nowhere/w.h5")
    assert pawcam(["train", "--config", str(cfg), "--data", str(data)]) == 2


def test_missing_test_split_is_a_config_error(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=3, n_test=1)
    import shutil

    shutil.rmtree(data / "test")
    cfg = write_config(tmp_path)
    assert pawcam(["train", "--config", str(cfg), "--data", str(data)]) == 2


def test_squashed_check_is_recorded_in_the_card_and_kept_by_a_later_evaluate(binary_run,
                                                                             tmp_path):
    import shutil

    from engine.modelio import read_meta
    from training.report import add_squashed_check

    _, data, run, _ = binary_run
    shutil.copytree(run, tmp_path / "run")
    model = tmp_path / "run" / "model.keras"
    meta = read_meta(model)
    m = {"accuracy": 0.75, "roc_auc": 0.8125, "ece": 0.0312, "n": 12}
    card = add_squashed_check(model, meta, {
        "natural": m, "squashed": {**m, "accuracy": 0.5}, "label": "squashed to 20x20",
        "runtime": "test runtime", "how": "resized without keeping the aspect ratio."})
    text = card.read_text()
    assert "## Squashed photos" in text and "resized without keeping the aspect ratio." in text
    assert "| squashed to 20x20 | 50.00% | 0.81250 | 0.0312 | 12 |" in text
    assert "model_report/roc_curve.png" in text   # the rest of the card is still there
    # a later evaluate of the same model keeps the section
    assert pawcam(["evaluate", "--data", str(data), "--model", str(model),
                   "--faithfulness", "0"]) == 0
    assert "| squashed to 20x20 | 50.00% |" in card.read_text()
    # another model's evaluation is not silently re-labelled
    with pytest.raises(ValueError, match="pawcam evaluate"):
        add_squashed_check(model, _other_version(meta), {})


def _other_version(meta):
    import dataclasses

    return dataclasses.replace(meta, version="another")
