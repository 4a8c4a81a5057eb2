"""Small text and id helpers every part of pawcam shares (pure functions, no I/O).

    new_run_id("w", 3)          # 'w20261124T140307Z-9f3a0c': sortable, unique run/job id prefix
    utc_now()                   # '2026-11-24T14:03:07.123Z'
    printable(name)             # any file name as valid UTF-8 (odd bytes as \\xNN escapes)
    shown(name)                 # the same, quoted and escaped: one log-safe token
    safe_stem("../Crème.jpg")   # 'Creme': a file-system-safe ASCII stem
    safe_token("r1-000007")     # 'r1-000007': the same for ids (dots kept)
"""
from __future__ import annotations

import json
import re
import secrets
import unicodedata
from datetime import datetime, timezone

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_STEM = 80


def new_run_id(prefix: str = "", random_bytes: int = 2) -> str:
    """``20261124T140307Z-9f3a``: sortable, unique across runs writing to one folder.

    The daemon uses ``new_run_id("w", 3)`` -> ``w20261124T140307Z-9f3a0c``.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}{stamp}-{secrets.token_hex(random_bytes)}"


def utc_now() -> str:
    """UTC ISO 8601 with milliseconds and a Z: ``2026-11-24T14:03:07.123Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: undecodable bytes become ``\\xNN`` escapes."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (Windows names)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(path: str) -> str:
    """A path as one log-safe token: quoted, newlines and odd bytes escaped."""
    return json.dumps(printable(path), ensure_ascii=False)


def safe_stem(name: str, max_len: int = MAX_STEM) -> str:
    """A file-system-safe ASCII stem from any (hostile) file name.

    ``"../../etc/passwd"`` -> ``"passwd"``; ``"Crème brûlée 猫.jpg"`` -> ``"Creme_brulee"``;
    empty results become ``"image"``. Uniqueness comes from the job id that
    callers append, never from the name.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE.sub("_", ascii_stem).strip("._-")
    return cleaned[:max_len] or "image"


def safe_token(text: str, max_len: int = MAX_STEM) -> str:
    """Like :func:`safe_stem` but keeps every dotted part: for ids, which have no extension.

    ``safe_stem("job.1") == safe_stem("job.2") == "job"`` would make two ids collide.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return _UNSAFE.sub("_", ascii_text).strip("._-")[:max_len] or "id"
