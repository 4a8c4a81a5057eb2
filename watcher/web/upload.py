"""Upload: the page and ``POST /api/upload`` (multipart ``files`` -> the daemon's inbox).

    curl -F files=@cat.jpg -F files=@dog.png http://127.0.0.1:8000/api/upload

Each file is checked (name, size, the daemon's ignore patterns) and written atomically into
the inbox (:mod:`watcher.web.files`); the answer has one entry per file: queued or refused,
with the reason. Off in read-only mode and for a bulk run's results.
"""
from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.text import utc_now
from watcher.web import files
from watcher.web.pages import page
from watcher.web.state import WebApp

log = logging.getLogger("pawcam.web")


def upload_page(request: Request) -> Response:
    web: WebApp = request.app.state.web
    if not web.can_upload:
        return page(request, "error.html", {"message": "Upload is off here (read-only mode, "
                                            "or these are a bulk run's results)."}, 404)
    return page(request, "upload.html", {"scfg": web.scfg})


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
