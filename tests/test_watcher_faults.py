"""The daemon on its worst day: real ``pawcam watch`` processes against real faults.

A real small file system (tmpfs, mounted by the test: CI runs as root; skipped with the reason
elsewhere) fills up and turns read-only; the inbox and outbox are removed and re-created; the
model is replaced under load and SIGHUP'ed, then broken and SIGHUP'ed. Errno cases that cannot
be made for real here (EIO, EDQUOT, EACCES as root) are injected at the durable-write layer of an
in-process daemon. Throughout: exactly one row per input, nothing left behind.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import fill_fs, image_bytes, tiny_model, write_image
from tests.test_watcher_daemon import check_outcome
from tests.test_watcher_helpers import (
    DaemonProc,
    env,
    inbox_files,
    processing_leftovers,
    read_rows,
    wait_rows,
    write_config,
)


class NotifyListener:
    """Plays systemd: collects what the daemon sends to $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            text = self.sock.recv(4096).decode()
            if text == "END":
                return
            self.messages.append((time.monotonic(), text))

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": "1000000"}

    def since(self, t: float) -> list[str]:
        return [m for at, m in self.messages if at >= t]

    def close(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as end:
            end.sendto(b"END", str(self.path))
        self.thread.join(5)
        self.sock.close()


def drop(inbox: Path, names: list[str], seed: int = 0) -> set[str]:
    for i, name in enumerate(names):
        write_image(inbox / name, seed=seed + i)
    return set(names)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pawcam_status(cfg: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "status"],
                         capture_output=True, text=True, env=env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_all_done(daemon: DaemonProc, expected: set[str]) -> None:
    rows = wait_rows(daemon, daemon.outbox, len(expected), 60)
    time.sleep(0.5)   # moves and the manifest drop follow the commit
    check_outcome(read_rows(daemon.outbox), daemon.outbox, expected)
    assert processing_leftovers(daemon.cfg.parent / "inbox") == []
    assert len(rows) == len(expected)


@pytest.mark.slow
def test_full_then_read_only_outbox_is_waited_out_with_one_row_per_file(
        tmp_path, tiny_model_path, small_fs):
    outbox = small_fs("outbox", 2048)                  # a real 2 MB file system
    cfg = write_config(tmp_path, tiny_model_path, batch_size=8, max_wait_ms=100,
                       settle_ms=300, min_free_mb=0)   # no floor: let it hit ENOSPC for real
    inbox = tmp_path / "inbox"
    systemd = NotifyListener(tmp_path / "notify.sock")
    daemon = DaemonProc(cfg, extra_env=systemd.env())
    try:
        daemon.wait_running()
        expected = drop(inbox, [f"a{i}.jpg" for i in range(5)])
        wait_rows(daemon, outbox, 5, 30)

        # -- the disk fills up: degraded, alive, READY, watchdog pings go on --------------------
        filler = fill_fs(outbox, 60_000)   # 15 tmpfs pages; a photo takes 4 (3 pictures, input)
        expected |= drop(inbox, [f"b{i:02d}.jpg" for i in range(30)], seed=10)
        status = daemon.wait_status(30, state="degraded")
        assert "No space left on device (ENOSPC)" in status["degraded_reason"], status
        assert status["degraded_since"] and status["next_retry_at"]
        shown = pawcam_status(cfg)
        assert "degraded" in shown and "No space left on device" in shown
        assert "resumes by itself" in shown
        t0 = time.monotonic()
        time.sleep(2.5)
        assert daemon.proc.poll() is None
        assert "WATCHDOG=1" in systemd.since(t0)
        assert any(m.startswith("STATUS=degraded") for m in systemd.since(0))
        rows = read_rows(outbox)
        assert len(rows) < len(expected)
        assert max(Counter(r["input_path"] for r in rows).values()) == 1

        # -- space freed: resumes by itself ---------------------------------------------------
        filler.unlink()
        assert_all_done(daemon, expected)
        status = daemon.wait_status(20, state="running")
        assert status["degraded_reason"] == ""
        assert "running" in pawcam_status(cfg)

        # -- read-only: waited out too --------------------------------------------------------
        subprocess.run(["mount", "-o", "remount,ro", str(outbox)], check=True)
        expected |= drop(inbox, [f"c{i}.jpg" for i in range(6)], seed=50)
        deadline = time.monotonic() + 30
        while "Read-only file system (EROFS)" not in daemon.log_text():
            assert time.monotonic() < deadline, daemon.log_text()[-3000:]
            assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.5)
        assert daemon.proc.poll() is None
        subprocess.run(["mount", "-o", "remount,rw", str(outbox)], check=True)
        assert_all_done(daemon, expected)
        daemon.wait_status(20, state="running")

        rc, _ = daemon.stop(signal.SIGTERM)
        assert rc == 0
    finally:
        daemon.close()
        systemd.close()
    log = daemon.log_text()
    assert "Traceback" not in log
    entered = log.count(" degraded: ")
    assert 2 <= entered <= 4, log[-4000:]             # one line per change, not per file
    assert log.count("resumed: ") >= 2
    assert inbox_files(inbox) == []
    assert systemd.messages[0][1].startswith("READY=1")


