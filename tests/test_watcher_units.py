"""Unit tests of the watcher's pure policy, sd_notify sender, settings, spool and recovery.

No TensorFlow here: recovery runs the real Daemon in-process with a fake classifier.
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.config import load_settings
from engine.durable import free_name, is_temp, move_no_clobber, numbered_name, rename_noreplace
from engine.errors import ConfigError, ImageError
from engine.results import STATUS_ERROR, Result, ResultsCsv
from watcher.config import DEFAULT_IGNORE, WatcherSettings, watcher_settings
from watcher.policy import (
    Tracker,
    batch_deadline,
    batch_ready,
    is_ignored,
    settled,
)
from watcher.sdnotify import Notifier, sd_notify, socket_address, watchdog_interval
from watcher.spool import Spool
from watcher.status import Status, format_status, read_status


# -- pure policy ------------------------------------------------------------------------------
@pytest.mark.parametrize("rel, ignored", [
    ("photo.jpg", False), ("cats/tom.jpg", False), ("a,b \"c\"\n.jpg", False),
    (".hidden.jpg", True), ("x.part", True), ("x.jpg.part", True), ("x.tmp", True),
    ("x.jpg.crdownload", True), ("x.jpg~", True), (".pawcam-processing/w1", True),
    ("sub/.git/x.jpg", True), ("tmp.d/x.jpg", False), ("", True),
])
def test_is_ignored(rel, ignored):
    assert is_ignored(rel, DEFAULT_IGNORE) is ignored


def test_settled_uses_elapsed_time_plus_mtime_age():
    assert not settled(now=10.5, since=10.0, age_at_first_sight=0.0, settle_s=1.0)
    assert settled(now=11.0, since=10.0, age_at_first_sight=0.0, settle_s=1.0)
    assert settled(now=10.0, since=10.0, age_at_first_sight=5.0, settle_s=1.0)  # old file
    assert not settled(now=10.0, since=10.0, age_at_first_sight=-3.0, settle_s=1.0)  # clock skew


def test_batch_ready_full_or_waited_long_enough():
    assert not batch_ready(now=5.0, first_ready=None, count=0, batch_size=4, max_wait_s=0.5)
    assert not batch_ready(now=5.1, first_ready=5.0, count=1, batch_size=4, max_wait_s=0.5)
    assert batch_ready(now=5.5, first_ready=5.0, count=1, batch_size=4, max_wait_s=0.5)
    assert batch_ready(now=5.0, first_ready=5.0, count=4, batch_size=4, max_wait_s=0.5)
    assert batch_deadline(5.0, 0.5) == 5.5 and batch_deadline(None, 0.5) is None


def test_free_names_never_clobber():
    assert numbered_name("photo.jpg", 0) == "photo.jpg"
    assert numbered_name("photo.jpg", 2) == "photo (2).jpg"
    assert numbered_name("README", 1) == "README (1)"
    assert numbered_name(".x", 1) == ".x (1)"
    taken = {"a.jpg", "a (1).jpg"}
    assert free_name("a.jpg", taken.__contains__) == "a (2).jpg"


def _st(size=10, mtime=100.0, mode=stat.S_IFREG | 0o644):
    return SimpleNamespace(st_mode=mode, st_size=size, st_mtime_ns=int(mtime * 1e9))


def test_tracker_settles_closes_and_batches():
    t = Tracker(settle_s=1.0, batch_size=2, max_wait_s=0.5)
    t.observe("a.jpg", _st(10, 100.0), now=0.0, wall=100.0)           # fresh: must settle
    assert t.ready == {} and t.due_checks(0.5) == []
    assert t.due_checks(1.0) == ["a.jpg"] and t.next_check() == 1.0
    t.observe("a.jpg", _st(20, 100.5), now=1.0, wall=101.0)           # grew: restart
    assert t.ready == {}
    t.observe("a.jpg", _st(20, 100.5), now=2.0, wall=102.0)           # stable 1 s: ready
    assert list(t.ready) == ["a.jpg"]
    assert not t.batch_due(2.2) and t.batch_due(2.5) and t.deadline() == 2.5
    t.observe("b.jpg", _st(5, 102.0), now=2.1, wall=102.1, complete=True)  # closed: at once
    assert t.batch_due(2.1)                                            # full
    assert [c.rel for c in t.take()] == ["a.jpg", "b.jpg"] and t.depth == 0


def test_tracker_old_files_symlinks_and_reopened_files():
    t = Tracker(settle_s=2.0, batch_size=10, max_wait_s=0.5)
    t.observe("old.jpg", _st(10, 50.0), now=0.0, wall=100.0)           # mtime 50 s old
    t.observe("link.jpg", _st(10, 99.9, mode=stat.S_IFLNK | 0o777), now=0.0, wall=100.0)
    assert set(t.ready) == {"old.jpg", "link.jpg"}
    t.observe("c.jpg", _st(10, 100.0), now=0.0, wall=100.0, complete=True)
    assert "c.jpg" in t.ready
    t.observe("c.jpg", _st(30, 100.2), now=0.2, wall=100.2)            # written again
    assert "c.jpg" not in t.ready
    t.forget("old.jpg")
    t.forget_under("")  # no-op on an empty prefix match of nothing named "/"
    assert "old.jpg" not in t.candidates


# -- sd_notify over a real unix datagram socket ----------------------------------------------
def test_sd_notify_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(2)
        assert sd_notify("READY=1", "STATUS=hi", env={"NOTIFY_SOCKET": path})
        assert server.recv(4096) == b"READY=1\nSTATUS=hi"


def test_sd_notify_abstract_socket_and_watchdog():
    name = f"@pawcam-test-{os.getpid()}"
    assert socket_address(name) == b"\0" + name[1:].encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(socket_address(name))
        server.settimeout(2)
        env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
        n = Notifier.from_env(True, env)
        assert n.interval == 2.0
        n.ping(10.0)
        n.ping(11.0)              # too soon: nothing sent
        n.ping(12.0)
        assert server.recv(100) == b"WATCHDOG=1"
        assert server.recv(100) == b"WATCHDOG=1"
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.recv(100)


def test_sd_notify_is_a_no_op_without_systemd(tmp_path):
    assert not sd_notify("READY=1", env={})
    assert not sd_notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert not Notifier.from_env(False, {"NOTIFY_SOCKET": "/x"}).enabled


# -- settings ---------------------------------------------------------------------------------
def _settings(tmp_path, text):
    cfg = tmp_path / "config.toml"
    cfg.write_text(text, encoding="utf-8")
    return load_settings(cfg)


def test_documented_config_section_matches_the_defaults():
    """The [watcher] section of the project's config.toml documents the built-in defaults."""
    settings = load_settings(Path(__file__).resolve().parents[1] / "config.toml")
    assert settings.extra_sections["watcher"], "config.toml lacks a [watcher] section"
    assert watcher_settings(settings) == WatcherSettings()


