"""Helpers shared by the watcher tests (no tests here): configs, real daemon processes, results."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, model_path: Path, *, outbox: Path | None = None,
                 **watcher) -> Path:
    inbox = tmp_path / "inbox"
    outbox = outbox or tmp_path / "outbox"
    inbox.mkdir(exist_ok=True)
    lines = [
        "[model]", f"path = {json.dumps(str(model_path))}",
        "[paths]", f"inbox = {json.dumps(str(inbox))}", f"outbox = {json.dumps(str(outbox))}",
        "[inference]", "batch_size = 16",
        "[gradcam]", "max_side = 64",
        "[device]", 'device = "cpu"',
        "[watcher]",
    ]
    defaults = {"settle_ms": 800, "max_wait_ms": 200, "rescan_seconds": 5.0}
    defaults.update(watcher)
    for key, value in defaults.items():
        lines.append(f"{key} = {json.dumps(value)}")
    cfg = tmp_path / "config.toml"
    cfg.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cfg


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["TF_CPP_MIN_LOG_LEVEL"] = "2"
    e["CUDA_VISIBLE_DEVICES"] = ""
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("NOTIFY_SOCKET", None)
    return e


class DaemonProc:
    """A real ``pawcam watch`` process; its stderr goes to a log file."""

    def __init__(self, cfg: Path, *args: str, log_name: str = "daemon.log",
                 extra_env: dict[str, str] | None = None, outbox: Path | None = None) -> None:
        self.cfg = cfg
        self._outbox = outbox
        self.log_path = cfg.parent / log_name
        self.log = open(self.log_path, "ab")
        e = env()
        e.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "--config", str(cfg), "watch", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=e, cwd=str(cfg.parent))

    @property
    def outbox(self) -> Path:
        return self._outbox or self.cfg.parent / "outbox"

    def status(self) -> dict:
        """The status file now ({} while it cannot be read)."""
        try:
            return json.loads((self.outbox / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_status(self, timeout: float, **want) -> dict:
        """Wait until the status file has every ``key=value`` of ``want`` (a value may be a
        callable test); the daemon must stay alive meanwhile."""
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()[-4000:]}")
            status = self.status()
            if status and all(v(status.get(k)) if callable(v) else status.get(k) == v
                              for k, v in want.items()):
                return status
            time.sleep(0.1)
        raise AssertionError(f"status never matched {want}: {status}\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_running(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        status = self.outbox / "status.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if json.loads(status.read_text())["state"] == "running":
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not running after {timeout} s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout + 5)
        finally:
            self.log.close()
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if not self.log.closed:
            self.log.close()


def unneutralize(cell: str) -> str:
    if cell[:1] == "'" and cell[1:2] in ("=", "+", "-", "@", "\t", "\r"):
        return cell[1:]
    return cell


def read_rows(outbox: Path) -> list[dict[str, str]]:
    path = outbox / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["input_path"] = unneutralize(row["input_path"])
    return rows


def wait_rows(daemon: DaemonProc | None, outbox: Path, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        rows = read_rows(outbox)
        if len(rows) >= count:
            return rows
        if daemon is not None and daemon.proc.poll() is not None:
            break
        time.sleep(0.1)
    log = daemon.log_text()[-4000:] if daemon else ""
    raise AssertionError(f"{len(rows)} rows, wanted {count} (timeout {timeout} s)\n{log}")


def processing_leftovers(inbox: Path) -> list[str]:
    processing = inbox / ".pawcam-processing"
    return sorted(n for n in os.listdir(processing) if n != ".lock") if processing.exists() else []


def inbox_files(inbox: Path) -> list[str]:
    """Every non-directory entry left under the inbox, processing area excluded."""
    out = []
    for folder, dirs, files in os.walk(inbox):
        dirs[:] = [d for d in dirs if d != ".pawcam-processing"]
        out += [os.path.relpath(os.path.join(folder, f), inbox) for f in files]
    return sorted(out)