@pytest.mark.slow
def test_free_space_floor_pauses_claims_and_vanished_folders_are_recovered(
        tmp_path, tiny_model_path, small_fs):
    volume = small_fs("volume", 4096)                  # floor: min(1 MiB, 4 MiB / 10)
    outbox = volume / "outbox"
    cfg = write_config(tmp_path, tiny_model_path, outbox=outbox, min_free_mb=1,
                       max_wait_ms=100, settle_ms=300)
    inbox = tmp_path / "inbox"
    daemon = DaemonProc(cfg, outbox=outbox)
    try:
        daemon.wait_running()
        expected = drop(inbox, ["one.jpg"])
        wait_rows(daemon, outbox, 1, 30)

        # -- below the floor: nothing more is claimed, files wait in the inbox ----------------
        filler = fill_fs(volume, 300_000)
        expected |= drop(inbox, ["two.jpg", "three.jpg"], seed=2)
        status = daemon.wait_status(30, state="degraded")
        assert "below the floor" in status["degraded_reason"], status
        assert "min_free_mb = 1" in status["degraded_reason"]
        cpu0 = cpu_seconds(daemon.proc.pid)
        time.sleep(2.0)
        assert cpu_seconds(daemon.proc.pid) - cpu0 < 0.5   # waits, does not spin on ready files
        assert sorted(inbox_files(inbox)) == ["three.jpg", "two.jpg"]   # not claimed
        assert len(read_rows(outbox)) == 1
        filler.unlink()
        assert_all_done(daemon, expected)
        daemon.wait_status(20, state="running")

        # -- the inbox removed and re-created: watched again ---------------------------------
        shutil.rmtree(inbox)
        status = daemon.wait_status(10, state="degraded")
        assert "inbox" in status["degraded_reason"]
        inbox.mkdir()
        daemon.wait_status(10, state="running")
        expected |= drop(inbox, ["after-recreate.jpg", "sub/deep.jpg"], seed=7)
        assert_all_done(daemon, expected)

        # -- removed and re-created between two looks (rm -rf && mkdir) -----------------------
        shutil.rmtree(inbox)
        inbox.mkdir()
        time.sleep(1.5)
        expected |= drop(inbox, ["replaced.jpg"], seed=9)
        assert_all_done(daemon, expected)

        # -- the outbox removed: re-created, results go on in a new results.csv -----------------
        before = len(read_rows(outbox))
        shutil.rmtree(outbox)
        time.sleep(1.5)
        drop(inbox, ["new-outbox.jpg"], seed=11)
        rows = wait_rows(daemon, outbox, 1, 30)
        assert [r["input_path"] for r in rows] == ["new-outbox.jpg"] and before == len(expected)
        assert rows[0]["status"] == "ok"
        daemon.wait_status(10, state="running")
        rc, _ = daemon.stop(signal.SIGTERM)
        assert rc == 0
    finally:
        daemon.close()
    log = daemon.log_text()
    assert "Traceback" not in log
    assert "is gone" in log and "watching it again" in log and "outbox" in log
    assert processing_leftovers(inbox) == []


def save_model_version(path: Path, version: str, seed: int) -> None:
    from engine.modelio import ModelMeta, save_model

    meta = ModelMeta(class_names=("cat", "dog"), input_size=(32, 32), version=version)
    save_model(tiny_model(seed=seed), meta, path)


@pytest.mark.slow
def test_sighup_reloads_under_load_and_a_broken_model_keeps_the_old_one(tmp_path):
    model = tmp_path / "models" / "tiny.keras"
    save_model_version(model, "tiny-v1", seed=0)
    cfg = write_config(tmp_path, model, batch_size=8, max_wait_ms=100, settle_ms=300)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    staging = tmp_path / "staging"
    staging.mkdir()
    systemd = NotifyListener(tmp_path / "notify.sock")
    daemon = DaemonProc(cfg, extra_env=systemd.env())
    try:
        daemon.wait_running()
        names = [f"load{i:03d}.jpg" for i in range(160)]
        for i, name in enumerate(names):
            (staging / name).write_bytes(image_bytes(seed=i))
        for name in names:                                  # a burst: the daemon is busy
            os.rename(staging / name, inbox / name)
        wait_rows(daemon, outbox, 16, 60)
        save_model_version(model, "tiny-v2", seed=1)       # `pawcam train` installed a new one
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_status(60, model_version="tiny-v2")
        later = drop(inbox, [f"later{i:02d}.jpg" for i in range(20)], seed=300)
        assert_all_done(daemon, set(names) | later)         # none lost, none twice
        rows = read_rows(outbox)
        versions = [r["model_version"] for r in rows]
        assert versions[0] == "tiny-v1"
        first_v2 = versions.index("tiny-v2")
        assert set(versions[first_v2:]) == {"tiny-v2"}      # swapped between batches, once
        assert {r["model_version"] for r in rows if r["input_path"] in later} == {"tiny-v2"}
        sent = systemd.since(t0)
        assert any(m.startswith("RELOADING=1") for m in sent)
        assert any(m.startswith("READY=1") for m in sent)

        # -- a broken model: refused, the old one keeps serving -------------------------------
        model.write_bytes(b"this is not a keras archive")
        daemon.proc.send_signal(signal.SIGHUP)
        status = daemon.wait_status(60, last_reload=lambda v: bool(v) and "refused" in v)
        assert "still serving tiny-v2" in status["last_reload"]
        assert daemon.proc.poll() is None
        drop(inbox, ["after-broken.jpg"], seed=500)
        rows = wait_rows(daemon, outbox, 181, 30)
        assert rows[-1]["model_version"] == "tiny-v2" and rows[-1]["status"] == "ok"
        assert "reload refused" in pawcam_status(cfg) or "refused" in pawcam_status(cfg)
        rc, _ = daemon.stop(signal.SIGTERM)
        assert rc == 0
    finally:
        daemon.close()
        systemd.close()
    log = daemon.log_text()
    assert "reloaded: now serving model tiny-v2 (was tiny-v1)" in log
    assert "reload refused, still serving model tiny-v2" in log


