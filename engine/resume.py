"""Resuming a bulk run: which inputs already have an ``ok`` row in the results CSV.

    done = DoneIndex.load(out_dir / "predictions.csv", class_names)
    todo = done.pending(iter_inputs(paths), on_skip=lambda path: ...)

An input is done when the CSV holds an ``ok`` row with the same ``input_path`` and the same
content ``sha256``: a file changed since (same name, other bytes) is classified again, and an
input whose row was an ``error`` is tried again (a resume also retries what failed, e.g. a
file still being copied or a full disk while pictures were written).

Memory stays bounded and small: the CSV is read as a stream and only two 16-byte digests per
``ok`` row are kept (about 150 bytes a row: a million rows take ~150 MB). A file is hashed only
when its path has a row, so inputs never seen before cost nothing.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from engine.decode import input_open_flags
from engine.results import STATUS_OK, ResultsCsv, unneutralize
from engine.text import printable

log = logging.getLogger(__name__)


def _key(*parts: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.digest()


def file_sha256(path: Path, follow_symlinks: bool) -> str | None:
    """The content hash of a regular file, or None when it cannot be read as one (it is then
    classified again and gets its error row). Symlinks are refused unless followed, as in
    :func:`engine.decode.read_file_bytes`; a FIFO never blocks."""
    try:
        fd = os.open(path, input_open_flags(follow_symlinks))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ELOOP):
            log.debug("resume: cannot open %s: %s", printable(str(path)), exc)
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)


class DoneIndex:
    """The ``(input_path, sha256)`` pairs of the ``ok`` rows of one results CSV."""

    def __init__(self) -> None:
        self._paths: set[bytes] = set()
        self._pairs: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, input_path: str, sha256: str) -> None:
        self._paths.add(_key(input_path))
        self._pairs.add(_key(input_path, sha256))

    @classmethod
    def load(cls, csv_path: Path, class_names: Sequence[str]) -> "DoneIndex":
        """Stream ``csv_path`` (repaired and header-checked first, as for appending)."""
        index = cls()
        writer = ResultsCsv(csv_path, class_names)  # cuts a crash's partial record
        for path, status, sha in writer.columns("input_path", "status", "sha256"):
            if status == STATUS_OK and sha:
                index.add(unneutralize(path), sha)
        return index

    def is_done(self, path: Path, follow_symlinks: bool, input_path: str | None = None) -> bool:
        """True when ``path`` (shown as ``input_path``) has an ok row for its current bytes."""
        shown = printable(input_path if input_path is not None else str(path))
        if _key(shown) not in self._paths:
            return False
        digest = file_sha256(path, follow_symlinks)
        return digest is not None and _key(shown, digest) in self._pairs

    def pending(self, inputs: Iterable[tuple[Path, bool]],
                on_skip: Callable[[Path], None] | None = None) -> Iterator[tuple[Path, bool]]:
        """The inputs of ``inputs`` (``(path, follow_symlinks)``, lazily) that are not done."""
        for path, follow in inputs:
            if self._pairs and self.is_done(path, follow):
                if on_skip:
                    on_skip(path)
                continue
            yield path, follow
