"""What every route of the web app reads: the source of the rows, the app's state, and the
request helpers they share (filters from the query string, the status summary).

    source = Source.for_outbox(outbox, inbox, wcfg)      # a daemon's outbox (upload possible)
    source = Source.for_results(folder)                  # a bulk run's --out folder
    web: WebApp = request.app.state.web                  # inside a route
    refresh(web); page = web.index.query(parse_query(request.query_params), limit)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.exceptions import HTTPException

from watcher.status import pid_alive, read_status
from watcher.web.config import ServeSettings
from watcher.web.index import Query, QueryError, ResultsIndex

log = logging.getLogger("pawcam.web")


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


def limit_param(params, default: int) -> int:
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


def status_of(web: WebApp) -> dict[str, Any]:
    """The source, the daemon's status (if it has one) and the index's counts."""
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


def refresh(web: WebApp) -> None:
    """Bring the index up to the CSV; an unreadable CSV is logged (the pages show what is
    indexed)."""
    try:
        web.index.refresh()
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", web.source.csv_path, exc)
