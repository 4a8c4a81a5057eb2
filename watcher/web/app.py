"""The web app behind ``pawcam serve``: results, detail, upload, dashboard and their JSON API.

    source = Source.for_outbox(outbox, inbox, wcfg)      # a daemon's outbox (upload possible)
    source = Source.for_results(folder)                  # a bulk run's --out folder
    app = create_app(source, ServeSettings())            # a Starlette ASGI app
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``/`` results (filters, cursor pagination), ``/results/{job_id}`` detail, ``/upload``,
``/dashboard``, ``/login``; ``GET /api/results``, ``GET /api/results/{job_id}``,
``POST /api/upload``, ``GET /api/status``, ``GET /healthz``; pictures at
``/files/{job_id}/{gray|heatmap|overlay|photo}`` (looked up by job id, never a path).
Every response carries a Content-Security-Policy without inline script, ``nosniff`` and
``frame-ancestors 'none'``; a POST from another origin, a Host header that is not this server's
(DNS rebinding) and, with a token set, a request without it are refused.
"""
from __future__ import annotations

import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (JSONResponse, PlainTextResponse, RedirectResponse, Response,
                                 StreamingResponse)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from engine.charts import LABEL_COLORS, bar_chart, line_chart
from engine.results import PICTURE_KINDS, UNCERTAIN
from watcher.status import pid_alive, read_status
from watcher.web import files
from watcher.web.config import ServeSettings, is_loopback
from watcher.web.index import ERROR_LABEL, QueryError, Query, ResultsIndex

log = logging.getLogger("pawcam.web")

HERE = Path(__file__).resolve().parent
INDEX_NAME = ".pawcam-web.sqlite"
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
FILE_KINDS = (*PICTURE_KINDS, "photo")


@dataclass(frozen=True)
class Source:
    """What the app shows: a results CSV in a folder, and where uploads go (if anywhere)."""

    root: Path                         # the outbox / --out folder (pictures are under it)
    csv_name: str
    inbox: Path | None = None          # None: no upload (a bulk run's results)
    status_name: str | None = None     # the daemon's status.json, if any
    processed_dir: str | None = None   # where the daemon keeps finished photos
    ignore: tuple[str, ...] = ()       # the daemon's ignore patterns (upload names)

    @property
    def csv_path(self) -> Path:
        return self.root / self.csv_name

    @classmethod
    def for_outbox(cls, outbox: Path, inbox: Path | None, wcfg: Any) -> "Source":
        return cls(Path(outbox), wcfg.results_csv, inbox, wcfg.status_file,
                   wcfg.processed_dir if wcfg.on_success == "move" else None, tuple(wcfg.ignore))

    @classmethod
    def for_results(cls, folder: Path, csv_name: str = "predictions.csv") -> "Source":
        return cls(Path(folder), csv_name)


@dataclass
class WebApp:
    source: Source
    scfg: ServeSettings
    index: ResultsIndex
    read_only: bool = False
    started: float = field(default_factory=time.time)

    @property
    def can_upload(self) -> bool:
        return not self.read_only and self.source.inbox is not None


# -- helpers ------------------------------------------------------------------------------------
def _float_param(params, name: str) -> float | None:
    raw = params.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number between 0 and 1") from None
    return value


def parse_query(params) -> Query:
    label = params.get("label", "").strip()
    q = Query(label=label, min_conf=_float_param(params, "min_conf"),
              max_conf=_float_param(params, "max_conf"), q=params.get("q", "")[:200],
              path=params.get("path", ""), since=params.get("since", "").strip(),
              until=params.get("until", "").strip(), sort=params.get("sort", "new") or "new")
    try:
        q.validate()
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    return q