def test_watcher_settings_defaults_and_overrides(tmp_path):
    w = watcher_settings(_settings(tmp_path, "[watcher]\nsettle_ms = 100\nobserver = \"polling\"\n"))
    assert w.settle_ms == 100 and w.observer == "polling" and w.ignore == DEFAULT_IGNORE
    s = _settings(tmp_path, "[inference]\nbatch_size = 7\n")
    assert watcher_settings(s).effective_batch_size(s) == 7
    assert WatcherSettings(batch_size=3).effective_batch_size(s) == 3


@pytest.mark.parametrize("text, key", [
    ("[watcher]\nsettel_ms = 1\n", "settel_ms"),
    ("[watcher]\nsettle_ms = \"1\"\n", "settle_ms"),
    ("[watcher]\nobserver = \"fanotify\"\n", "observer"),
    ("[watcher]\nprocessing_dir = \"work\"\n", "processing_dir"),
    ("[watcher]\non_success = \"keep\"\n", "on_success"),
    ("[watcher]\nresults_csv = \"a/b.csv\"\n", "results_csv"),
])
def test_watcher_settings_errors_name_key_and_file(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        watcher_settings(_settings(tmp_path, text))
    assert key in str(err.value) and "config.toml" in str(err.value)


def _left(sp) -> list[str]:
    return sorted(n for n in os.listdir(sp.processing) if n != ".lock")


# -- spool: claim, finalize, no clobbering ----------------------------------------------------
def _spool(tmp_path, **kw):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir(exist_ok=True)
    return Spool(inbox, inbox / ".pawcam-processing", outbox / "processed", outbox / "failed", **kw)


def test_claim_and_finalize_keep_relative_paths_and_never_overwrite(tmp_path):
    sp = _spool(tmp_path)
    (sp.inbox / "sub").mkdir()
    for rel in ("sub/a.jpg", "b.jpg"):
        (sp.inbox / rel).write_bytes(rel.encode())
    batch = sp.claim("b1", [("j1", "sub/a.jpg", 0.0), ("j2", "b.jpg", 0.0), ("j3", "gone.jpg", 0.0)])
    assert [i.input_path for i in batch.items] == ["sub/a.jpg", "b.jpg"]        # vanished: skipped
    assert batch.manifest.exists() and not (sp.inbox / "b.jpg").exists()
    (sp.processed / "sub").mkdir(parents=True)
    (sp.processed / "sub/a.jpg").write_bytes(b"older")
    where = sp.finalize(batch.items[0], ok=True)
    assert where.endswith("sub/a (1).jpg") and (sp.processed / "sub/a.jpg").read_bytes() == b"older"
    where = sp.finalize(batch.items[1], ok=False, error="not an image")
    assert Path(where) == sp.failed / "b.jpg"
    assert "not an image" in (sp.failed / "b.jpg.error.txt").read_text()
    sp.drop_manifest(batch)
    assert _left(sp) == []


def test_rename_noreplace_and_symlinks_are_moved_not_followed(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    os.symlink("/etc/hostname", tmp_path / "link")
    dst = move_no_clobber(tmp_path / "link", tmp_path / "out", "link")
    assert os.path.islink(dst) and os.readlink(dst) == "/etc/hostname"


def test_unclaim_returns_files_to_the_inbox(tmp_path):
    sp = _spool(tmp_path)
    (sp.inbox / "a.jpg").write_bytes(b"x")
    batch = sp.claim("b1", [("j1", "a.jpg", 0.0)])
    sp.unclaim(batch)
    assert (sp.inbox / "a.jpg").read_bytes() == b"x" and _left(sp) == []


# -- recovery with the real daemon loop and a fake classifier ----------------------------------
class FakeClassifier:
    meta = SimpleNamespace(class_names=("cat", "dog"), version="fake-1", input_size=(8, 8))

    def try_decode(self, job):
        from engine.decode import DecodedImage, read_file_bytes

        try:
            data = read_file_bytes(job.source, max_bytes=10**6, follow_symlinks=False)
        except ImageError as exc:
            return exc
        if not data.startswith(b"IMG"):
            return ImageError("not an image")
        return DecodedImage(np.zeros((8, 8, 3), np.uint8), None, 8, 8,
                            hashlib.sha256(data).hexdigest())

    def infer(self, images):
        return np.tile([0.2, 0.8], (len(images), 1)), None

    def finish(self, job, image, probs, cam, out_dir, durable=False):
        return Result(input_path=job.input_path, job_id=job.job_id, label="dog",
                      confidence=float(probs[1]), probabilities={"cat": 0.2, "dog": 0.8},
                      width=8, height=8, model_version="fake-1", sha256=image.sha256)

    def error_result(self, job, error, sha256=""):
        return Result(input_path=job.input_path, job_id=job.job_id, status=STATUS_ERROR,
                      error=str(error), model_version="fake-1")


def _run_once(tmp_path):
    """One `--once` pass of a daemon with the default batch size (a restart)."""
    return _run_daemon(_daemon(tmp_path, batch_size=None))


def test_recovery_finalizes_committed_and_redoes_uncommitted(tmp_path):
    """A crash after the commit of j1/j2 but before their moves, with j3 claimed but not
    committed, a partial CSV line, a stray temp file and a manifest entry whose file is gone."""
    sp = _spool(tmp_path)
    for name, data in (("a.jpg", b"IMG-a"), ("b.jpg", b"junk"), ("c.jpg", b"IMG-c"),
                       ("gone.jpg", b"IMG-g")):
        (sp.inbox / name).write_bytes(data)
    batch = sp.claim("b1", [("j1", "a.jpg", 0), ("j2", "b.jpg", 0), ("j3", "c.jpg", 0),
                            ("j4", "gone.jpg", 0)])
    os.unlink(batch.items[3].path)                       # finalized (deleted) before the crash
    csv_path = tmp_path / "outbox" / "results.csv"
    ResultsCsv(csv_path, ("cat", "dog")).append([
        Result("a.jpg", "j1", label="dog", confidence=0.8),
        Result("b.jpg", "j2", status=STATUS_ERROR, error="not an image"),
    ])
    with open(csv_path, "ab") as fh:
        fh.write(b"c.jpg,dog,0.8")                        # partial record: power cut mid-write
    (sp.processing / ".tmp-batch-b2.json.123").write_text("{")
    (sp.inbox / "new.jpg").write_bytes(b"IMG-new")        # dropped while the daemon was down

    assert _run_once(tmp_path) == 0
    rows = ResultsCsv(csv_path, ("cat", "dog"))
    outcomes = ResultsCsv(csv_path, ("cat", "dog")).outcomes({"j1", "j2", "j3"})
    assert outcomes == {"j1": ("ok", ""), "j2": ("error", "not an image"), "j3": ("ok", "")}
    import csv as _csv
    with open(csv_path, newline="") as fh:
        names = [r["input_path"] for r in _csv.DictReader(fh)]
    assert sorted(names) == ["a.jpg", "b.jpg", "c.jpg", "new.jpg"]   # exactly once each
    assert len(rows.job_ids()) == 4
    assert (tmp_path / "outbox/processed/a.jpg").read_bytes() == b"IMG-a"
    assert (tmp_path / "outbox/processed/c.jpg").read_bytes() == b"IMG-c"
    assert (tmp_path / "outbox/failed/b.jpg.error.txt").exists()
    assert _left(sp) == []
    status = read_status(tmp_path / "outbox" / "status.json")
    assert status["state"] == "stopped" and status["recovered"] == 1 and status["processed"] == 2


def test_the_protocol_alone_commit_finish_and_the_one_settle_rule(tmp_path, monkeypatch):
    """watcher.spool without a daemon: claim -> commit -> finish; then settle, THE rule:
    committed job ids are only finalized (per their recorded status), the others come back
    to be classified again under the same job ids, and a storage fault keeps committed
    files waiting with their manifest."""
    import errno as _errno

    sp = _spool(tmp_path)
    csv = ResultsCsv(tmp_path / "outbox" / "results.csv", ("cat", "dog"))
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (sp.inbox / name).write_bytes(b"IMG-" + name.encode())
    first = sp.claim("b1", [("j1", "a.jpg", 0.0), ("j2", "b.jpg", 0.0)])
    results = [Result("a.jpg", "j1", label="dog", confidence=0.9),
               Result("b.jpg", "j2", status=STATUS_ERROR, error="not an image")]
    sp.commit(csv, results, tmp_path / "outbox")
    done = sp.finish(first, results)
    assert [sp.shown_place(w) for w in done.where] == ["processed/a.jpg", "failed/b.jpg"]
    assert done.fault is None and done.waiting == [] and _left(sp) == []

    second = sp.claim("b2", [("j3", "c.jpg", 0.0), ("j4", "d.jpg", 0.0)])
    csv.append([Result("c.jpg", "j3", label="cat", confidence=0.7)])   # j3 committed, j4 not
    out = sp.settle([second], csv)
    assert (out.done, out.stuck, out.fault, out.waiting) == (1, 0, None, [])
    assert [[(i.job_id, i.input_path) for i in b.items] for b in out.redo] == [[("j4", "d.jpg")]]
    assert (tmp_path / "outbox/processed/c.jpg").read_bytes() == b"IMG-c.jpg"
    assert _left(sp) == ["batch-b2.json", "j4"]            # j4 waits to be classified again
    assert sorted(csv.job_ids()) == ["j1", "j2", "j3"]     # settle never writes a row

    csv.append([Result("d.jpg", "j4", label="dog", confidence=0.6)])
    full = OSError(_errno.ENOSPC, "No space left on device")

    def no_space(self, *a, **k):
        raise full
    with monkeypatch.context() as m:
        m.setattr(Spool, "finalize", no_space)
        out = sp.settle(out.redo, csv)
    assert out.fault is full and out.redo == [] and out.done == 0
    assert [[i.job_id for i in b.items] for b in out.waiting] == [["j4"]]
    assert _left(sp) == ["batch-b2.json", "j4"]            # the manifest stays with it
    out = sp.settle(out.waiting, csv)                      # the fault is gone
    assert out.done == 1 and _left(sp) == [] and sorted(csv.job_ids()) == ["j1", "j2", "j3",
                                                                            "j4"]


def test_orphan_in_processing_area_is_not_lost(tmp_path):
    sp = _spool(tmp_path)
    (sp.processing / "mystery").write_bytes(b"IMG-m")
    assert _run_once(tmp_path) == 0
    assert _left(sp) == []
    assert (tmp_path / "outbox/processed/recovered/mystery").exists()


def test_format_status_is_readable(tmp_path):
    s = Status(state="running", inbox="/in", outbox="/out", observer="native",
               model_version="v1", processed=3, ok=2, failed=1, queue_depth=5,
               last_batch_size=3, last_batch_seconds=0.5)
    s.write(tmp_path / "status.json")
    text = format_status(read_status(tmp_path / "status.json"))
    assert "processed:" in text and "3 (2 ok, 1 failed" in text and "queue depth:   5" in text


def test_sd_notify_never_hangs_on_a_listener_that_stopped_reading(tmp_path, monkeypatch):
    import watcher.sdnotify as sdn

    monkeypatch.setattr(sdn, "SEND_TIMEOUT", 0.05)
    path = str(tmp_path / "full.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        sent = [sd_notify("WATCHDOG=1", env={"NOTIFY_SOCKET": path}) for _ in range(40)]
    assert sent[0] and not all(sent)   # the queue filled up; later sends gave up quickly


# -- crash at every step, then restart: exactly one row per file --------------------------------
class Crash(BaseException):
    """A simulated SIGKILL/power cut: escapes every ``except Exception``."""


def _config(tmp_path, watcher_extra=""):
    return _settings(tmp_path, f"""
[paths]
inbox = "{tmp_path / 'inbox'}"
outbox = "{tmp_path / 'outbox'}"
[watcher]
settle_ms = 0
max_wait_ms = 0
{watcher_extra}
""")


def _daemon(tmp_path, batch_size: int | None = 4):
    """A `--once` daemon on tmp inbox/outbox with the fake classifier (batch_size None: the
    [inference] default)."""
    from watcher.daemon import Daemon

    settings = _config(tmp_path, "" if batch_size is None else f"batch_size = {batch_size}")
    return Daemon(settings, watcher_settings(settings), once=True, classifier=FakeClassifier())


def _drop_inputs(inbox: Path) -> set[str]:
    from engine.text import printable

    inbox.mkdir(exist_ok=True)
    (inbox / "sub").mkdir()
    names = {}
    for i in range(7):
        names[f"good{i}.jpg" if i % 2 else f"sub/good{i}.jpg"] = b"IMG-%d" % i
    names["bad.jpg"] = b"not an image"
    names["empty.jpg"] = b""
    for rel, data in names.items():
        (inbox / rel).write_bytes(data)
    os.symlink("/etc/hostname", inbox / "link.jpg")
    raw = os.path.join(os.fsencode(inbox), b"caf\xe9 \xff.jpg")   # not UTF-8
    with open(raw, "wb") as fh:
        fh.write(b"IMG-latin1")
    return {*names, "link.jpg", printable(os.fsdecode(b"caf\xe9 \xff.jpg"))}


def _counter(fn, nth, when=lambda *a, **k: True):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth:
                raise Crash(f"crash at call {nth} of {fn.__name__}")
        return fn(*args, **kwargs)
    return wrapper


def _partial_append(original):
    calls = {"n": 0}

    def append(self, results):
        calls["n"] += 1
        size = self.path.stat().st_size if self.path.exists() else 0
        count = original(self, results)
        if calls["n"] == 2:          # the second commit is cut in the middle of its bytes
            new = self.path.stat().st_size
            os.truncate(self.path, size + (new - size) // 2)
            raise Crash("power cut during the CSV write")
        return count
    return append


def _in_processing(path, *a, **k) -> bool:
    return ".pawcam-processing" in os.fsdecode(path)


CRASH_POINTS = ["manifest", "claim_rename", "before_commit", "partial_commit", "after_commit",
                "mid_finalize", "between_link_and_unlink", "before_manifest_drop"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_any_step_then_restart_gives_exactly_one_row_per_file(tmp_path, monkeypatch,
                                                                        point):
    import watcher.spool as spool_mod
    from engine.text import printable
    from watcher.daemon import Daemon

    expected = _drop_inputs(tmp_path / "inbox")
    if point == "manifest":
        monkeypatch.setattr(spool_mod, "write_atomic", _counter(
            spool_mod.write_atomic, 2, lambda p, *a, **k: p.name.startswith("batch-")))
    elif point == "claim_rename":
        monkeypatch.setattr(os, "rename", _counter(
            os.rename, 6, lambda s, d, *a, **k: _in_processing(d)))
    elif point == "before_commit":
        monkeypatch.setattr(ResultsCsv, "append", _counter(ResultsCsv.append, 2))
    elif point == "partial_commit":
        monkeypatch.setattr(ResultsCsv, "append", _partial_append(ResultsCsv.append))
    elif point == "after_commit":
        monkeypatch.setattr(Spool, "finalize", _counter(Spool.finalize, 5))
    elif point == "mid_finalize":
        monkeypatch.setattr(Spool, "finalize", _counter(Spool.finalize, 6))
    elif point == "between_link_and_unlink":
        monkeypatch.setattr(os, "unlink", _counter(os.unlink, 6, _in_processing))
    elif point == "before_manifest_drop":
        monkeypatch.setattr(Spool, "drop_manifest", _counter(Spool.drop_manifest, 2))
    monkeypatch.setattr(Daemon, "_shutdown", lambda self: None)   # a crash cleans nothing up

    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    first = _daemon(tmp_path)
    try:
        with pytest.raises(Crash):
            first.run()
    finally:
        os.close(first._lock_fd)
        first.pipe.close()
        monkeypatch.undo()
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    rows_before = len(ResultsCsv(tmp_path / "outbox/results.csv", ("cat", "dog")).job_ids())

    assert _run_once(tmp_path) == 0                      # the restart

    import csv as _csv
    with open(tmp_path / "outbox/results.csv", newline="", encoding="utf-8") as fh:
        rows = list(_csv.DictReader(fh))
    names = [r["input_path"] for r in rows]
    assert sorted(names) == sorted(expected), point       # exactly once each
    assert len({r["job_id"] for r in rows}) == len(rows)
    assert rows_before < len(rows) or point == "before_manifest_drop"
    sp = _spool(tmp_path)
    assert _left(sp) == []
    for folder, dirs, files in os.walk(tmp_path / "inbox"):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        assert files == [], (point, folder, files)
    moved = []
    for root in ("processed", "failed"):
        for folder, _, files in os.walk(tmp_path / "outbox" / root):
            moved += [os.path.relpath(os.path.join(folder, f), tmp_path / "outbox" / root)
                      for f in files if not f.endswith(".error.txt")]
    assert sorted(printable(m) for m in moved) == sorted(expected), point   # no copies either
    ok = {r["input_path"] for r in rows if r["status"] == "ok"}
    assert len(ok) == 8 and "link.jpg" not in ok


def test_fit_name_and_flattened_fallback(tmp_path):
    from engine.durable import fit_name

    long = "x" * 300 + ".jpeg"
    assert len(os.fsencode(fit_name(long, 240))) <= 240 and fit_name(long, 240).endswith(".jpeg")
    assert fit_name("short.jpg", 240) == "short.jpg"
    sp = _spool(tmp_path)
    (sp.processed).mkdir(parents=True)
    (sp.processed / "sub").write_bytes(b"a file where a folder would go")
    (sp.inbox / "sub").mkdir()
    (sp.inbox / "sub" / ("y" * 250 + ".jpg")).write_bytes(b"IMG")
    batch = sp.claim("b1", [("j1", "sub/" + "y" * 250 + ".jpg", 0.0)])
    where = Path(sp.finalize(batch.items[0], ok=True))
    assert where.parent == sp.processed and where.name.startswith("sub__yyy")


def test_one_daemon_per_inbox(tmp_path):
    sp = _spool(tmp_path)
    fd = sp.lock()
    try:
        with pytest.raises(BlockingIOError, match=str(os.getpid())):
            _spool(tmp_path).lock()
    finally:
        os.close(fd)
    os.close(_spool(tmp_path).lock())


# -- review fixes -------------------------------------------------------------------------------
def _run_daemon(daemon) -> int:
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = [signal.getsignal(s) for s in sigs]
    try:
        return daemon.run()
    finally:
        for s, handler in zip(sigs, old):
            signal.signal(s, handler)


def _rows(tmp_path) -> list[dict]:
    import csv as _csv

    with open(tmp_path / "outbox/results.csv", newline="", encoding="utf-8") as fh:
        return list(_csv.DictReader(fh))


def test_processing_area_is_never_input_even_if_ignore_lacks_dot_names(tmp_path):
    """B1: with ``ignore = ["*.part"]`` the daemon's own lock file, manifests and claimed files
    are still not input (neither by scan nor by a notice of a move into the processing area)."""
    from watcher.daemon import Daemon
    from watcher.observer import COMPLETE, SEEN, Notice

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(3):
        (inbox / f"a{i}.jpg").write_bytes(b"IMG%d" % i)
    settings = _config(tmp_path, 'ignore = ["*.part"]')
    wcfg = watcher_settings(settings)
    assert _run_daemon(Daemon(settings, wcfg, once=True, classifier=FakeClassifier())) == 0
    assert sorted(r["input_path"] for r in _rows(tmp_path)) == ["a0.jpg", "a1.jpg", "a2.jpg"]
    assert (inbox / ".pawcam-processing" / ".lock").exists()         # the lock stays put
    assert not (tmp_path / "outbox/failed/.pawcam-processing").exists()

    claimed = inbox / ".pawcam-processing" / "w1-000001"
    claimed.write_bytes(b"IMG-claimed")
    d = Daemon(settings, wcfg, once=True, classifier=FakeClassifier())
    for kind in (COMPLETE, SEEN):                                     # inotify: moved in
        d.intake.notices.put(Notice(kind, str(claimed)))
        d.intake.notices.put(Notice(kind, str(inbox / ".pawcam-processing" / ".lock")))
    d.intake.drain(0)
    d.intake.scan("")
    assert d.intake.tracker.candidates == {}


def _committed_then_crashed(tmp_path) -> Spool:
    """A crash after the commit of a.jpg (job j1), before it was moved out."""
    sp = _spool(tmp_path)
    (sp.inbox / "a.jpg").write_bytes(b"IMG-a")
    sp.claim("b1", [("j1", "a.jpg", 0.0)])
    ResultsCsv(tmp_path / "outbox/results.csv", ("cat", "dog")).append(
        [Result("a.jpg", "j1", label="dog", confidence=0.8)])
    return sp


def test_recovery_keeps_the_manifest_when_moving_a_committed_file_fails(tmp_path, monkeypatch):
    """B2: the outbox is full during recovery: the committed file stays in the processing area
    with its manifest, and the next start only moves it on (no second row, no new job id)."""
    import errno as _errno

    from watcher.daemon import Daemon

    sp = _committed_then_crashed(tmp_path)
    settings = _config(tmp_path)

    def full(*a, **k):
        raise OSError(_errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(Spool, "finalize", full)
        # --once does not wait a storage fault out: it stops with exit code 4 (EXIT_STORAGE)
        assert _run_daemon(Daemon(settings, watcher_settings(settings), once=True,
                                  classifier=FakeClassifier())) == 4
    assert _left(sp) == ["batch-b1.json", "j1"]
    assert _run_daemon(Daemon(settings, watcher_settings(settings), once=True,
                              classifier=FakeClassifier())) == 0
    rows = _rows(tmp_path)
    assert [(r["input_path"], r["job_id"]) for r in rows] == [("a.jpg", "j1")]
    assert (tmp_path / "outbox/processed/a.jpg").read_bytes() == b"IMG-a"
    assert _left(sp) == []


def test_orphan_already_in_the_results_is_moved_on_not_classified_again(tmp_path):
    """B2: a claimed file without a manifest whose name (its job id) is in the CSV."""
    sp = _committed_then_crashed(tmp_path)
    os.unlink(sp.processing / "batch-b1.json")
    assert _run_once(tmp_path) == 0
    assert [(r["input_path"], r["job_id"]) for r in _rows(tmp_path)] == [("a.jpg", "j1")]
    assert (tmp_path / "outbox/processed/recovered/j1").read_bytes() == b"IMG-a"
    assert _left(sp) == []


def test_claim_never_follows_a_folder_swapped_for_a_symlink(tmp_path):
    """B4: sub/x.jpg was seen, then inbox/sub became a symlink to a folder outside the inbox:
    the claim refuses (logged, left alone) instead of taking the outside file."""
    sp = _spool(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "x.jpg").write_bytes(b"not yours")
    os.symlink(victim, sp.inbox / "sub")
    (sp.inbox / "real" / "deep").mkdir(parents=True)
    (sp.inbox / "real" / "deep" / "y.jpg").write_bytes(b"IMG-y")
    batch = sp.claim("b1", [("j1", "sub/x.jpg", 0.0), ("j2", "real/deep/y.jpg", 0.0)])
    assert [i.input_path for i in batch.items] == ["real/deep/y.jpg"]
    assert os.listdir(victim) == ["x.jpg"] and _left(sp) == ["batch-b1.json", "j2"]
    assert sp.claim("b2", [("j3", "sub/x.jpg", 0.0)]).items == []
    assert os.listdir(victim) == ["x.jpg"] and _left(sp) == ["batch-b1.json", "j2"]


def test_failure_note_of_a_long_name_is_written_and_temp_files_never_stay(tmp_path):
    """B5: a legal 250-byte name still gets its <name>.error.txt note; a failed atomic write
    leaves no temp file behind."""
    from engine.durable import write_atomic

    sp = _spool(tmp_path)
    name = "x" * 246 + ".jpg"
    (sp.inbox / name).write_bytes(b"junk")
    batch = sp.claim("b1", [("j1", name, 0.0)])
    where = sp.finalize(batch.items[0], ok=False, error="not an image")
    note = Path(where + ".error.txt")
    assert len(os.fsencode(note.name)) <= 255 and "not an image" in note.read_text()
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "dir", b"data")             # cannot replace a folder
    assert sorted(os.listdir(tmp_path)) == ["dir", "inbox", "outbox"]
    assert [n for n in os.listdir(sp.failed) if is_temp(n)] == []


def test_stop_timer_is_cancelled_once_shutdown_is_done(tmp_path, monkeypatch):
    """B8: after a stop request the give-up timer (os._exit) must not fire once run() has
    returned: the exit code is run()'s and an in-process caller lives on."""
    import time

    from watcher.daemon import Daemon

    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "a.jpg").write_bytes(b"IMG-a")
    settings = _config(tmp_path, "stop_timeout_s = 0.5")
    fired = []
    monkeypatch.setattr(Daemon, "_give_up", lambda self: fired.append(True))
    d = Daemon(settings, watcher_settings(settings), once=True, classifier=FakeClassifier())
    infer = d.clf.infer

    def infer_then_stop(images):
        d.stop_requested = True            # SIGTERM while the batch is on the model
        return infer(images)
    d.clf.infer = infer_then_stop
    d._warm_up = lambda: None
    assert _run_daemon(d) == 0
    assert [r["input_path"] for r in _rows(tmp_path)] == ["a.jpg"]
    time.sleep(0.8)
    assert fired == []


def test_special_file_across_file_systems_is_reported_removed(tmp_path):
    """B7: a FIFO cannot be copied to an outbox on another file system; it is removed and
    finalize says so (not 'left in the processing area', not an error)."""
    import shutil
    import tempfile

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same file system as tmp_path")
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        sp = Spool(inbox, inbox / ".pawcam-processing", other / "processed", other / "failed")
        os.mkfifo(inbox / "pipe.jpg")
        batch = sp.claim("b1", [("j1", "pipe.jpg", 0.0)])
        deferred: list = []
        where = sp.finalize(batch.items[0], ok=False, error="not a regular file",
                            deferred=deferred)
        assert where.startswith("removed") and deferred == []
        assert not os.path.lexists(batch.items[0].path)
        assert [n for n in os.listdir(other / "failed") if not n.startswith(".")] == []
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_tracker_take_does_not_walk_the_whole_ready_queue():
    """B13: one batch out of 100k ready files looks at ~batch_size entries, not all of them
    (draining a big drop was quadratic)."""
    class Counting(dict):
        seen = 0

        def __iter__(self):
            for key in dict.__iter__(self):
                Counting.seen += 1
                yield key

    class NoWalk(dict):
        def values(self):
            raise AssertionError("walked every candidate")

    t = Tracker(settle_s=0.0, batch_size=32, max_wait_s=0.5)
    t.ready = Counting()
    t.candidates = NoWalk()
    for i in range(100_000):
        t.observe(f"f{i}.jpg", _st(), now=0.0, wall=100.0, complete=True)
    Counting.seen = 0
    batch = t.take()
    assert [c.rel for c in batch] == [f"f{i}.jpg" for i in range(32)]
    assert Counting.seen <= 33 and len(t.ready) == 100_000 - 32
    assert t.due_checks(1.0) == [] and t.next_check() is None     # nothing is settling
    t.observe("slow.jpg", _st(), now=0.0, wall=100.0)
    t.settle_s = 1000.0
    t.observe("new.jpg", _st(mtime=100.0), now=0.0, wall=100.0)
    assert t.due_checks(1.0) == [] and t.next_check() == 1000.0


def test_unclaim_never_goes_through_a_folder_swapped_for_a_symlink(tmp_path):
    """B4 (the way back): on a clean stop a claimed sub/x.jpg is not put into a folder outside
    the inbox that inbox/sub now points to; it stays for recovery with its manifest."""
    import shutil

    sp = _spool(tmp_path)
    (sp.inbox / "sub").mkdir()
    (sp.inbox / "sub" / "x.jpg").write_bytes(b"IMG-x")
    (sp.inbox / "y.jpg").write_bytes(b"IMG-y")
    batch = sp.claim("b1", [("j1", "y.jpg", 0.0), ("j2", "sub/x.jpg", 0.0)])
    shutil.rmtree(sp.inbox / "sub")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, sp.inbox / "sub")
    sp.unclaim(batch)
    assert os.listdir(outside) == []
    assert (sp.inbox / "y.jpg").read_bytes() == b"IMG-y"
    assert _left(sp) == ["batch-b1.json", "j2"]


@pytest.mark.parametrize("native", [True, False])
def test_rename_noreplace_relative_to_a_folder_fd(tmp_path, monkeypatch, native):
    import engine.durable as durable_mod

    if not native:                                      # old kernel / FUSE: the fallback
        monkeypatch.setattr(durable_mod, "_renameat2", lambda: None)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "taken").write_text("keep")
    (tmp_path / "a").write_text("a")
    fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            rename_noreplace(tmp_path / "a", "taken", dst_dir_fd=fd)
        rename_noreplace(tmp_path / "a", "free", dst_dir_fd=fd)
    finally:
        os.close(fd)
    assert (tmp_path / "d" / "taken").read_text() == "keep"
    assert (tmp_path / "d" / "free").read_text() == "a" and not (tmp_path / "a").exists()