# -- injected errno cases (cannot be made for real as root): an in-process daemon ---------------
INJECTIONS = [("csv", errno.EIO), ("manifest", errno.EDQUOT), ("move", errno.EACCES),
              ("status", errno.ENOSPC)]


@pytest.mark.parametrize("where,code", INJECTIONS, ids=[w for w, _ in INJECTIONS])
def test_injected_storage_faults_are_waited_out(tmp_path, monkeypatch, caplog, where, code):
    import logging

    import watcher.spool as spool_mod
    import watcher.status as status_mod
    from engine.results import ResultsCsv
    from tests.test_watcher_units import FakeClassifier, _config, _run_daemon
    from watcher.config import watcher_settings
    from watcher.daemon import Daemon

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = [f"f{i:02d}.jpg" for i in range(12)]
    for name in names:
        (inbox / name).write_bytes(b"IMG" + name.encode())
    fails = {"n": 0}

    def failing(fn, when=lambda *a, **k: True, times=2):
        def wrapper(*args, **kwargs):
            if when(*args, **kwargs) and fails["n"] < times:
                fails["n"] += 1
                raise OSError(code, os.strerror(code), "injected")
            return fn(*args, **kwargs)
        return wrapper

    if where == "csv":
        monkeypatch.setattr(ResultsCsv, "append", failing(ResultsCsv.append))
    elif where == "manifest":
        monkeypatch.setattr(spool_mod, "write_atomic", failing(
            spool_mod.write_atomic, lambda p, *a, **k: p.name.startswith("batch-")))
    elif where == "move":
        monkeypatch.setattr(spool_mod, "move_no_clobber", failing(spool_mod.move_no_clobber))
    elif where == "status":
        monkeypatch.setattr(status_mod, "write_atomic", failing(
            status_mod.write_atomic, times=3))
        monkeypatch.setattr(status_mod, "overwrite_in_place", lambda *a: False)

    settings = _config(tmp_path, "batch_size = 4\nmin_free_mb = 0")
    daemon = Daemon(settings, watcher_settings(settings), classifier=FakeClassifier())
    states: list[str] = []
    original_write = Daemon._write_state

    def record_state(self, state):
        states.append(state)
        original_write(self, state)

    monkeypatch.setattr(Daemon, "_write_state", record_state)

    def stop_when_done():
        deadline = time.monotonic() + 30
        path = tmp_path / "outbox" / "results.csv"
        while time.monotonic() < deadline:
            done = len(ResultsCsv(path, ("cat", "dog")).job_ids()) if path.exists() else 0
            if done >= len(names) and daemon.fault is None and not daemon.pending:
                break
            time.sleep(0.1)
        time.sleep(0.3)
        daemon.stop_requested = True

    stopper = threading.Thread(target=stop_when_done, daemon=True)
    stopper.start()
    with caplog.at_level(logging.INFO, logger="pawcam.watch"):
        assert _run_daemon(daemon) == 0
    stopper.join()
    assert fails["n"] >= 2
    assert "degraded" in states and states[-1] == "stopped"
    import csv as _csv

    with open(tmp_path / "outbox/results.csv", newline="", encoding="utf-8") as fh:
        rows = list(_csv.DictReader(fh))
    assert sorted(r["input_path"] for r in rows) == names          # exactly once each
    moved = sorted(os.listdir(tmp_path / "outbox" / "processed"))
    assert moved == names
    assert processing_leftovers(inbox) == []
    text = caplog.text
    entered = text.count("degraded: ")
    assert 1 <= entered <= fails["n"], text        # one line per change of state, not per file
    assert text.count("resumed: ") == entered and os.strerror(code) in text
    assert "retrying \"" not in text               # the files are summed up, not listed