def _limit(params, default: int) -> int:
    try:
        return max(1, min(500, int(params.get("limit", default))))
    except ValueError:
        raise HTTPException(400, "limit must be a whole number") from None


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the API shows it, with the URLs of its pictures and detail page."""
    jid = quote(row["job_id"], safe="")
    out = {k: v for k, v in row.items() if k not in ("id",)}
    out["urls"] = {"detail": f"/results/{jid}",
                   **{k: f"/files/{jid}/{k}" for k in row["pictures"]}}
    return out


def _status(web: WebApp) -> dict[str, Any]:
    src = web.source
    data: dict[str, Any] = {"source": str(src.root), "csv": str(src.csv_path),
                            "upload": web.can_upload}
    if src.status_name:
        try:
            daemon = read_status(src.root / src.status_name)
        except FileNotFoundError:
            daemon = {"state": "never started"}
        except (OSError, ValueError) as exc:
            daemon = {"state": f"unreadable status file ({exc})"}
        pid = daemon.get("pid")
        if daemon.get("state") not in ("stopped", "never started") and isinstance(pid, int) \
                and not pid_alive(pid):
            daemon["state"] = "gone"
        data["daemon"] = daemon
    counts = web.index.label_counts()
    data["index"] = {"rows": sum(counts.values()), "labels": counts}
    return data


def _refresh(web: WebApp) -> None:
    try:
        web.index.refresh()
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", web.source.csv_path, exc)


# -- API ----------------------------------------------------------------------------------------
def api_results(request: Request) -> Response:
    web: WebApp = request.app.state.web
    query = parse_query(request.query_params)
    _refresh(web)
    try:
        page = web.index.query(query, _limit(request.query_params, web.scfg.page_size),
                               request.query_params.get("cursor", ""))
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    return JSONResponse({"results": [public_row(r) for r in page.rows],
                         "next_cursor": page.next_cursor or None})


def api_result(request: Request) -> Response:
    web: WebApp = request.app.state.web
    _refresh(web)
    row = web.index.get(request.path_params["job_id"])
    if row is None:
        return JSONResponse({"error": "no result with this job id"}, 404)
    return JSONResponse(public_row(row))


def api_status(request: Request) -> Response:
    web: WebApp = request.app.state.web
    _refresh(web)
    return JSONResponse(_status(web))


def healthz(request: Request) -> Response:
    web: WebApp = request.app.state.web
    ok = web.source.root.is_dir()
    return PlainTextResponse("ok\n" if ok else "outbox missing\n", 200 if ok else 503)


def serve_file(request: Request) -> Response:
    """A picture or the processed photo of one row; looked up by job id only."""
    web: WebApp = request.app.state.web
    kind = request.path_params["kind"]
    if kind not in FILE_KINDS:
        raise HTTPException(404, "no such picture kind")
    _refresh(web)
    row = web.index.get(request.path_params["job_id"])
    if row is None:
        raise HTTPException(404, "no result with this job id")
    src = web.source
    try:
        if kind == "photo":
            if src.processed_dir is None or row["status"] != "ok":
                raise files.NotServed("no photo kept for this row")
            fd = files.find_photo(src.root, src.processed_dir, row["input_path"], row["sha256"])
            name = row["input_path"]
        else:
            path = row["pictures"].get(kind)
            if not path:
                raise files.NotServed(f"this row has no {kind} picture")
            fd = files.picture_fd(src.root, path)
            name = path
    except files.NotServed as exc:
        log.debug("not served: %s", exc)
        raise HTTPException(404, "not found") from None
    size = os.fstat(fd).st_size
    fh = os.fdopen(fd, "rb")

    def chunks():
        with fh:
            for block in iter(lambda: fh.read(1 << 16), b""):
                yield block

    ctype = files.content_type(name)
    headers = {"content-length": str(size), "cache-control": "private, max-age=3600"}
    if ctype == "application/octet-stream":
        headers["content-disposition"] = "attachment"
    return StreamingResponse(chunks(), media_type=ctype, headers=headers)


async def api_upload(request: Request) -> Response:
    """Multipart ``files`` -> the inbox, each atomically; one result per file."""
    web: WebApp = request.app.state.web
    if not web.can_upload:
        return JSONResponse({"error": "upload is off (read-only mode, or these are a bulk "
                                      "run's results)"}, 403)
    scfg = web.scfg
    limit = scfg.max_upload_bytes * scfg.max_upload_files + (1 << 20)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return JSONResponse({"error": f"request too large: at most {scfg.max_upload_files} "
                                      f"files of {scfg.max_upload_bytes:,} bytes each"}, 413)
    try:
        form = await request.form(max_files=scfg.max_upload_files, max_fields=10)
    except HTTPException as exc:
        return JSONResponse({"error": f"{exc.detail} ([serve] max_upload_files)"
                             if "files" in str(exc.detail).lower() else exc.detail}, 400)
    uploads = [u for u in form.getlist("files") if isinstance(u, UploadFile)]
    if not uploads:
        return JSONResponse({"error": "no files in the request (send them as multipart "
                                      "field 'files')"}, 400)
    out = []
    try:
        for up in uploads:
            out.append(await run_in_threadpool(_store_one, web, up))
    finally:
        await form.close()
    code = 200 if any(o["status"] == "queued" for o in out) else 422
    return JSONResponse({"files": out}, code)


def _store_one(web: WebApp, up: UploadFile) -> dict[str, Any]:
    raw = up.filename or ""
    name = files.upload_name(raw)
    entry: dict[str, Any] = {"name": raw, "stored_as": "", "size": 0, "status": "refused",
                             "reason": "", "uploaded_at": ""}
    reason = files.refuse_reason(name, web.source.ignore)
    if not reason and up.size is not None and up.size > web.scfg.max_upload_bytes:
        reason = (f"larger than the limit of {web.scfg.max_upload_bytes:,} bytes "
                  "([serve] max_upload_bytes)")
    if reason:
        entry["reason"] = reason
        return entry
    from engine.results import utc_now

    entry["uploaded_at"] = utc_now()
    try:
        stored, size = files.store_upload(web.source.inbox, up.file, name,
                                          web.scfg.max_upload_bytes)
    except ValueError as exc:
        entry["reason"] = str(exc)
        return entry
    except OSError as exc:
        log.error("upload of %r failed: %s", name, exc)
        entry["reason"] = f"could not write into the inbox: {exc.strerror or exc}"
        return entry
    log.info("upload %r -> inbox/%s (%d bytes)", raw, stored, size)
    entry.update(stored_as=stored, size=size, status="queued")
    return entry


# -- pages --------------------------------------------------------------------------------------
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["pct"] = lambda v: "" if v is None else (
    ">99.9%" if v > 0.999 else f"{v:.1%}")
templates.env.globals["quote"] = lambda s: quote(str(s), safe="")


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    web: WebApp = request.app.state.web
    context.setdefault("can_upload", web.can_upload)
    context.setdefault("source", web.source)
    return templates.TemplateResponse(request, name, context, status_code=status)


def _labels(web: WebApp) -> list[str]:
    seen = list(web.index.label_counts())
    classes = [k for k in seen if k not in (UNCERTAIN, ERROR_LABEL)]
    return [*classes, UNCERTAIN, ERROR_LABEL]


def results_page(request: Request) -> Response:
    web: WebApp = request.app.state.web
    params = request.query_params
    query = parse_query(params)
    _refresh(web)
    try:
        page = web.index.query(query, _limit(params, web.scfg.page_size),
                               params.get("cursor", ""))
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    keep = {k: v for k, v in params.items() if k != "cursor" and v}
    next_url = ("?" + urlencode({**keep, "cursor": page.next_cursor})) if page.next_cursor else ""
    return _page(request, "results.html", {
        "rows": page.rows, "query": query, "params": params, "labels": _labels(web),
        "next_url": next_url, "first_url": ("?" + urlencode(keep)) if keep else "/",
        "paged": bool(params.get("cursor")), "counts": web.index.label_counts()})


def detail_page(request: Request) -> Response:
    web: WebApp = request.app.state.web
    _refresh(web)
    row = web.index.get(request.path_params["job_id"])
    if row is None:
        return _page(request, "error.html", {"message": "No result with this job id."}, 404)
    photo = web.source.processed_dir is not None and row["status"] == "ok"
    return _page(request, "detail.html", {"row": row, "photo": photo})


def upload_page(request: Request) -> Response:
    web: WebApp = request.app.state.web
    if not web.can_upload:
        return _page(request, "error.html", {"message": "Upload is off here (read-only mode, "
                                             "or these are a bulk run's results)."}, 404)
    return _page(request, "upload.html", {"scfg": web.scfg})


def dashboard_page(request: Request) -> Response:
    web: WebApp = request.app.state.web
    _refresh(web)
    hours = 3
    try:
        hours = max(1, min(72, int(request.query_params.get("hours", hours))))
    except ValueError:
        pass
    return _page(request, "dashboard.html", dashboard_context(web, hours))


def dashboard_context(web: WebApp, hours: int) -> dict[str, Any]:
    status = _status(web)
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    start = now - timedelta(hours=hours) + timedelta(minutes=1)
    minutes = [(start + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M")
               for i in range(hours * 60)]
    per = {m: (n, e) for m, n, e in web.index.per_minute(minutes[0])}
    rows = [per.get(m, (0, 0))[0] for m in minutes]
    errs = [per.get(m, (0, 0))[1] for m in minutes]
    total, errors = sum(rows), sum(errs)
    counts = web.index.label_counts()
    daemon = status.get("daemon", {})
    uptime = ""
    if daemon.get("started") and daemon.get("state") in ("running", "starting", "stopping"):
        try:
            began = datetime.fromisoformat(daemon["started"].replace("Z", "+00:00"))
            uptime = str(datetime.now(timezone.utc) - began).split(".")[0]
        except ValueError:
            pass
    ticks = [(i, minutes[i][11:]) for i in range(0, len(minutes), max(1, len(minutes) // 6))]
    return {
        "status": status, "daemon": daemon, "uptime": uptime, "hours": hours,
        "total": total, "errors": errors, "error_rate": errors / total if total else 0.0,
        "counts": counts,
        "throughput_svg": line_chart(rows, ticks, title=f"files per minute, last {hours} h"),
        "errors_svg": line_chart(errs, ticks, title=f"errors per minute, last {hours} h",
                                 color="#c0392b"),
        "labels_svg": bar_chart(list(counts.items()), title="label mix (all rows)", colors=LABEL_COLORS),
    }


def login_page(request: Request) -> Response:
    return _page(request, "login.html", {"failed": False})


async def login_post(request: Request) -> Response:
    web: WebApp = request.app.state.web
    form = await request.form(max_files=0, max_fields=5)
    given = str(form.get("token", ""))
    token = web.scfg.effective_token
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        return _page(request, "login.html", {"failed": True}, 401)
    resp = RedirectResponse("/", 303)
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                    secure=request.url.scheme == "https")
    return resp


async def http_error(request: Request, exc: HTTPException) -> Response:
    if request.url.path.startswith("/api/") or request.url.path.startswith("/files/"):
        return JSONResponse({"error": exc.detail}, exc.status_code)
    return _page(request, "error.html", {"message": exc.detail}, exc.status_code)


# -- the guard: hosts, token, origin, headers ---------------------------------------------------
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


# -- the app ------------------------------------------------------------------------------------
def index_path_for(source: Source, scfg: ServeSettings) -> Path:
    """[serve] index_path; else beside the CSV; else (a read-only outbox) in the user's cache."""
    if scfg.index_path:
        return Path(scfg.index_path)
    if os.access(source.root, os.W_OK) or not source.root.is_dir():
        return source.root / INDEX_NAME
    import hashlib

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pawcam"
    digest = hashlib.sha256(str(source.csv_path.resolve()).encode()).hexdigest()[:16]
    log.info("%s is read-only: the index goes in %s", source.root, cache)
    return cache / f"index-{digest}.sqlite"


