"""The dashboard page: the daemon's state, throughput and errors per minute, the label mix.

    Route("/dashboard", dashboard_page)            # ?hours=1..72 (default 3)
    dashboard_context(web, hours=3)                # the numbers and SVG charts it shows

Counts come from the index's per-minute table; charts are server-side SVG
(:mod:`engine.charts`), so the page needs no script.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from engine.charts import LABEL_COLORS, bar_chart, line_chart
from watcher.web.pages import page
from watcher.web.state import WebApp, refresh, status_of


def dashboard_page(request: Request) -> Response:
    web: WebApp = request.app.state.web
    refresh(web)
    hours = 3
    try:
        hours = max(1, min(72, int(request.query_params.get("hours", hours))))
    except ValueError:
        pass
    return page(request, "dashboard.html", dashboard_context(web, hours))


def dashboard_context(web: WebApp, hours: int) -> dict[str, Any]:
    status = status_of(web)
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
