"""Training data at scale: several folders, symbolic links, the on-disk caches (real files,
real TensorFlow; no mocks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main as pawcam
from engine.config import DecodeSettings
from engine.errors import ConfigError
from training import cache
from training.dataset import scan_sources, walk_files
from training.photos import decode_to_cache
from tests.test_training import make_dataset, write_config

REPO = Path(__file__).resolve().parents[1]


# -- record files ------------------------------------------------------------------------

def test_record_file_round_trip_any_order(tmp_path):
    data = np.arange(7 * 4 * 3, dtype=np.float16).reshape(7, 4, 3)
    with cache.RecordWriter(tmp_path / "r.f16", (4, 3), np.float16) as w:
        w.append(data[:3])
        w.append(data[3:])
    r = cache.RecordReader(tmp_path / "r.f16", (4, 3), np.float16)
    assert len(r) == 7
    idx = np.array([6, 0, 1, 2, 5, 5])
    assert np.array_equal(r.read(idx), data[idx])
    assert np.array_equal(r.range(5, 99), data[5:])
    with pytest.raises(IndexError):
        r.read([7])


def test_batch_plan_covers_every_item_once_per_epoch():
    a, b = (None, np.arange(10)), (None, np.arange(10, 16))
    rng = np.random.default_rng(0)
    seen = []
    for plan in cache.batch_plan([a, b], 4, rng):
        for k, rec, pos in plan:
            seen += [(k, int(x)) for x in rec]
            assert np.array_equal(np.concatenate([a[1], b[1]])[pos], rec)
    assert sorted(seen) == [(0, i) for i in range(10)] + [(1, i) for i in range(10, 16)]
    # pick_one: two views of the same 10 items, each item once, from one of them
    items = []
    for plan in cache.batch_plan([(None, np.arange(10)), (None, np.arange(10))], 3, rng, True):
        items += [int(p) for _, _, pos in plan for p in pos]
    assert sorted(items) == list(range(10))


def test_disk_full_while_caching_is_a_clear_error(tmp_path):
    """A file-size limit makes writes fail like a full disk (EFBIG): CacheWriteError, and the
    partial cache is gone, not left to be reused."""
    script = f"""
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
sys.path.insert(0, {str(REPO)!r})
from engine.config import DecodeSettings
from training.cache import CacheWriteError
from training.photos import decode_to_cache
files = sorted(Path({str(tmp_path / 'data')!r}).rglob('*.jpg'))
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
try:
    decode_to_cache(files, [(1, 1)] * len(files), Path({str(tmp_path / 'c' / 'images')!r}),
                    input_size=(64, 64), decode=DecodeSettings(), chunk=2)
except CacheWriteError as exc:
    print("ERROR:", exc)
