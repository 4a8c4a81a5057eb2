"""The ``[serve]`` section of config.toml (``pawcam serve``) as a frozen, validated dataclass.

    scfg = serve_settings(settings)              # from engine.config.load_settings(...)
    scfg.host, scfg.port, scfg.token, scfg.max_upload_bytes
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from engine.config import Settings, _check, build_section

TOKEN_ENV = "PAWCAM_SERVE_TOKEN"


def is_loopback(host: str) -> bool:
    """``127.0.0.1``, ``::1``, ``localhost`` -> True; ``0.0.0.0``, ``192.168.1.4`` -> False."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeSettings:
    #: address to listen on; anything but loopback needs a token
    host: str = "127.0.0.1"
    port: int = 8000
    #: shared secret for every page and API call (header ``Authorization: Bearer TOKEN`` or the
    #: cookie set by /login); required when host is not loopback. Env PAWCAM_SERVE_TOKEN wins.
    token: str = ""
    #: extra Host header values accepted (DNS-rebinding guard); loopback names and the bound
    #: host are always accepted; "*" accepts any. With a token and no list, any is accepted.
    allowed_hosts: tuple[str, ...] = ()
    #: hide upload and refuse POST /api/upload
    read_only: bool = False
    #: the SQLite index of the results CSV; "" = a hidden file beside the CSV
    #: (.pawcam-web.sqlite). Deleting it loses nothing: it is rebuilt from the CSV.
    index_path: str = ""
    #: results per page (the API's default limit)
    page_size: int = 48
    #: largest photo accepted per file, and most files per upload request
    max_upload_bytes: int = 50_000_000
    max_upload_files: int = 100
    #: the index reads new CSV rows at most this often (seconds)
    refresh_seconds: float = 0.5

    def validate(self, where: str) -> None:
        _check(bool(self.host) and "/" not in self.host, where, "host", "must be an address")
        _check(0 <= self.port <= 65535, where, "port", "must be between 0 and 65535")
        _check(not self.token or len(self.token) >= 16, where, "token",
               "must be at least 16 characters (try: python3 -c 'import secrets; "
               "print(secrets.token_urlsafe(24))')")
        _check(10 <= self.page_size <= 500, where, "page_size", "must be between 10 and 500")
        _check(1 <= self.max_upload_bytes <= 2_000_000_000, where, "max_upload_bytes",
               "must be between 1 and 2000000000")
        _check(1 <= self.max_upload_files <= 10_000, where, "max_upload_files",
               "must be between 1 and 10000")
        _check(0.0 <= self.refresh_seconds <= 60, where, "refresh_seconds",
               "must be between 0 and 60")

    @property
    def effective_token(self) -> str:
        return os.environ.get(TOKEN_ENV) or self.token


def serve_settings(settings: Settings) -> ServeSettings:
    """Build and validate ``[serve]`` from loaded settings (ConfigError on a bad value)."""
    return build_section(ServeSettings, settings.extra_sections.get("serve"), "serve",
                         settings.source, settings.base_dir)
