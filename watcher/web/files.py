"""Files the web app hands out or takes in, with no path from the request ever used.

    fd = open_under(outbox, "gradcam", "cat.w1-000001.overlay.jpg")   # O_NOFOLLOW all the way
    find_photo(outbox / "processed", "cats/tom.jpg", sha256)           # the processed photo
    store_upload(inbox, fileobj, "tom.jpg")                           # hidden temp, fsync, rename

Pictures are served only by job-id lookup: the CSV row names the file, and it is opened relative
to the outbox folder component by component without following symlinks, so neither a name in
the CSV nor a symlink planted in the outbox can reach a file outside ``gradcam/`` or
``processed/``. Uploads are written under a hidden temporary name (never taken by the daemon,
whose ``ignore`` holds ``.*``), fsync'ed, then renamed to a free name: the daemon sees one
complete file, once.
"""
from __future__ import annotations

import hashlib
import os
import stat
import unicodedata
from pathlib import Path
from typing import BinaryIO

from engine.durable import fit_name, numbered_name, write_new
from watcher.policy import is_ignored

CONTENT_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jpe": "image/jpeg", ".png": "image/png",
    ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff",
    ".tiff": "image/tiff", ".avif": "image/avif", ".heic": "image/heic",
}
UPLOAD_NAME_BYTES = 200
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class NotServed(Exception):
    """The file is not there, or is not one this app may serve."""


def content_type(name: str) -> str:
    return CONTENT_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream")


def _parts(rel: str) -> list[str]:
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise NotServed(f"not a plain relative path: {rel!r}")
    return parts


def open_under(root: Path, top: str, rel: str) -> int:
    """An fd for the regular file ``root/top/rel``, reached without following any symlink
    below ``root`` (``root`` itself, the configured outbox, may be one). Raises NotServed."""
    parts = _parts(rel)
    fds: list[int] = []
    try:
        fds.append(os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)))
        for name in (top, *parts[:-1]):
            fds.append(os.open(name, _O_DIR, dir_fd=fds[-1]))
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0), dir_fd=fds[-1])
    except OSError as exc:
        raise NotServed(f"{top}/{rel}: {exc.strerror or exc}") from None
    finally:
        for f in fds:
            os.close(f)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotServed(f"{top}/{rel}: not a regular file")
    return fd


def picture_fd(root: Path, path_in_csv: str, top: str = "gradcam") -> int:
    """fd of a Grad-CAM picture named by a CSV row (``gradcam/<name>``); only under ``top``."""
    first, _, rest = path_in_csv.partition("/")
    if first != top:
        raise NotServed(f"{path_in_csv!r} is not under {top}/")
    return open_under(root, top, rest)


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    with os.fdopen(os.dup(fd), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    os.lseek(fd, 0, os.SEEK_SET)
    return h.hexdigest()


def find_photo(root: Path, processed_dir: str, input_path: str, sha256: str,
               tries: int = 20) -> int:
    """fd of the processed photo of a row: ``processed/<input_path>`` or one of its numbered
    names (`` (1)``...), whichever has the row's sha256 (so the photo shown is the one the row
    is about, never another upload of the same name). Raises NotServed."""
    folder, _, name = input_path.rpartition("/")
    for n in range(tries):
        rel = f"{folder}/{numbered_name(name, n)}" if folder else numbered_name(name, n)
        try:
            fd = open_under(root, processed_dir, rel)
        except NotServed:
            if n == 0:
                continue
            break
        if not sha256 or _sha256_fd(fd) == sha256:
            return fd
        os.close(fd)
    raise NotServed(f"no processed photo for {input_path!r}")


def upload_name(raw: str) -> str:
    """A safe, visible file name from a browser-given one: last path component only, no
    control or bidi characters, no leading dots, at most 200 bytes. ``""`` when nothing is left.

    ``upload_name("../../etc/passwd")`` -> ``"passwd"``; ``upload_name(".x.jpg")`` -> ``"x.jpg"``
    """
    name = unicodedata.normalize("NFC", raw.replace("\\", "/").rsplit("/", 1)[-1])
    name = "".join(ch if ch.isprintable() or ch == " " else "" for ch in name)
    name = name.strip().lstrip(".").strip()
    return fit_name(name, UPLOAD_NAME_BYTES) if name not in ("", ".", "..") else ""


def refuse_reason(name: str, ignore: tuple[str, ...]) -> str:
    """Why an upload name cannot go in the inbox ("" when it can)."""
    if not name:
        return "the file has no usable name"
    if is_ignored(name, ignore):
        return (f"the name {name!r} matches the daemon's [watcher] ignore patterns and would "
                "never be classified; rename it")
    return ""


def store_upload(inbox: Path, src: BinaryIO, name: str, max_bytes: int) -> tuple[str, int]:
    """Copy ``src`` into the inbox as ``name`` (or ``name (1)``... if taken), atomically
    (:func:`engine.durable.write_new`: hidden temp, fsync, rename to a free name).
    Returns ``(stored name, size)``. Raises ValueError when over ``max_bytes`` (nothing left
    behind), OSError on a disk error (nothing left behind)."""
    size = 0

    def blocks():
        nonlocal size
        for block in iter(lambda: src.read(1 << 20), b""):
            size += len(block)
            if size > max_bytes:
                raise ValueError(f"larger than the limit of {max_bytes:,} bytes "
                                 "([serve] max_upload_bytes)")
            yield block

    return write_new(inbox, blocks(), name), size
