"""The HTML pages: results list, one result's detail, login, and the error page.

    Route("/", results_page), Route("/results/{job_id:str}", detail_page)
    page(request, "error.html", {"message": "..."}, 404)     # any page, with the shared context

Templates are in watcher/web/templates (Jinja2, autoescaped); the dashboard and the upload page
are in :mod:`watcher.web.dashboard` and :mod:`watcher.web.upload`.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from engine.results import UNCERTAIN
from watcher.web.guard import COOKIE
from watcher.web.index import ERROR_LABEL, QueryError
from watcher.web.state import WebApp, limit_param, parse_query, refresh

templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))
templates.env.filters["pct"] = lambda v: "" if v is None else (
    ">99.9%" if v > 0.999 else f"{v:.1%}")
templates.env.globals["quote"] = lambda s: quote(str(s), safe="")


def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    """Render template ``name`` with ``can_upload`` and ``source`` added to ``context``."""
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
    refresh(web)
    try:
        found = web.index.query(query, limit_param(params, web.scfg.page_size),
                                params.get("cursor", ""))
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    keep = {k: v for k, v in params.items() if k != "cursor" and v}
    next_url = ("?" + urlencode({**keep, "cursor": found.next_cursor})) if found.next_cursor else ""
    return page(request, "results.html", {
        "rows": found.rows, "query": query, "params": params, "labels": _labels(web),
        "next_url": next_url, "first_url": ("?" + urlencode(keep)) if keep else "/",
        "paged": bool(params.get("cursor")), "counts": web.index.label_counts()})


def detail_page(request: Request) -> Response:
    web: WebApp = request.app.state.web
    refresh(web)
    row = web.index.get(request.path_params["job_id"])
    if row is None:
        return page(request, "error.html", {"message": "No result with this job id."}, 404)
    photo = web.source.processed_dir is not None and row["status"] == "ok"
    return page(request, "detail.html", {"row": row, "photo": photo})


def login_page(request: Request) -> Response:
    return page(request, "login.html", {"failed": False})


async def login_post(request: Request) -> Response:
    web: WebApp = request.app.state.web
    form = await request.form(max_files=0, max_fields=5)
    given = str(form.get("token", ""))
    token = web.scfg.effective_token
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        return page(request, "login.html", {"failed": True}, 401)
    resp = RedirectResponse("/", 303)
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                    secure=request.url.scheme == "https")
    return resp


async def http_error(request: Request, exc: HTTPException) -> Response:
    """JSON for the API and files, the error page for the rest."""
    if request.url.path.startswith("/api/") or request.url.path.startswith("/files/"):
        return JSONResponse({"error": exc.detail}, exc.status_code)
    return page(request, "error.html", {"message": exc.detail}, exc.status_code)