"""
    make_dataset(tmp_path / "data", n_train=4, n_test=1)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert "ERROR: disk full while writing the training cache" in out.stdout, out.stderr
    assert not (tmp_path / "c" / "images").exists()
    assert not (tmp_path / "c" / "images.partial").exists()


def test_partial_cache_is_never_reused_and_a_complete_one_is(tmp_path):
    make_dataset(tmp_path / "data", n_train=3, n_test=1)
    data = scan_sources([tmp_path / "data"])
    folder = tmp_path / "cache" / "images"
    kw = dict(input_size=(32, 32), decode=DecodeSettings())
    first = decode_to_cache(data.files, data.stamps, folder, **kw)
    assert not first.reused and len(first.reader) == 6
    pixels = first.reader.read(np.arange(6))
    assert decode_to_cache(data.files, data.stamps, folder, **kw).reused
    # a build interrupted before its rename: the partial folder is rebuilt, never read
    os.rename(folder, cache.partial_dir(folder))
    (cache.partial_dir(folder) / "images.u8").write_bytes(b"\0" * 10)
    again = decode_to_cache(data.files, data.stamps, folder, **kw)
    assert not again.reused and not cache.partial_dir(folder).exists()
    assert np.array_equal(again.reader.read(np.arange(6)), pixels)
    # another input size (or other files) is another key: rebuilt
    assert not decode_to_cache(data.files, data.stamps, folder, input_size=(40, 40),
                               decode=DecodeSettings()).reused


# -- folders and links -------------------------------------------------------------------

def test_several_folders_classes_must_agree_one_test_split(tmp_path):
    main = make_dataset(tmp_path / "main", n_train=3, n_test=2)
    extra = make_dataset(tmp_path / "extra", n_train=4, n_test=1, seed=1)
    import shutil

    shutil.rmtree(extra / "test")
    data = scan_sources([main, extra])
    assert data.class_names == ("cat", "dog") and data.test_dir == main / "test"
    assert len(data.files) == 14 and np.bincount(data.origin).tolist() == [6, 8]
    assert [s.train_counts for s in data.sources] == [{"cat": 3, "dog": 3}, {"cat": 4, "dog": 4}]
    with pytest.raises(ConfigError, match="several data folders hold a test/"):
        scan_sources([main, make_dataset(tmp_path / "other", n_train=2, n_test=1)])
    fox = make_dataset(tmp_path / "fox", classes=("cat", "fox"), n_train=2, n_test=1)
    shutil.rmtree(fox / "test")
    with pytest.raises(ConfigError, match="do not match the training classes"):
        scan_sources([main, fox])
    with pytest.raises(ConfigError, match="no test/ folder"):
        scan_sources([extra])
    with pytest.raises(ConfigError, match="no train/ folder"):
        scan_sources([main, tmp_path / "nowhere"])


def test_links_inside_training_folders_are_followed(tmp_path):
    photos = make_dataset(tmp_path / "photos", n_train=3, n_test=2)  # kept elsewhere
    data = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (data / split / name).mkdir(parents=True)
    for f in sorted((photos / "train" / "cat").iterdir()):
        (data / "train" / "cat" / f.name).symlink_to(f)            # linked files
    (data / "train" / "dog" / "linked").symlink_to(photos / "train" / "dog")  # linked folder
    (data / "train" / "dog" / "loop").symlink_to(data / "train" / "dog")      # a loop ends
    (data / "train" / "dog" / "twice.jpg").symlink_to(photos / "train" / "dog" / "dog_000.jpg")
    (data / "train" / "cat" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    for name in ("cat", "dog"):
        for f in sorted((photos / "test" / name).iterdir()):
            (data / "test" / name / f.name).write_bytes(f.read_bytes())
    # a training photo that is also a test photo (hard link) must not leak into training
    os.link(data / "test" / "cat" / "cat_000.jpg", data / "train" / "cat" / "leak.jpg")
    assert len(walk_files(data / "train" / "dog")) == 4  # 3 via the folder link + twice.jpg
    scanned = scan_sources([data])
    codes = {Path(s.path).name: s.code for s in scanned.skipped}
    assert codes == {"leak.jpg": "duplicate", "twice.jpg": "duplicate"} or \
        codes == {"leak.jpg": "duplicate", "dog_000.jpg": "duplicate"}
    images = decode_to_cache(scanned.files, scanned.stamps, tmp_path / "c",
                             input_size=(32, 32), decode=DecodeSettings())
    assert [s.code for s in images.skipped] == ["unreadable"]  # the broken link
    assert len(images.reader) == 6  # 3 linked cats + 3 dogs, each once


# -- end to end --------------------------------------------------------------------------

def test_train_on_two_folders_with_cached_activations(tmp_path):
    main = make_dataset(tmp_path / "main", n_train=8, n_test=4)
    extra = make_dataset(tmp_path / "extra", n_train=6, n_test=1, seed=3)
    import shutil

    shutil.rmtree(extra / "test")
    (extra / "train" / "dog" / "bad.jpg").write_bytes(b"not an image")
    cfg = write_config(tmp_path, fine_tune_cache=True, fine_tune_schedule="cosine",
                       fine_tune_epochs=2, fine_tune_learning_rate=1e-3, install="never",
                       keep_cache=True)
    run = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--data", str(main), "--data", str(extra),
            "--run-dir", str(run)]
    assert pawcam(args) == 0
    meta = json.loads((run / "model.json").read_text())
    sources = meta["extra"]["data"]["sources"]
    assert [Path(s["root"]).name for s in sources] == ["main", "extra"]
    assert sources[0]["test_files"] == {"cat": 4, "dog": 4} and sources[1]["test_files"] is None
    assert sources[1]["used"] == {"cat": 6, "dog": 6} and sources[1]["skipped"] == 1
    assert sum(meta["extra"]["data"]["train_counts"].values()) + \
        sum(meta["extra"]["data"]["val_counts"].values()) == 28
    rows = [r for r in (run / "log.csv").read_text().splitlines()[1:] if r.startswith("fine")]
    assert len(rows) >= 1
    card = (run / "model.md").read_text()
    assert "extra" in card and "main" in card
    # the caches stay (keep_cache) and are complete; a second run reuses them
    assert (run / "cache" / "images" / "index.json").is_file()
    assert (run / "cache" / "activations" / "index.json").is_file()
    assert pawcam(args) == 0
    # the model serves through the engine like any other
    from engine.modelio import load_model

    loaded = load_model(run / "model.keras")
    assert loaded.meta.class_names == ("cat", "dog")


def test_keep_cache_false_removes_it(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_test=2)
    cfg = write_config(tmp_path, fine_tune_epochs=0, install="never")
    run = tmp_path / "run"
    assert pawcam(["train", "--config", str(cfg), "--data", str(data), "--run-dir", str(run)]) == 0
    assert (run / "model.keras").is_file() and not (run / "cache").exists()
