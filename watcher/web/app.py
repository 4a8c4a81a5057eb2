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

This module only assembles the app; each route lives with its job: :mod:`.pages` (results,
detail, login, errors), :mod:`.dashboard`, :mod:`.upload`, :mod:`.api` (JSON and pictures),
:mod:`.guard` (the middleware), :mod:`.state` (Source, WebApp, shared request helpers).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from watcher.web.api import api_result, api_results, api_status, healthz, serve_file
from watcher.web.config import ServeSettings
from watcher.web.dashboard import dashboard_page
from watcher.web.guard import Guard, check_binding
from watcher.web.index import ResultsIndex
from watcher.web.pages import detail_page, http_error, login_page, login_post, results_page
from watcher.web.state import Source, WebApp
from watcher.web.upload import api_upload, upload_page

__all__ = ["Source", "create_app", "index_path_for"]

log = logging.getLogger("pawcam.web")

HERE = Path(__file__).resolve().parent
INDEX_NAME = ".pawcam-web.sqlite"


def index_path_for(source: Source, scfg: ServeSettings) -> Path:
    """[serve] index_path; else beside the CSV; else (a read-only outbox) in the user's cache."""
    if scfg.index_path:
        return Path(scfg.index_path)
    if os.access(source.root, os.W_OK) or not source.root.is_dir():
        return source.root / INDEX_NAME
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pawcam"
    digest = hashlib.sha256(str(source.csv_path.resolve()).encode()).hexdigest()[:16]
    log.info("%s is read-only: the index goes in %s", source.root, cache)
    return cache / f"index-{digest}.sqlite"


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
