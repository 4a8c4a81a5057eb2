"""`pawcam predict --ray`: a real local Ray (2 CPUs, shared by the module) against local runs.

A tiny real model exported to ONNX (fp32) so actors start without TensorFlow. Faults are real:
an actor process killed with SIGKILL, a driver process killed with SIGKILL, and files whose
decoding kills the worker (a hook installed in every Ray worker makes a marked file do what a
crashing native decoder would: SIGKILL its own process).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from engine.bulk import run_bulk
from engine.config import load_settings, replace
from tests.helpers import sigkill_once_rows, write_image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CRASH_MARK = b"PAWCAM-TEST-CRASH"


def crash_on_marked_files() -> None:
    """Ray worker setup hook: decoding a file that starts with CRASH_MARK kills the worker."""
    import engine.classifier as classifier

    real = classifier.decode_image

    def decode_image(data, **kwargs):
        if data.startswith(CRASH_MARK):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, **kwargs)

    classifier.decode_image = decode_image


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": crash_on_marked_files,
                          "env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tests.helpers import save_tiny_model
    from training.export import export_model

    path = save_tiny_model(tmp_path_factory.mktemp("ray_model"))
    s = load_settings(None)
    export_model(path, replace(s, model=replace(s.model, path=path)), data=None, int8=False)
    return path


@pytest.fixture(scope="module")
def settings(model):
    s = load_settings(None)
    return replace(s, model=replace(s.model, path=model),
                   gradcam=replace(s.gradcam, max_side=64),
                   inference=replace(s.inference, batch_size=8, runtime="onnxruntime",
                                     precision="fp32"),
                   cluster=replace(s.cluster, actors=2, cpus_per_actor=1.0, batch_size=16))


def hostile_folder(src: Path, n: int) -> list[Path]:
    for i in range(n):
        write_image(src / f"img_{i:03d}.jpg", width=80 + i % 5, height=60, seed=i)
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("not a picture", encoding="utf-8")
    os.symlink(write_image(src.parent / "elsewhere.jpg", seed=7), src / "link.jpg")
    os.mkfifo(src / "pipe.jpg")
    write_image(src / "sub" / "deep.jpg", seed=8)
    write_image(src / "=odd, \"name\" é.jpg", seed=9)
    return [src, src.parent / "missing.jpg"]


def rows(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "predictions.csv", keep_default_na=False)


def run_ray(paths, out, settings, **kw):
    from engine.bulk_ray import run_bulk_ray

    return run_bulk_ray(paths, out, settings, show_progress=False, **kw)


def test_ray_rows_equal_a_local_run_with_hostile_files(tmp_path, ray_cluster, settings):
    paths = hostile_folder(tmp_path / "in", 200)
    local = run_bulk(paths, tmp_path / "local", settings, recursive=True, show_progress=False)
    remote = run_ray(paths, tmp_path / "ray", settings, recursive=True)
    assert (remote.total, remote.errors, remote.counts) == \
        (local.total, local.errors, local.counts) == (local.total, 5, local.counts)
    a = rows(tmp_path / "local").set_index("input_path").sort_index()
    b = rows(tmp_path / "ray").set_index("input_path").sort_index()
    assert list(a.columns) == list(b.columns) and list(a.index) == list(b.index)
    assert len(b) == 207
    for col in ("label", "status", "error", "width", "height", "sha256", "model_version"):
        assert (a[col] == b[col]).all(), col
    ok = a["status"] == "ok"
    for col in ("confidence", "prob_cat", "prob_dog"):
        diff = (a.loc[ok, col].astype(float) - b.loc[ok, col].astype(float)).abs()
        assert diff.max() <= 1e-6, col
    assert b["job_id"].is_unique
    pictures = sorted((tmp_path / "ray" / "gradcam").iterdir())
    assert len(pictures) == 3 * ok.sum()
    for kind in ("gray", "heatmap", "overlay"):
        named = b.loc[ok, f"{kind}_path"]
        assert named.is_unique and all((tmp_path / "ray" / p).is_file() for p in named)
    # same picture names apart from the run's own job ids
    strip = lambda p: p.split(".")[0] + "." + p.rsplit(".", 2)[-2]  # noqa: E731
    assert sorted(map(strip, a.loc[ok, "overlay_path"])) == \
        sorted(map(strip, b.loc[ok, "overlay_path"]))
    assert not list((tmp_path / "ray").glob(".pawcam-ray-*"))  # run folder cleaned up


def _actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::MapWorker") and b"ClassifierActor" in cmd:
                pids.append(int(entry.name))
    return pids


def test_worker_sigkill_is_retried_and_poison_files_become_error_rows(tmp_path, ray_cluster,
                                                                       settings):
    src = tmp_path / "in"
    n = 240
    for i in range(n):
        write_image(src / f"img_{i:03d}.jpg", width=96, height=72, seed=i)
    for name in ("poison_a.jpg", "poison_b.jpg"):
        (src / name).write_bytes(CRASH_MARK + b" a file that kills its decoder")
    out = tmp_path / "out"
    box: dict = {}
    run = threading.Thread(target=lambda: box.setdefault(
        "summary", run_ray([src], out, settings)), daemon=True)
    run.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and run.is_alive() and time.monotonic() < deadline:
        csv_path = out / "predictions.csv"
        if csv_path.exists() and csv_path.read_bytes().count(b"\r\n") > 16:
            for pid in _actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
        time.sleep(0.01)
    run.join(timeout=240)
    assert killed is not None, "no actor was killed while the run was going"
    summary = box["summary"]
    df = rows(out)
    assert len(df) == n + 2 and df["input_path"].is_unique
    errors = df[df["status"] == "error"].set_index("input_path")["error"]
    assert sorted(Path(p).name for p in errors.index) == ["poison_a.jpg", "poison_b.jpg"]
    assert all("killed a pawcam worker 2 times" in e for e in errors), list(errors)
    assert (summary.total, summary.errors) == (n + 2, 2)
    pictures = list((out / "gradcam").iterdir())
    assert len(pictures) == 3 * n  # a retried call rewrote its pictures under the same names
    assert all((out / p).is_file() for p in df.loc[df["status"] == "ok", "overlay_path"])


def test_driver_sigkill_then_resume_on_ray(tmp_path, ray_cluster, settings, model):
    address = ray_cluster.get_runtime_context().gcs_address
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\npath = "{model}"\n[gradcam]\nmax_side = 64\n'
                   '[inference]\nbatch_size = 4\nruntime = "onnxruntime"\nprecision = "fp32"\n'
                   '[cluster]\nactors = 2\ncpus_per_actor = 1.0\nbatch_size = 4\n', encoding="utf-8")
    src, out = tmp_path / "in", tmp_path / "out"
    n = 300
    for i in range(n):
        write_image(src / f"img_{i:03d}.jpg", width=96, height=72, seed=i)
    cmd = [sys.executable, "-m", "engine.cli", "--config", str(cfg), "predict", str(src),
           "--out", str(out), "--ray", address]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sigkill_once_rows(proc, out / "predictions.csv", 1)
    assert proc.returncode == -signal.SIGKILL
    before = len(rows(out))
    assert 0 < before < n, f"the driver was not killed halfway ({before} rows)"
    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {before} already done" in resumed.stderr
    df = rows(out)
    assert len(df) == n and df["input_path"].is_unique and (df["status"] == "ok").all()


def test_without_ray_installed_the_error_says_what_to_install(tmp_path, tiny_model_path):
    write_image(tmp_path / "in" / "a.jpg")
    script = ("import sys; sys.modules['ray'] = None; from engine.cli import main; "
              f"sys.exit(main(['predict', 'in', '--out', 'out', '--ray']))")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    assert 'pip install -e ".[ray]"' in r.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_list_file_round_trips_odd_names_and_chunks_cover_every_line(tmp_path):
    from engine.ray_work import chunks, write_list
    from engine.ray_work import decode_line as _decode_line

    names = [Path(f"/p/{i}.jpg") for i in range(23)]
    names[3] = Path("/p/new\nline,\t\"tab\".jpg")
    names[7] = Path(os.fsdecode(b"/p/latin1-\xe9.jpg"))  # not UTF-8: a surrogate escape
    inputs = [(p, i % 2 == 0) for i, p in enumerate(names)]
    total, offsets = write_list(inputs, tmp_path / "inputs.list", step=4)
    assert total == 23
    data = (tmp_path / "inputs.list").read_bytes()
    for per_chunk in (4, 8, 12, 100):
        seen = []
        for c in chunks(offsets, 4, per_chunk):
            lines = data[c["start"]:c["end"]].splitlines(keepends=True)
            decoded = [_decode_line(line) for line in lines]
            assert decoded[0][0] == c["first"]
            seen += decoded
        assert [(seq, follow, path) for seq, follow, path in seen] == \
            [(i + 1, follow, str(p)) for i, (p, follow) in enumerate(inputs)]
