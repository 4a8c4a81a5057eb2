"""Bulk runs end to end: real tiny model, real files, the real `pawcam` command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from engine import bulk, pipeline
from engine.bulk import iter_inputs, make_jobs, run_bulk, run_jobs
from engine.classifier import Classifier
from engine.config import load_settings, replace
from tests.helpers import write_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def settings(tiny_model_path):
    s = load_settings(None)
    return replace(s, model=replace(s.model, path=tiny_model_path),
                   gradcam=replace(s.gradcam, max_side=64),
                   inference=replace(s.inference, batch_size=16))


@pytest.fixture(scope="module")
def classifier(settings):
    return Classifier.from_settings(settings)


def write_config(tmp_path: Path, model_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\npath = "{model_path}"\n[gradcam]\nmax_side = 64\n{extra}',
                   encoding="utf-8")
    return cfg


def pawcam(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_two_hundred_images_one_row_each_in_input_order(tmp_path, settings, classifier):
    src = tmp_path / "in"
    for i in range(200):
        write_image(src / f"img_{i:03d}.jpg", width=120 + i % 7, height=90, seed=i)
    summary = run_bulk([src], tmp_path / "out", settings, classifier=classifier,
                       show_progress=False)
    assert (summary.total, summary.errors) == (200, 0)
    df = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(df) == 200
    assert list(df["input_path"]) == [str(src / f"img_{i:03d}.jpg") for i in range(200)]
    assert (df["status"] == "ok").all()
    assert df["job_id"].is_unique
    assert ((df["prob_cat"] + df["prob_dog"]).sub(1).abs() < 1e-5).all()
    for kind in ("gray", "heatmap", "overlay"):
        paths = df[f"{kind}_path"]
        assert paths.is_unique
        assert all((tmp_path / "out" / p).is_file() for p in paths)
    assert sum(summary.counts.values()) == 200


def test_listing_is_streamed_with_bounded_look_ahead(tmp_path, settings, classifier):
    """The run never lists far ahead of what it has written: memory stays bounded."""
    src = tmp_path / "in"
    for i in range(120):
        write_image(src / f"{i:03d}.png", fmt="PNG", width=40, height=40, seed=i)
    csv_path = tmp_path / "out" / "predictions.csv"
    listed = 0
    worst = 0

    def counting_jobs():
        nonlocal listed, worst
        for job in make_jobs(iter_inputs([src]), "t"):
            listed += 1
            written = max(0, sum(1 for _ in open(csv_path, encoding="utf-8")) - 1) \
                if csv_path.exists() else 0
            worst = max(worst, listed - written)
            yield job

    run_jobs(classifier, counting_jobs(), tmp_path / "out")
    bound = settings.inference.batch_size * (pipeline.PREFETCH_BATCHES + 3)
    assert listed == 120
    assert worst <= bound, f"listed {worst} files ahead of the CSV (bound {bound})"


def test_hostile_folder_gives_error_rows_and_run_goes_on(tmp_path, settings, classifier):
    src = tmp_path / "in"
    write_image(src / "good.jpg", seed=1)
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("not a picture", encoding="utf-8")
    good = write_image(tmp_path / "elsewhere.jpg", seed=2)
    os.symlink(good, src / "link.jpg")
    os.mkfifo(src / "pipe.jpg")
    (src / ".hidden.jpg").write_bytes(b"skipped")
    summary = run_bulk([src, tmp_path / "missing.jpg"], tmp_path / "out", settings,
                       classifier=classifier, show_progress=False)
    df = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("input_path")
    assert summary.total == 6 and summary.errors == 5
    assert df.loc[str(src / "good.jpg"), "status"] == "ok"
    messages = {Path(p).name: df.loc[p, "error"] for p in df.index if df.loc[p, "status"] == "error"}
    assert "empty" in messages["empty.jpg"]
    assert "not a supported image" in messages["notes.jpg"]
    assert "symbolic link" in messages["link.jpg"]
    assert "not a regular file" in messages["pipe.jpg"]
    assert "no such file" in messages["missing.jpg"]
    assert str(src / ".hidden.jpg") not in df.index


def test_recursive_and_same_names_never_overwrite(tmp_path, settings, classifier):
    src = tmp_path / "in"
    write_image(src / "a" / "IMG_0001.jpg", seed=1)
    write_image(src / "b" / "IMG_0001.jpg", seed=2)
    flat = run_bulk([src], tmp_path / "out", settings, classifier=classifier, show_progress=False)
    assert flat.total == 0  # subfolders need --recursive
    run_bulk([src], tmp_path / "out", settings, recursive=True, classifier=classifier,
             show_progress=False)
    run_bulk([src], tmp_path / "out", settings, recursive=True, classifier=classifier,
             show_progress=False)  # a second run into the same folder appends
    df = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(df) == 4
    assert df["overlay_path"].is_unique
    assert len(list((tmp_path / "out" / "gradcam").iterdir())) == 12


def test_cli_predict_exit_codes_and_outputs(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path)
    write_image(tmp_path / "in" / "cat, \"quoted\" é.jpg", seed=3)
    ok = pawcam("--config", str(cfg), "predict", "in", "--out", "out", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "1 file(s)" in ok.stderr
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    some = pawcam("--config", str(cfg), "predict", "in", "--out", "out2", "--no-gradcam",
                  cwd=tmp_path)
    assert some.returncode == 1, some.stderr
    df = pd.read_csv(tmp_path / "out2" / "predictions.csv")
    assert df["overlay_path"].isna().all() and not (tmp_path / "out2" / "gradcam").exists()
    nothing = pawcam("--config", str(cfg), "predict", "empty_dir_missing", "--out", "o3",
                     cwd=tmp_path)
    assert nothing.returncode == 1  # a missing path is an error row, not a crash


def test_cli_config_and_model_errors(tmp_path, tiny_model_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[inference]\nbatch_sise = 8\n", encoding="utf-8")
    r = pawcam("--config", str(bad), "predict", ".", "--out", "o", cwd=tmp_path)
    assert r.returncode == 2 and "batch_sise" in r.stderr and "bad.toml" in r.stderr
    missing_model = write_config(tmp_path, tmp_path / "nope.keras")
    r = pawcam("--config", str(missing_model), "predict", ".", "--out", "o", cwd=tmp_path)
    assert r.returncode == 3 and "pawcam train" in r.stderr


def test_help_everywhere(tmp_path):
    r = pawcam("--help", cwd=tmp_path)
    assert r.returncode == 0 and "predict" in r.stdout
    r = pawcam("predict", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--recursive" in r.stdout and "Exit codes" in r.stdout


def test_output_folder_inside_the_input_is_never_fed_back(tmp_path, settings, classifier):
    src = tmp_path / "photos"
    write_image(src / "a.jpg", seed=1)
    write_image(src / "sub" / "b.jpg", seed=2)
    out = src / "results"
    for _ in range(2):  # the second run would see the first run's pictures if not skipped
        summary = run_bulk([src], out, settings, recursive=True, classifier=classifier,
                           show_progress=False)
        assert (summary.total, summary.errors) == (2, 0)
    df = pd.read_csv(out / "predictions.csv")
    assert sorted(Path(p).name for p in df["input_path"]) == ["a.jpg", "a.jpg", "b.jpg", "b.jpg"]


def test_deep_folder_trees_are_walked_without_recursion_limits(tmp_path):
    """1,100 nested folders (deeper than Python's recursion limit) list fine, in order."""
    depth = 1100
    top = tmp_path / "deep"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for _ in range(depth):  # one level at a time, relative to the folder above
        os.mkdir("d", dir_fd=fd)
        fd_next = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = fd_next
    os.close(os.open("bottom.jpg", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    (top / "a.jpg").write_bytes(b"x")
    (top / "z.jpg").write_bytes(b"x")
    try:
        found = [p for p, _ in iter_inputs([top], recursive=True)]
        assert [p.name for p in found] == ["a.jpg", "bottom.jpg", "z.jpg"]
        assert [p.name for p, _ in iter_inputs([top])] == ["a.jpg", "z.jpg"]
    finally:  # remove it bottom-up: recursive deleters (pytest's tmp cleanup) would overflow
        deepest = top / "/".join(["d"] * depth)
        (deepest / "bottom.jpg").unlink()
        for level in range(depth, 0, -1):
            os.rmdir(top / "/".join(["d"] * level))


def test_error_rows_keep_the_content_hash(tmp_path, settings, classifier):
    import hashlib

    bad = tmp_path / "in" / "notes.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a picture at all")
    run_bulk([bad.parent], tmp_path / "out", settings, classifier=classifier, show_progress=False)
    row = pd.read_csv(tmp_path / "out" / "predictions.csv").iloc[0]
    assert row["status"] == "error"
    assert row["sha256"] == hashlib.sha256(b"not a picture at all").hexdigest()


def test_bulk_run_onto_a_full_file_system_stops_cleanly_and_can_go_on(tmp_path, tiny_model_path,
                                                                       small_fs):
    """A real 2 MB tmpfs, nearly full, as the output: the run stops with exit code 4 and one clear line
    (folder, cause, rows safely written), no traceback, the CSV whole; freed, it runs again."""
    from tests.helpers import fill_fs

    cfg = write_config(tmp_path, tiny_model_path)
    for i in range(60):
        write_image(tmp_path / "in" / f"p{i:02d}.jpg", width=160, height=120, seed=i)
    out = small_fs("out", 2048)
    filler = fill_fs(out, 650_000)   # tmpfs: a 4 KiB page per picture: about 3 batches
    full = pawcam("--config", str(cfg), "predict", "in", "--out", str(out), cwd=tmp_path)
    assert full.returncode == 4, full.stderr
    assert "Traceback" not in full.stderr
    lines = [ln for ln in full.stderr.splitlines() if "ERROR" in ln]
    assert len(lines) == 1, full.stderr
    assert str(out) in lines[0] and "No space left on device (ENOSPC)" in lines[0]
    df = pd.read_csv(out / "predictions.csv")                       # whole: it parses
    assert f"{len(df)} row(s) are safely in" in lines[0]
    assert 0 < len(df) < 60 and (df["status"] == "ok").all()
    assert (out / "predictions.csv").read_bytes().endswith(b"\r\n")
    filler.unlink()
    again = pawcam("--config", str(cfg), "predict", "in", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(pd.read_csv(out / "predictions.csv")) == len(df) + 60


def test_bulk_run_onto_a_read_only_file_system(tmp_path, tiny_model_path, small_fs):
    cfg = write_config(tmp_path, tiny_model_path)
    write_image(tmp_path / "in" / "a.jpg", seed=1)
    out = small_fs("out", 1024)
    subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
    ro = pawcam("--config", str(cfg), "predict", "in", "--out", str(out / "sub"), cwd=tmp_path)
    assert ro.returncode == 4, ro.stderr
    assert "Traceback" not in ro.stderr and "Read-only file system (EROFS)" in ro.stderr
