"""The JSON API and the pictures: ``/api/results``, ``/api/results/{job_id}``,
``/api/status``, ``/healthz`` and ``/files/{job_id}/{gray|heatmap|overlay|photo}``.

    curl 'http://127.0.0.1:8000/api/results?label=cat&min_conf=0.9&limit=100'
    curl  http://127.0.0.1:8000/files/JOB_ID/overlay > overlay.jpg

Pictures are looked up by job id, never by a path from the request, and opened without
following symlinks (:mod:`watcher.web.files`). Upload is in :mod:`watcher.web.upload`.
"""
from __future__ import annotations

import logging
import os

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from engine.results import PICTURE_KINDS
from watcher.web import files
from watcher.web.index import QueryError
from watcher.web.state import WebApp, limit_param, parse_query, public_row, refresh, status_of

log = logging.getLogger("pawcam.web")

FILE_KINDS = (*PICTURE_KINDS, "photo")


def api_results(request: Request) -> Response:
    web: WebApp = request.app.state.web
    query = parse_query(request.query_params)
    refresh(web)
    try:
        page = web.index.query(query, limit_param(request.query_params, web.scfg.page_size),
                               request.query_params.get("cursor", ""))
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    return JSONResponse({"results": [public_row(r) for r in page.rows],
                         "next_cursor": page.next_cursor or None})


def api_result(request: Request) -> Response:
    web: WebApp = request.app.state.web
    refresh(web)
    row = web.index.get(request.path_params["job_id"])
    if row is None:
        return JSONResponse({"error": "no result with this job id"}, 404)
    return JSONResponse(public_row(row))


def api_status(request: Request) -> Response:
    web: WebApp = request.app.state.web
    refresh(web)
    return JSONResponse(status_of(web))


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
    refresh(web)
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
