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
