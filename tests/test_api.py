"""The Python front door (engine.api) and the example notebook that shows it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import ImageError
from tests.helpers import image_bytes, photo_like, write_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from engine.api import load

    return load(tiny_model_path, runtime="tensorflow")


def test_every_input_kind_gives_the_same_answer_as_the_cli_path(model, tmp_path):
    path = write_image(tmp_path / "a.png", fmt="PNG", width=64, height=48, seed=3)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    by_path = model.classify(path)
    by_bytes = model.classify(path.read_bytes())
    by_pil = model.classify(Image.open(path))
    by_array = model.classify(rgb)
    clf_row = model.classifier.process(
        [__import__("engine.classifier", fromlist=["Job"]).Job(path, "a.png", "j1")],
        out_dir=tmp_path / "out")[0]
    for p in (by_path, by_bytes, by_pil, by_array):
        assert p.ok and p.label == by_path.label
        assert np.allclose(list(p.probabilities.values()),
                           list(by_path.probabilities.values()), atol=1e-6)
    assert by_path.label == clf_row.label
    assert np.isclose(by_path.confidence, clf_row.confidence)
    pics = by_path.pictures()
    assert pics["gray"].shape == (48, 64) and pics["overlay"].shape == (48, 64, 3)
    assert by_path.image("heatmap").size == (64, 48)


def test_classify_many_streams_in_order_and_reports_bad_files(model, tmp_path):
    paths = [write_image(tmp_path / f"{i}.jpg", seed=i) for i in range(5)]
    (tmp_path / "bad.jpg").write_text("no picture")
    items = [*paths[:2], tmp_path / "bad.jpg", *paths[2:], tmp_path / "missing.jpg"]
    out = list(model.classify_many(items))
    assert [p.source for p in out] == [str(x) for x in items]
    assert [p.ok for p in out] == [True, True, False, True, True, True, False]
    assert "not a supported image" in out[2].error and "no such file" in out[-1].error
    mixed = list(model.classify_many([photo_like(40, 30, seed=1), image_bytes(seed=2), b"junk"]))
    assert [p.ok for p in mixed] == [True, True, False]


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ImageError, match="not a supported image"):
        model.classify(b"plain text")
    with pytest.raises(ImageError, match=r"\(H, W, 3\) uint8"):
        model.classify(np.zeros((10, 10), np.float32))
    with pytest.raises(TypeError, match="cannot classify a dict"):
        model.classify({})


def test_without_pictures_there_is_no_map(tiny_model_path, tmp_path):
    from engine.api import load

    fast = load(tiny_model_path, runtime="tensorflow", pictures=False)
    p = fast.classify(write_image(tmp_path / "x.jpg"))
    assert p.ok and p.cam is None
    with pytest.raises(ValueError, match="no Grad-CAM map"):
        p.pictures()


@pytest.mark.slow
def test_example_notebook_runs_end_to_end():
    """examples/from_python.ipynb executed by a real Jupyter kernel (nbclient), so it cannot rot."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if not (ROOT / "models" / "cat_dog_model.keras").is_file():
        pytest.skip("no shipped model")
    nb = nbformat.read(ROOT / "examples" / "from_python.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)   # the overlay was shown
