"""Keep TensorFlow's native start-up chatter off stderr (it bypasses Python logging).

    with native_stderr_captured() as captured:
        import tensorflow as tf
        tf.config.list_physical_devices("GPU")
    log.debug("TensorFlow said: %s", captured.text)

The C++ runtime writes straight to file descriptor 2 ("Could not find cuda drivers", oneDNN
notes) before any Python setting can stop it. For the length of the block, fd 2 points at a
temporary file; its text is kept for a debug log line. Python exceptions still propagate.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator


class Captured:
    text: str = ""


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[Captured]:
    captured = Captured()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded use): do nothing
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode("utf-8", "replace").strip()
