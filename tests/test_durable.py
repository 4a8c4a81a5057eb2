"""engine.durable on real files: atomic writes, no-clobber renames and moves, temp names."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from engine.durable import (
    NAME_MAX,
    atomic_path,
    complete_moves,
    is_temp,
    move_no_clobber,
    rename_noreplace,
    temp_name,
    write_atomic,
    write_new,
)
from watcher.config import DEFAULT_IGNORE
from watcher.policy import is_ignored


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("durable", [True, False])
def test_write_atomic_replaces_and_leaves_no_temp(tmp_path, durable):
    target = tmp_path / "status.json"
    target.write_bytes(b"old")
    write_atomic(target, b"new" * 1000, durable=durable)
    assert target.read_bytes() == b"new" * 1000 and _names(tmp_path) == ["status.json"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp(tmp_path):
    """A real short write (file size limit, EFBIG after 64 KiB) in a child process: the target
    keeps its old content and no half-written temp file is visible."""
    target = tmp_path / "model.json"
    target.write_bytes(b"old")
    code = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from engine.durable import write_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    write_atomic(Path(sys.argv[1]), b'x' * 1_000_000)\n"
        "except OSError as exc:\n"
        "    print('failed', exc.errno)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.startswith("failed"), out.stdout + out.stderr
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["model.json"]


def test_atomic_path_removes_the_temp_on_an_exception(tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes(b"old")
    seen = []
    with pytest.raises(RuntimeError):
        with atomic_path(target, keep_suffix=True) as tmp:
            seen.append(tmp.name)
            tmp.write_bytes(b"half a model")
            assert _names(tmp_path) == sorted(["model.keras", tmp.name])
            raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["model.keras"]
    assert seen[0].endswith(".tmp.keras") and is_temp(seen[0])
    with atomic_path(target, keep_suffix=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and _names(tmp_path) == ["model.keras"]


def test_write_new_never_clobbers_and_cleans_up_after_a_failing_source(tmp_path):
    (tmp_path / "tom.jpg").write_bytes(b"first")
    assert write_new(tmp_path, [b"sec", b"ond"], "tom.jpg") == "tom (1).jpg"
    assert (tmp_path / "tom.jpg").read_bytes() == b"first"
    assert (tmp_path / "tom (1).jpg").read_bytes() == b"second"

    def too_big():
        yield b"x" * 1000
        raise ValueError("over the limit")

    with pytest.raises(ValueError):
        write_new(tmp_path, too_big(), "big.jpg")
    assert _names(tmp_path) == ["tom (1).jpg", "tom.jpg"]


def test_rename_noreplace_keeps_the_target(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "b" and (tmp_path / "a").read_text() == "a"


def test_move_no_clobber_picks_a_free_name_and_a_deferred_move_completes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.jpg").write_bytes(b"there before")
    (out / "x (1).jpg.error.txt").write_text("a note of another file")
    src = tmp_path / "x.jpg"
    src.write_bytes(b"moved")
    deferred: list[tuple[Path, Path]] = []
    dst = move_no_clobber(src, out, "x.jpg", (".error.txt",), deferred)
    assert dst == out / "x (2).jpg" and src.exists()          # linked, not yet unlinked
    complete_moves(deferred)
    assert not src.exists() and dst.read_bytes() == b"moved" and deferred == []
    assert (out / "x.jpg").read_bytes() == b"there before"


def _other_device_dir(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm and the test folder are on one file system")
    return Path(tempfile.mkdtemp(prefix="pawcam-durable-", dir=shm))


def test_move_across_file_systems_copies_and_never_clobbers(tmp_path):
    src_dir = _other_device_dir(tmp_path)
    try:
        (src_dir / "tom.jpg").write_bytes(b"photo" * 1000)
        os.symlink("/etc/hostname", src_dir / "link")
        (tmp_path / "tom.jpg").write_bytes(b"keep me")
        dst = move_no_clobber(src_dir / "tom.jpg", tmp_path, "tom.jpg")
        assert dst == tmp_path / "tom (1).jpg" and dst.read_bytes() == b"photo" * 1000
        assert (tmp_path / "tom.jpg").read_bytes() == b"keep me"
        link = move_no_clobber(src_dir / "link", tmp_path, "link")
        assert os.path.islink(link) and os.readlink(link) == "/etc/hostname"
        assert os.listdir(src_dir) == []
        assert not [n for n in os.listdir(tmp_path) if is_temp(n)]
    finally:
        for name in os.listdir(src_dir):
            os.unlink(src_dir / name)
        os.rmdir(src_dir)


@pytest.mark.parametrize("name", ["tom.jpg", "x" * 250 + ".jpg", "é" * 120 + ".png", "README"])
def test_temp_names_are_hidden_ignored_by_the_watcher_and_fit(tmp_path, name):
    tmp = temp_name(name)
    assert tmp.startswith(".") and tmp.endswith(".tmp") and is_temp(tmp)
    assert len(os.fsencode(tmp)) <= NAME_MAX
    assert is_ignored(tmp, DEFAULT_IGNORE) and is_ignored(f"sub/{tmp}", DEFAULT_IGNORE)
    assert temp_name(name) != tmp                               # two writers never share one
    if len(os.fsencode(name)) <= NAME_MAX:
        write_atomic(tmp_path / name, b"data")                  # the temp of a long name fits
        assert _names(tmp_path) == [name]


@pytest.mark.parametrize("name", ["tom.jpg", ".lock", "batch-b1.json", "w1-000001",
                                  ".hidden.jpg", "x.tmp", ".x.tmp"])
def test_ordinary_names_are_not_temp_names(name):
    assert not is_temp(name)


def test_temp_names_of_older_versions_are_recognised():
    assert is_temp(".tmp-123-batch-b2.json") and is_temp(".tmp-4242-9f0c1ab2")
