"""The inbox daemon as users run it: real ``pawcam watch`` processes, real folders, real signals.

Each daemon start costs a TensorFlow import (5-10 s on 2 cores), so the scenarios are grouped:
one daemon takes the 1-, 50- and 500-file drops in sequence and is then stopped with SIGTERM.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import image_bytes, write_image
from tests.test_watcher_helpers import (
    DaemonProc,
    env,
    inbox_files,
    processing_leftovers,
    read_rows,
    wait_rows,
    write_config,
)

IGNORED = ["x.tmp", ".hidden.jpg", "y.jpg.crdownload", "z.jpg~", "w.jpg.part",
           "sub/.dotdir/inside.jpg"]


def slow_write(path: Path, data: bytes, chunks: int = 8, pause: float = 0.3) -> None:
    """Write ``data`` in chunks over ``chunks * pause`` seconds, keeping the file open."""
    step = -(-len(data) // chunks)
    with open(path, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            time.sleep(pause)


def check_outcome(rows: list[dict], outbox: Path, expected: set[str]) -> Counter:
    """Exactly one row per expected input; pictures for ok rows; inputs in processed/failed.

    The daemon commits a batch's rows first and then moves its files out: give the moves of
    the last batch a moment (a loaded machine) before looking for them."""
    def moved(r: dict) -> bool:
        return os.path.lexists(outbox / ("processed" if r["status"] == "ok" else "failed")
                               / r["input_path"])

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(moved(r) for r in rows):
        time.sleep(0.1)
    counts = Counter(r["input_path"] for r in rows)
    dupes = {k: v for k, v in counts.items() if v > 1}
    assert not dupes, f"duplicate rows: {dupes}"
    assert set(counts) == expected, (f"missing: {sorted(expected - set(counts))[:10]}, "
                                     f"unexpected: {sorted(set(counts) - expected)[:10]}")
    for r in rows:
        if r["status"] == "ok":
            for kind in ("gray", "heatmap", "overlay"):
                assert (outbox / r[f"{kind}_path"]).is_file(), r
            assert os.path.lexists(outbox / "processed" / r["input_path"]), r["input_path"]
        else:
            assert r["error"], r
            failed = outbox / "failed" / r["input_path"]
            assert os.path.lexists(failed), r["input_path"]
            note = failed.with_name(failed.name + ".error.txt").read_text(encoding="utf-8")
            assert "error:" in note
    return Counter(r["status"] for r in rows)


@pytest.mark.slow
def test_drops_of_1_50_500_files_each_give_exactly_one_row(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    staging = tmp_path / "staging"   # same file system, outside the inbox: for renames
    staging.mkdir()
    daemon = DaemonProc(cfg)
    try:
        daemon.wait_running()
        expected: set[str] = set()

        # -- 1 file ---------------------------------------------------------------------------
        write_image(inbox / "first.jpg", seed=1)
        expected.add("first.jpg")
        rows = wait_rows(daemon, outbox, 1, 30)
        assert rows[0]["status"] == "ok" and rows[0]["input_path"] == "first.jpg"

        # -- 50 files, of every kind --------------------------------------------------------------
        for rel in IGNORED:
            (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
            (inbox / rel).write_bytes(image_bytes(seed=99))
        for i in range(20):                                        # plain writes
            write_image(inbox / f"plain{i:02d}.jpg", seed=i)
            expected.add(f"plain{i:02d}.jpg")
        for i in range(8):                                         # subfolders
            rel = f"sub/a/s{i}.png" if i < 4 else f"sub/b/deeper/s{i}.jpg"
            write_image(inbox / rel, fmt="PNG" if i < 4 else "JPEG", seed=100 + i)
            expected.add(rel)
        for i in range(5):                                         # renamed in, one by one
            src = staging / f"mv{i}.jpg"
            write_image(src, seed=200 + i)
            os.rename(src, inbox / f"mv{i}.jpg")
            expected.add(f"mv{i}.jpg")
        folder = staging / "album"                                 # a whole folder renamed in
        for i in range(3):
            write_image(folder / f"alb{i}.jpg", seed=300 + i)
        os.rename(folder, inbox / "album")
        expected |= {f"album/alb{i}.jpg" for i in range(3)}
        for i in range(2):                                         # browser-style download
            part = inbox / f"dl{i}.jpg.part"
            part.write_bytes(image_bytes(seed=400 + i))
            os.rename(part, inbox / f"dl{i}.jpg")
            expected.add(f"dl{i}.jpg")
        slow_data = {f"slow{i}.jpg": image_bytes(width=400, height=300, seed=500 + i)
                     for i in range(3)}                           # written slowly, in chunks
        writers = [threading.Thread(target=slow_write, args=(inbox / n, d)) for n, d in
                   slow_data.items()]
        for t in writers:
            t.start()
        expected |= set(slow_data)
        hostile = {
            "empty.jpg": b"",
            "text.jpg": b"this is not a picture\n",
            "a,b \"quoted\".jpg": image_bytes(seed=600),
            "new\nline.jpg": image_bytes(seed=601),
            "ünïcødé 猫.jpg": image_bytes(seed=602),
            "=cmd|' calc'!A0.jpg": image_bytes(seed=603),
            "truncated.jpg": image_bytes(seed=604)[:300],
        }
        for name, data in hostile.items():
            (inbox / name).write_bytes(data)
        expected |= set(hostile)
        os.symlink("/etc/hostname", inbox / "link.jpg")            # must never be followed
        os.mkfifo(inbox / "fifo.jpg")                              # must never block
        expected |= {"link.jpg", "fifo.jpg"}
        for t in writers:
            t.join()
        assert len(expected) == 51
        rows = wait_rows(daemon, outbox, 51, 60)
        statuses = check_outcome(rows, outbox, expected)
        assert statuses["error"] == 5, statuses   # empty, text, truncated, link, fifo
        by_name = {r["input_path"]: r for r in rows}
        for name, data in slow_data.items():      # read only once complete
            assert by_name[name]["sha256"] == hashlib.sha256(data).hexdigest()
            assert by_name[name]["status"] == "ok"
        assert os.path.islink(outbox / "failed" / "link.jpg")
        assert "symbolic link" in by_name["link.jpg"]["error"]
        assert by_name["ünïcødé 猫.jpg"]["status"] == "ok"
        assert sorted(inbox_files(inbox)) == sorted(IGNORED)     # ignored files stay put

        # -- 500 files, as fast as possible ------------------------------------------------------
        names = [f"burst/{i % 5}/b{i:03d}.jpg" if i % 2 else f"b{i:03d}.jpg" for i in range(500)]
        data = image_bytes(seed=7)
        for rel in names:
            (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
            (inbox / rel).write_bytes(data)
        expected |= set(names)
        rows = wait_rows(daemon, outbox, 551, 180)
        statuses = check_outcome(rows, outbox, expected)
        assert statuses["ok"] == 546
        time.sleep(0.5)
        assert processing_leftovers(inbox) == []

        # -- status file and `pawcam status` -------------------------------------------------
        status = json.loads((outbox / "status.json").read_text())
        assert status["state"] == "running"
        assert status["processed"] == 551 and status["failed"] == 5
        assert status["model_version"] == "tiny-test-1"
        assert status["last_batch_size"] >= 1 and status["queue_depth"] == 0
        out = subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "status"],
                             capture_output=True, text=True, env=env(), timeout=60)
        assert out.returncode == 0, out.stderr
        assert "running" in out.stdout and "551 (546 ok, 5 failed" in out.stdout
        assert "tiny-test-1" in out.stdout

        # -- SIGTERM: clean exit ------------------------------------------------------------
        rc, seconds = daemon.stop(signal.SIGTERM)
        assert rc == 0, daemon.log_text()[-3000:]
        assert seconds < 10
        assert json.loads((outbox / "status.json").read_text())["state"] == "stopped"
        log = daemon.log_text()
        assert "batch of" in log and 'failed "link.jpg"' in log
        assert '"new\\nline.jpg"' in log                          # one line per event
    finally:
        daemon.close()


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_gives_exactly_one_row_per_file(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path, batch_size=8, max_wait_ms=50)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    names = [f"k{i:03d}.jpg" if i % 3 else f"d{i % 4}/k{i:03d}.jpg" for i in range(240)]
    for i, rel in enumerate(names[:160]):
        write_image(inbox / rel, seed=i)
    (inbox / "bad.jpg").write_bytes(b"nope")
    expected = set(names) | {"bad.jpg"}

    first = DaemonProc(cfg, log_name="first.log")
    try:
        first.wait_running()
        wait_rows(first, outbox, 20, 60)
        first.kill()                                     # SIGKILL mid-run
    finally:
        first.close()
    for i, rel in enumerate(names[160:], start=160):     # more files while it is down
        write_image(inbox / rel, seed=i)

    second = DaemonProc(cfg, log_name="second.log")
    try:
        second.wait_running()
        done = len(read_rows(outbox))
        wait_rows(second, outbox, min(done + 30, 200), 60)
        second.kill()                                    # and again
    finally:
        second.close()

    third = DaemonProc(cfg, "--once", log_name="third.log")
    try:
        rc = third.proc.wait(timeout=120)
        assert rc == 0, third.log_text()[-3000:]
    finally:
        third.close()
    rows = read_rows(outbox)
    statuses = check_outcome(rows, outbox, expected)
    assert statuses["error"] == 1
    assert processing_leftovers(inbox) == []
    assert inbox_files(inbox) == []
    raw = (outbox / "results.csv").read_bytes()
    assert raw.endswith(b"\r\n")
    assert "recovered" in (tmp_path / "second.log").read_text() + (tmp_path / "third.log").read_text()


@pytest.mark.slow
def test_polling_observer_settles_slow_writes_and_sigint_mid_burst_exits_cleanly(
        tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path, observer="polling", poll_seconds=0.2,
                       settle_ms=1000, batch_size=4, max_wait_ms=100)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # plays systemd
    notify.bind(str(tmp_path / "notify.sock"))
    messages: list[str] = []
    listener = threading.Thread(target=lambda: messages.extend(iter(
        lambda: notify.recv(4096).decode(), "END")), daemon=True)
    listener.start()
    daemon = DaemonProc(cfg, extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                        "WATCHDOG_USEC": "1000000"})
    try:
        daemon.wait_running()
        data = image_bytes(width=300, height=200, seed=3)
        slow_write(inbox / "slow.jpg", data, chunks=10, pause=0.25)  # 2.5 s, pauses < settle
        write_image(inbox / "quick.jpg", seed=4)
        rows = wait_rows(daemon, outbox, 2, 30)
        slow = next(r for r in rows if r["input_path"] == "slow.jpg")
        assert slow["status"] == "ok" and slow["sha256"] == hashlib.sha256(data).hexdigest()

        burst = [f"p{i:03d}.jpg" for i in range(120)]
        for i, name in enumerate(burst):
            write_image(inbox / name, seed=i)
        wait_rows(daemon, outbox, 4, 60)
        rc, seconds = daemon.stop(signal.SIGINT)
        assert rc == 0 and seconds < 10, daemon.log_text()[-3000:]
    finally:
        daemon.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as end:
        end.sendto(b"END", str(tmp_path / "notify.sock"))
    listener.join(5)
    notify.close()
    assert messages[0].startswith("READY=1")
    assert "WATCHDOG=1" in messages and messages[-1] == "STOPPING=1"
    rows = read_rows(outbox)
    counts = Counter(r["input_path"] for r in rows)
    assert max(counts.values()) == 1
    left = inbox_files(inbox)
    # every file is either done (one row) or back in the inbox untouched; none in between
    assert sorted(set(counts) | set(left)) == sorted(set(burst) | {"slow.jpg", "quick.jpg"})
    assert not set(counts) & set(left)
    assert processing_leftovers(inbox) == []
    assert json.loads((outbox / "status.json").read_text())["state"] == "stopped"


def test_missing_inbox_is_a_clear_error(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path)
    (tmp_path / "inbox").rmdir()
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "watch"],
                         capture_output=True, text=True, env=env(), timeout=60)
    assert out.returncode == 2
    assert "inbox" in out.stderr and "does not exist" in out.stderr


def test_status_without_a_status_file(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path)
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "status"],
                         capture_output=True, text=True, env=env(), timeout=60)
    assert out.returncode == 1 and "no status file" in out.stderr
