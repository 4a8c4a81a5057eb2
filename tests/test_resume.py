"""Resumable bulk runs: skip what has an ok row (same path, same content), across SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from engine.bulk import run_bulk
from engine.classifier import Classifier
from engine.config import load_settings, replace
from engine.resume import DoneIndex, file_sha256
from tests.helpers import sigkill_once_rows, write_image
from tests.test_bulk import write_config


@pytest.fixture(scope="module")
def settings(tiny_model_path):
    s = load_settings(None)
    return replace(s, model=replace(s.model, path=tiny_model_path),
                   gradcam=replace(s.gradcam, max_side=64),
                   inference=replace(s.inference, batch_size=8))


@pytest.fixture(scope="module")
def classifier(settings):
    return Classifier.from_settings(settings)


def rows(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "predictions.csv", keep_default_na=False)


def test_resume_skips_done_redoes_changed_new_and_failed(tmp_path, settings, classifier):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(20):
        write_image(src / f"{i:02d}.jpg", seed=i)
    (src / "bad.jpg").write_bytes(b"not a picture")
    first = run_bulk([src], out, settings, classifier=classifier, show_progress=False)
    assert (first.total, first.errors, first.skipped) == (21, 1, 0)

    write_image(src / "05.jpg", seed=99)       # same name, other content: redone
    write_image(src / "new.jpg", seed=100)     # never seen: done
    again = run_bulk([src], out, settings, classifier=classifier, show_progress=False,
                     resume=True)
    assert (again.total, again.errors, again.skipped) == (3, 1, 19)
    assert any("skipped 19" in line for line in again.lines())
    df = rows(out)
    assert len(df) == 24
    latest = df.drop_duplicates("input_path", keep="last").set_index("input_path")
    assert latest.loc[str(src / "05.jpg"), "sha256"] == file_sha256(src / "05.jpg", False)
    assert (df["input_path"] == str(src / "new.jpg")).sum() == 1
    assert (df["input_path"] == str(src / "bad.jpg")).sum() == 2  # error rows are retried

    bad_gone = src / "bad.jpg"
    bad_gone.unlink()
    nothing = run_bulk([src], out, settings, classifier=classifier, show_progress=False,
                       resume=True)
    assert (nothing.total, nothing.skipped) == (0, 21)
    assert len(rows(out)) == 24


def test_resume_never_follows_a_link_to_a_done_file(tmp_path, settings, classifier):
    """A symlink put where a done file was is not 'done': it gets its error row."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a.jpg", seed=1)
    run_bulk([src], out, settings, classifier=classifier, show_progress=False)
    target = write_image(tmp_path / "elsewhere.jpg", seed=1)  # same bytes
    (src / "a.jpg").unlink()
    os.symlink(target, src / "a.jpg")
    summary = run_bulk([src], out, settings, classifier=classifier, show_progress=False,
                       resume=True)
    assert (summary.total, summary.errors, summary.skipped) == (1, 1, 0)
    assert "symbolic link" in rows(out)["error"].iloc[-1]


def test_done_index_reads_odd_names_and_formula_guarded_cells(tmp_path, settings, classifier):
    src, out = tmp_path / "in", tmp_path / "out"
    names = ["=cmd.jpg", 'q"uote, é.jpg', "new\nline.jpg", "-1.jpg"]
    for i, name in enumerate(names):
        write_image(src / name, seed=i)
    run_bulk([src], out, settings, classifier=classifier, show_progress=False)
    done = DoneIndex.load(out / "predictions.csv", classifier.meta.class_names)
    assert len(done) == 4
    assert all(done.is_done(src / name, False) for name in names)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_exactly_one_row_per_input(tmp_path, tiny_model_path):
    """A real `pawcam predict` killed with SIGKILL halfway, then --resume: one ok row each."""
    cfg = write_config(tmp_path, tiny_model_path)
    src, out = tmp_path / "in", tmp_path / "out"
    n = 400
    for i in range(n):
        write_image(src / f"img_{i:03d}.jpg", width=96, height=72, seed=i)
    cmd = [sys.executable, "-m", "engine.cli", "--config", str(cfg), "predict", str(src),
           "--out", str(out), "--batch-size", "4"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_once_rows(proc, out / "predictions.csv", 40)
    assert proc.returncode == -signal.SIGKILL
    before = len(rows(out))
    assert 0 < before < n, f"the run was not interrupted halfway ({before} rows)"

    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {before} already done" in resumed.stderr
    df = rows(out)
    assert len(df) == n
    assert sorted(df["input_path"]) == [str(src / f"img_{i:03d}.jpg") for i in range(n)]
    assert (df["status"] == "ok").all() and df["job_id"].is_unique
    again = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and f"skipped {n} already done" in again.stderr
    assert len(rows(out)) == n