def check_binding(host: str, scfg: ServeSettings) -> None:
    """Refuse to listen beyond loopback without a token (ConfigError says what to do)."""
    from engine.errors import ConfigError

    if not is_loopback(host) and not scfg.effective_token:
        raise ConfigError(f"refusing to listen on {host} without a token: set [serve] token "
                          "(or PAWCAM_SERVE_TOKEN) or listen on 127.0.0.1")


def create_app(source: Source, scfg: ServeSettings, *, read_only: bool | None = None,
               bound_host: str | None = None) -> Starlette:
    """The ASGI app. The index is opened (and rebuilt if needed) here; rows are read lazily."""
    check_binding(bound_host or scfg.host, scfg)
    index = ResultsIndex(source.csv_path, index_path_for(source, scfg), scfg.refresh_seconds)
    web = WebApp(source, scfg, index, scfg.read_only if read_only is None else read_only)
    routes = [
        Route("/", results_page),
        Route("/results/{job_id:str}", detail_page),
        Route("/upload", upload_page),
        Route("/dashboard", dashboard_page),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/api/results", api_results),
        Route("/api/results/{job_id:str}", api_result),
        Route("/api/upload", api_upload, methods=["POST"]),
        Route("/api/status", api_status),
        Route("/healthz", healthz),
        Route("/files/{job_id:str}/{kind:str}", serve_file),
        Mount("/static", StaticFiles(directory=str(HERE / "static"), follow_symlink=False),
              name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.web = web
    app.add_middleware(Guard, scfg=scfg, bound_host=bound_host or scfg.host)
    return app
