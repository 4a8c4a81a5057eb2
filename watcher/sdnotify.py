"""systemd's sd_notify protocol, without a dependency.

    notifier = Notifier.from_env()       # no-op unless NOTIFY_SOCKET is set
    notifier.send("READY=1", "STATUS=watching /srv/inbox")
    if notifier.watchdog_due(now): notifier.send("WATCHDOG=1")

The protocol: one datagram of newline-separated ``KEY=VALUE`` assignments to the unix datagram
socket named in ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract namespace
(its first byte is NUL). ``$WATCHDOG_USEC`` (for ``$WATCHDOG_PID``, when set) asks for
``WATCHDOG=1`` keep-alives more often than that; we send them every half of it.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Mapping

log = logging.getLogger(__name__)

SEND_TIMEOUT = 1.0  # seconds


def socket_address(value: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as an address for ``socket.connect``: ``@name`` -> ``b"\\0name"``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def sd_notify(*assignments: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``assignments`` (``"READY=1"``, ...) in one datagram. False when not under systemd
    or the send failed (logged once at debug level: never fatal)."""
    env = os.environ if env is None else env
    target = env.get("NOTIFY_SOCKET", "")
    if not target or not assignments:
        return False
    if not (target.startswith("/") or target.startswith("@")):
        log.debug("NOTIFY_SOCKET=%r is not a unix socket path; not notifying", target)
        return False
    payload = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)  # a listener that stopped reading must not hang us
            sock.connect(socket_address(target))
            sock.sendall(payload)
        return True
    except OSError as exc:
        log.debug("sd_notify(%s) to %s failed: %s", assignments, target, exc)
        return False


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between keep-alives (half of ``$WATCHDOG_USEC``), or None when not asked for."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wpid = env.get("WATCHDOG_PID", "")
    if wpid and wpid.isdigit() and int(wpid) != (os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1e6 / 2


@dataclass
class Notifier:
    enabled: bool
    env: Mapping[str, str]
    interval: float | None
    last_ping: float = float("-inf")

    @classmethod
    def from_env(cls, enabled: bool = True, env: Mapping[str, str] | None = None) -> "Notifier":
        env = dict(os.environ if env is None else env)
        on = enabled and bool(env.get("NOTIFY_SOCKET"))
        return cls(on, env, watchdog_interval(env) if on else None)

    def send(self, *assignments: str) -> bool:
        return self.enabled and sd_notify(*assignments, env=self.env)

    def ping(self, now: float) -> None:
        """WATCHDOG=1 when half the watchdog period has passed since the last one."""
        if self.enabled and self.interval is not None and now - self.last_ping >= self.interval:
            self.last_ping = now
            self.send("WATCHDOG=1")

    def next_ping(self) -> float | None:
        if not self.enabled or self.interval is None:
            return None
        return self.last_ping + self.interval
