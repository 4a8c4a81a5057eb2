"""The daemon's status file (JSON, in the outbox, replaced atomically) and its readable form."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.durable import write_atomic
from engine.text import utc_now


@dataclass
class Status:
    state: str = "starting"            # starting, running, degraded, stopping, stopped
    pid: int = field(default_factory=os.getpid)
    started: str = field(default_factory=utc_now)
    updated: str = field(default_factory=utc_now)
    inbox: str = ""
    outbox: str = ""
    observer: str = ""
    model_version: str = ""
    processed: int = 0                 # rows written since start (ok + failed)
    ok: int = 0
    failed: int = 0
    recovered: int = 0                 # files taken over from a previous run's crash
    queue_depth: int = 0               # seen, not yet claimed + claimed, not yet committed
    batches: int = 0
    last_batch_size: int = 0
    last_batch_seconds: float = 0.0
    last_batch_at: str = ""
    latency_p50_s: float | None = None # ready in the inbox -> row committed, recent files
    latency_p95_s: float | None = None
    degraded_reason: str = ""          # why no new files are taken (state "degraded")
    degraded_since: str = ""
    next_retry_at: str = ""            # when the daemon tries again (it resumes by itself)
    last_reload: str = ""              # outcome of the last SIGHUP reload

    def write(self, path: Path) -> None:
        """Replace the file atomically; on a full file system, overwrite the existing file in
        place instead (its blocks are already allocated), so that ``pawcam status`` can still
        say why the daemon is degraded."""
        self.updated = utc_now()
        data = (json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            write_atomic(path, data, durable=False)
        except OSError:
            if not overwrite_in_place(path, data):
                raise


def overwrite_in_place(path: Path, data: bytes) -> bool:
    """Write ``data`` over an existing file without allocating (padded with spaces to the old
    size, which JSON allows, instead of truncating). A reader may see a torn mix for a moment
    (``pawcam status`` then says it cannot read the file); only used when the atomic write
    failed. False when the file does not exist or the write fails too."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        body = data.rstrip(b"\n").ljust(size - 1) + b"\n" if len(data) < size else data
        os.pwrite(fd, body, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def read_status(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_status(data: dict[str, Any], path: Path | None = None) -> str:
    """The status as aligned ``key: value`` lines for people."""
    state = data.get("state", "?")
    pid = data.get("pid")
    if state not in ("stopped",) and isinstance(pid, int) and not pid_alive(pid):
        state += " (process gone: crashed or killed; the next start recovers its work)"
    rows = [
        ("state", state),
        ("pid", pid),
        ("started", data.get("started", "")),
        ("updated", data.get("updated", "")),
        ("inbox", data.get("inbox", "")),
        ("outbox", data.get("outbox", "")),
        ("observer", data.get("observer", "")),
        ("model version", data.get("model_version", "")),
        ("processed", f"{data.get('processed', 0)} ({data.get('ok', 0)} ok, "
                      f"{data.get('failed', 0)} failed, {data.get('recovered', 0)} recovered)"),
        ("queue depth", data.get("queue_depth", 0)),
        ("batches", data.get("batches", 0)),
        ("last batch", f"{data.get('last_batch_size', 0)} file(s) in "
                       f"{float(data.get('last_batch_seconds', 0.0)):.2f} s at "
                       f"{data.get('last_batch_at') or 'never'}"),
    ]
    if data.get("latency_p50_s") is not None:
        rows.append(("latency p50/p95", f"{data['latency_p50_s']:.2f} s / "
                                         f"{data.get('latency_p95_s') or 0:.2f} s"))
    if data.get("degraded_reason"):
        rows.insert(1, ("degraded", f"since {data.get('degraded_since') or '?'}: "
                                    f"{data['degraded_reason']}; not taking new files, next try "
                                    f"at {data.get('next_retry_at') or '?'} (resumes by itself)"))
    if data.get("last_reload"):
        rows.append(("last reload", data["last_reload"]))
    if path is not None:
        rows.insert(0, ("status file", str(path)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows)
