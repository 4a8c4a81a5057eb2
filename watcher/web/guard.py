"""The web app's guard: Host check (DNS rebinding), token, same-origin POST, security headers.

    app.add_middleware(Guard, scfg=scfg, bound_host="127.0.0.1")
    check_binding("0.0.0.0", scfg)      # ConfigError: beyond loopback only with a token

Every response carries a Content-Security-Policy without inline script, ``nosniff`` and
``frame-ancestors 'none'``; a POST from another origin, a Host header that is not this server's
and, with a token set, a request without it are refused.
"""
from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from engine.errors import ConfigError
from watcher.web.config import ServeSettings, is_loopback

COOKIE = "pawcam_token"
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
OPEN_PATHS = ("/healthz", "/login", "/static/")


def check_binding(host: str, scfg: ServeSettings) -> None:
    """Refuse to listen beyond loopback without a token (ConfigError says what to do)."""
    if not is_loopback(host) and not scfg.effective_token:
        raise ConfigError(f"refusing to listen on {host} without a token: set [serve] token "
                          "(or PAWCAM_SERVE_TOKEN) or listen on 127.0.0.1")


def _host_name(host_header: str) -> str:
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class Guard:
    """Pure ASGI middleware: Host check, token check, same-origin POST, security headers."""

    def __init__(self, app, scfg: ServeSettings, bound_host: str) -> None:
        self.app = app
        self.token = scfg.effective_token.encode()
        hosts = {"localhost", "127.0.0.1", "::1", bound_host.lower().strip("[]")}
        # With a token, a rebinding page cannot get in anyway: any Host is accepted unless
        # allowed_hosts narrows it.
        self.any_host = "*" in scfg.allowed_hosts or bool(self.token and not scfg.allowed_hosts)
        self.hosts = hosts | {h.lower() for h in scfg.allowed_hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        refusal = self._check(scope)
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)

    def _check(self, scope) -> Response | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.any_host and _host_name(host) not in self.hosts:
            return PlainTextResponse("unknown Host header (add it to [serve] allowed_hosts)\n",
                                     400)
        path = scope["path"]
        if self.token and not path.startswith(OPEN_PATHS) and not self._authorized(headers):
            if path.startswith(("/api/", "/files/")) or scope["method"] != "GET":
                return JSONResponse({"error": "token required (Authorization: Bearer TOKEN)"},
                                    401)
            return RedirectResponse("/login", 303)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            scheme = scope.get("scheme", "http")
            if origin is not None and origin != f"{scheme}://{host}":
                return JSONResponse({"error": "cross-origin request refused"}, 403)
            site = headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return JSONResponse({"error": "cross-site request refused"}, 403)
        return None

    def _authorized(self, headers: Headers) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not given:
            for part in headers.get("cookie", "").split(";"):
                k, _, v = part.strip().partition("=")
                if k == COOKIE:
                    given = v
        return bool(given) and hmac.compare_digest(given.encode(), self.token)
