"""The ``[watcher]`` section of config.toml as a frozen, validated dataclass.

    wcfg = watcher_settings(settings)           # from engine.config.load_settings(...)
    wcfg.settle_ms, wcfg.max_wait_ms, wcfg.effective_batch_size(settings)

Every knob has a default, so an absent ``[watcher]`` table is fine. Unknown keys and wrong types
are a ConfigError naming the key and the file (engine.config.build_section does that);
:meth:`WatcherSettings.validate` checks ranges and names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.config import Settings, _check, build_section

OBSERVERS = ("native", "polling")
ON_SUCCESS = ("move", "delete")
DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.crdownload", "*~")


def _plain_name(value: str) -> bool:
    return bool(value) and "/" not in value and "\0" not in value and value not in (".", "..")


@dataclass(frozen=True)
class WatcherSettings:
    #: "native": inotify on Linux (FSEvents/kqueue/ReadDirectoryChangesW elsewhere);
    #: "polling": compare folder listings every poll_seconds (network file systems).
    observer: str = "native"
    poll_seconds: float = 1.0
    #: full rescan of the inbox, a backstop for missed events; 0 turns it off
    rescan_seconds: float = 30.0
    #: a file nobody reported closed is taken once size and mtime were stable this long
    settle_ms: int = 2000
    #: a batch goes out this long after its first file was ready, even if not full
    max_wait_ms: int = 500
    #: files per batch; 0 = [inference] batch_size
    batch_size: int = 0
    #: what happens to an input after a successful row: "move" to outbox/processed/ or "delete"
    on_success: str = "move"
    #: names (any path component) never taken: glob patterns
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    #: claim area inside the inbox (same file system, so claiming is an atomic rename)
    processing_dir: str = ".pawcam-processing"
    results_csv: str = "results.csv"
    status_file: str = "status.json"
    processed_dir: str = "processed"
    failed_dir: str = "failed"
    #: after SIGTERM/SIGINT: give up on the batch in hand after this long (it is redone at the
    #: next start) and exit anyway
    stop_timeout_s: float = 8.0
    #: talk to systemd (READY=1, STOPPING=1, WATCHDOG=1) when NOTIFY_SOCKET is set
    systemd_notify: bool = True
    #: Prometheus exporter (/metrics) on this port; 0 = off (needs the web extra)
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    #: free-space floor of the outbox's file system: below it no new files are claimed (the
    #: daemon is ``degraded`` until space is freed). On a file system smaller than ten times
    #: this, the floor is a tenth of its size. 0 turns the floor off.
    min_free_mb: int = 100

    #: settings a SIGHUP reload cannot change (a restart applies them)
    RESTART_ONLY: ClassVar[tuple[str, ...]] = (
        "observer", "poll_seconds", "processing_dir", "results_csv", "status_file",
        "processed_dir", "failed_dir", "systemd_notify", "metrics_port", "metrics_host")

    def validate(self, where: str) -> None:
        _check(self.observer in OBSERVERS, where, "observer", f"must be one of {list(OBSERVERS)}")
        _check(0.05 <= self.poll_seconds <= 3600, where, "poll_seconds",
               "must be between 0.05 and 3600")
        _check(self.rescan_seconds == 0 or 0.1 <= self.rescan_seconds <= 86400, where,
               "rescan_seconds", "must be 0 (off) or between 0.1 and 86400")
        _check(0 <= self.settle_ms <= 3_600_000, where, "settle_ms", "must be between 0 and 3600000")
        _check(0 <= self.max_wait_ms <= 600_000, where, "max_wait_ms",
               "must be between 0 and 600000")
        _check(0 <= self.batch_size <= 4096, where, "batch_size",
               "must be between 0 (use [inference] batch_size) and 4096")
        _check(self.on_success in ON_SUCCESS, where, "on_success",
               f"must be one of {list(ON_SUCCESS)}")
        for pattern in self.ignore:
            _check(bool(pattern), where, "ignore", "holds an empty pattern")
        _check(_plain_name(self.processing_dir) and self.processing_dir.startswith("."), where,
               "processing_dir", "must be a plain folder name starting with '.' (so it is "
               "never taken as input)")
        for key in ("results_csv", "status_file", "processed_dir", "failed_dir"):
            _check(_plain_name(getattr(self, key)), where, key, "must be a plain file name")
        _check(len({self.results_csv, self.status_file, self.processed_dir, self.failed_dir}) == 4,
               where, "results_csv", "results_csv, status_file, processed_dir and failed_dir "
               "must all differ")
        _check(0.5 <= self.stop_timeout_s <= 600, where, "stop_timeout_s",
               "must be between 0.5 and 600")
        _check(0 <= self.metrics_port <= 65535, where, "metrics_port",
               "must be 0 (off) or a port number")
        _check(bool(self.metrics_host), where, "metrics_host", "must be an address")
        _check(0 <= self.min_free_mb <= 10_000_000, where, "min_free_mb",
               "must be between 0 (off) and 10000000")

    def effective_batch_size(self, settings: Settings) -> int:
        return self.batch_size or settings.inference.batch_size

    def free_space_floor(self, fs_bytes: int) -> int:
        """Bytes that must stay free on a file system of ``fs_bytes``: ``min_free_mb``, or a
        tenth of a small file system (so an 8 MB one still works, with 0.8 MB kept free)."""
        return min(self.min_free_mb * 2**20, fs_bytes // 10)


def watcher_settings(settings: Settings) -> WatcherSettings:
    """Build and validate ``[watcher]`` from loaded settings (ConfigError on a bad value)."""
    return build_section(WatcherSettings, settings.extra_sections.get("watcher"), "watcher",
                         settings.source, settings.base_dir)
