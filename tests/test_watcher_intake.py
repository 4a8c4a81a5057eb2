"""Event intake on real folders, with no model and no daemon: watchdog notices and scans ->
settled, ready files (watcher.intake)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from watcher.config import WatcherSettings
from watcher.intake import Intake
from watcher.observer import DIR_GONE, Notice


def _intake(inbox: Path, watch: bool = True, **knobs) -> Intake:
    knobs.setdefault("rescan_seconds", 0)
    return Intake(inbox, WatcherSettings(**knobs), batch_size=8, watch=watch)


def _wait(intake: Intake, done, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, (sorted(intake.tracker.candidates),
                                             sorted(intake.tracker.ready))
        intake.drain(0.05)
        intake.step(time.monotonic())


def _wait_ready(intake: Intake, want: set[str]) -> None:
    _wait(intake, lambda: set(intake.tracker.ready) == want)


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def test_notices_become_ready_files_once_complete_and_never_the_ignored_ones(tmp_path):
    """inotify: a file closed after writing or renamed in is ready at once (settle_ms is long);
    one still open is not; a folder moved in is scanned (its old files are settled); ignored
    names and the processing area never become candidates."""
    inbox = tmp_path / "inbox"
    (inbox / ".pawcam-processing").mkdir(parents=True)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jpg").write_bytes(b"IMG-b")
    _age(tmp_path / "sub" / "b.jpg", 3600)
    intake = _intake(inbox, settle_ms=600_000)
    intake.start()
    try:
        (inbox / "a.jpg").write_bytes(b"IMG-a")                 # written and closed
        os.rename(tmp_path / "sub", inbox / "sub")               # a folder moved in
        (tmp_path / "c.tmp").write_bytes(b"IMG-c")
        os.rename(tmp_path / "c.tmp", inbox / "c.jpg")           # renamed in from outside
        (inbox / "d.jpg.part").write_bytes(b"partial")           # ignored names
        (inbox / ".hidden.jpg").write_bytes(b"hidden")
        (inbox / ".pawcam-processing" / "w1-000001").write_bytes(b"claimed")
        writing = open(inbox / "e.jpg", "wb")                    # still being written
        writing.write(b"IMG-e (first half)")
        writing.flush()
        _wait(intake, lambda: "e.jpg" in intake.tracker.candidates)
        _wait_ready(intake, {"a.jpg", "sub/b.jpg", "c.jpg"})
        assert set(intake.tracker.candidates) == {"a.jpg", "sub/b.jpg", "c.jpg", "e.jpg"}
        writing.write(b" second half")
        writing.close()
        _wait_ready(intake, {"a.jpg", "sub/b.jpg", "c.jpg", "e.jpg"})
        taken = intake.take(time.monotonic())
        assert sorted(rel for rel, _ in taken) == ["a.jpg", "c.jpg", "e.jpg", "sub/b.jpg"]
        assert all(ready_at > 0 for _, ready_at in taken)
        assert intake.depth == 0 and intake.take(time.monotonic()) == []
    finally:
        intake.stop()


def test_scan_only_settles_by_size_and_mtime(tmp_path):
    """No observer (--once): the start-up scan takes a file whose mtime is older than the
    settle time at once; a fresh one becomes ready only after settle_ms of no change."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "old.jpg").write_bytes(b"IMG-old")
    _age(inbox / "old.jpg", 60)
    (inbox / "new.jpg").write_bytes(b"IMG-new")
    intake = _intake(inbox, watch=False, settle_ms=400)
    intake.start()
    assert intake.observer is None
    assert list(intake.tracker.ready) == ["old.jpg"]
    assert intake.next_wake() is not None               # the settle check of new.jpg
    intake.step(time.monotonic())
    assert list(intake.tracker.ready) == ["old.jpg"]
    time.sleep(0.5)
    intake.step(time.monotonic())
    assert list(intake.tracker.ready) == ["old.jpg", "new.jpg"]


def test_a_file_written_to_after_it_looked_complete_settles_again(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jpg").write_bytes(b"IMG-a")
    _age(inbox / "a.jpg", 60)
    (inbox / "b.jpg").write_bytes(b"IMG-b")
    _age(inbox / "b.jpg", 60)
    intake = _intake(inbox, watch=False, settle_ms=60_000)
    intake.start()
    assert list(intake.tracker.ready) == ["a.jpg", "b.jpg"]
    with open(inbox / "a.jpg", "ab") as fh:             # a writer re-opened it
        fh.write(b" more")
    assert [rel for rel, _ in intake.take(time.monotonic())] == ["b.jpg"]
    assert "a.jpg" in intake.tracker.candidates and "a.jpg" not in intake.tracker.ready


def test_held_files_wait_for_the_next_rescan_and_gone_ones_are_forgotten(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (inbox / name).write_bytes(b"IMG")
        _age(inbox / name, 60)
    intake = _intake(inbox, watch=False)
    intake.start()
    assert [rel for rel, _ in intake.take(time.monotonic())] == ["a.jpg", "b.jpg"]
    os.unlink(inbox / "b.jpg")
    intake.hold(["a.jpg", "b.jpg"])                     # could not be claimed
    assert intake.blocked == {"a.jpg"}
    intake.scan("")
    assert intake.depth == 0                            # held: not offered again ...
    intake.rescan_soon()
    intake.step(time.monotonic())
    assert list(intake.tracker.ready) == ["a.jpg"]      # ... until the next rescan


def test_symlinks_are_taken_as_they_are_and_linked_folders_are_not_walked(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(b"not yours")
    os.symlink(outside, inbox / "linked")
    os.symlink(outside / "x.jpg", inbox / "link.jpg")
    intake = _intake(inbox, watch=False, settle_ms=60_000)
    intake.start()
    assert set(intake.tracker.candidates) == {"link.jpg", "linked"}
    assert set(intake.tracker.ready) == {"link.jpg", "linked"}   # complete by nature


def test_a_removed_inbox_is_reported_and_a_new_one_watched_again(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    gone = []
    intake = Intake(inbox, WatcherSettings(settle_ms=600_000, rescan_seconds=0), 8,
                    on_inbox_gone=lambda: gone.append(True))
    intake.start()
    try:
        (inbox / "a.jpg").write_bytes(b"IMG-a")
        _wait_ready(intake, {"a.jpg"})
        os.unlink(inbox / "a.jpg")
        os.rmdir(inbox)
        intake.notices.put(Notice(DIR_GONE, str(inbox)))
        intake.drain(0)
        assert gone == [True]
        intake.detach()
        assert intake.depth == 0 and intake.observer is None
        assert intake.next_wake() is None                  # no rescan of a missing inbox
        inbox.mkdir()
        intake.reattach()
        (inbox / "b.jpg").write_bytes(b"IMG-b")
        _wait_ready(intake, {"b.jpg"})
    finally:
        intake.stop()


@pytest.mark.parametrize("knob", ["settle_ms", "batch"])
def test_configure_applies_reloaded_settings(tmp_path, knob):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jpg").write_bytes(b"IMG")
    intake = _intake(inbox, watch=False, settle_ms=600_000)
    intake.start()
    assert not intake.tracker.ready
    if knob == "settle_ms":
        intake.configure(WatcherSettings(settle_ms=0, rescan_seconds=0), 8)
        intake.step(time.monotonic())
        assert list(intake.tracker.ready) == ["a.jpg"]
    else:
        intake.configure(WatcherSettings(settle_ms=600_000, rescan_seconds=0), 3)
        assert intake.tracker.batch_size == 3 and intake.batch_size == 3
