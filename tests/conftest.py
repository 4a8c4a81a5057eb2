from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.helpers import SHARED, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A saved two-class (cat, dog) 32x32 model with metadata, shared by the session."""
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "dataset").is_dir():
        pytest.skip("../shared/dataset is absent (fresh clone); real-data test skipped")
    return SHARED


@pytest.fixture
def small_fs(tmp_path):
    """``make(name, size_kb)`` -> a fresh folder with a small tmpfs mounted on it (a real file
    system that fills up, can be remounted read-only); unmounted after the test. Skips with
    the reason where mounting is not allowed (needs root / CAP_SYS_ADMIN; CI runs as root)."""
    import subprocess

    mounted: list[Path] = []

    def make(name: str, size_kb: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        try:
            out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755",
                                  "tmpfs", str(path)], capture_output=True, text=True)
            error = "" if out.returncode == 0 else (out.stderr or "").strip()
        except OSError as exc:    # no mount(8) at all
            error = str(exc)
        if error:
            pytest.skip(f"cannot mount a small tmpfs here ({error}): a real full file system "
                        "needs root / CAP_SYS_ADMIN and mount(8)")
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
