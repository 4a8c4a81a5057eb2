"""Reading the index: filters, sort orders and keyset pages over the ``rows`` table.

    page = select_page(con, fts, Query(label="cat", min_conf=0.9), limit=50)
    page.rows, page.next_cursor          # pass the cursor back for the next page

Keyset pagination: a cursor is the sort key of the page's last row, so every page costs the
same however deep it is. The file-name search uses the FTS5 trigram index for rare terms and
scans in page order for common ones (``FTS_PROBE``).
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from engine.results import PICTURE_KINDS

SORTS = ("new", "old", "conf_asc", "conf_desc")
MAX_LIMIT = 500
FTS_PROBE = 2000            # name search: fewer trigram hits than this -> look them up by id,
                            # more -> scan in page order (common terms fill a page at once)
ROW_FIELDS = ("job_id", "input_path", "label", "status", "confidence", "probs", "gray_path",
              "heatmap_path", "overlay_path", "width", "height", "error", "model_version",
              "processed_at", "sha256")


class QueryError(Exception):
    """A filter, sort or cursor value the index cannot use; the message says what to fix."""


@dataclass(frozen=True)
class Query:
    """Filters of the results list (every field optional)."""

    label: str = ""                 # a class name, "uncertain" or "error"
    min_conf: float | None = None
    max_conf: float | None = None
    q: str = ""                     # substring of the file name, case-insensitive
    path: str = ""                  # exact input_path
    since: str = ""                 # processed_at >= since (ISO 8601 UTC, any prefix)
    until: str = ""                 # processed_at < until
    sort: str = "new"

    def validate(self) -> None:
        if self.sort not in SORTS:
            raise QueryError(f"sort must be one of {', '.join(SORTS)}")
        for name in ("min_conf", "max_conf"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise QueryError(f"{name} must be between 0 and 1")


@dataclass
class Page:
    rows: list[dict[str, Any]]
    next_cursor: str = ""


def row_dict(r: sqlite3.Row) -> dict[str, Any]:
    """A stored row as the app uses it: probabilities parsed, pictures by kind."""
    d = {k: r[k] for k in ROW_FIELDS}
    d["probs"] = json.loads(d["probs"])
    d["pictures"] = {k: d.pop(f"{k}_path") for k in PICTURE_KINDS if d[f"{k}_path"]}
    for k in PICTURE_KINDS:
        d.pop(f"{k}_path", None)
    d["id"] = r["id"]
    return d


def select_page(con: sqlite3.Connection, fts: bool, query: Query, limit: int = 50,
                cursor: str = "") -> Page:
    """One page of rows matching ``query``, in its sort order, after ``cursor``."""
    query.validate()
    limit = max(1, min(MAX_LIMIT, int(limit)))
    where, args = [], []
    if query.label:
        where.append("label = ?")
        args.append(query.label)
    if query.min_conf is not None:
        where.append("confidence >= ?")
        args.append(query.min_conf)
    if query.max_conf is not None:
        where.append("confidence <= ?")
        args.append(query.max_conf)
    if query.q:
        term = query.q.lower()
        esc = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append("name_lc LIKE ? ESCAPE '\\'")
        args.append(f"%{esc}%")
        if fts and len(term) >= 3:
            phrase = '"' + term.replace('"', '""') + '"'
            hits = con.execute(
                "SELECT count(*) FROM (SELECT rowid FROM names WHERE names MATCH ? "
                "LIMIT ?)", (phrase, FTS_PROBE)).fetchone()[0]
            if hits < FTS_PROBE:   # a rare term: fetch its rows by id, then filter/sort
                where.append("id IN (SELECT rowid FROM names WHERE names MATCH ?)")
                args.append(phrase)
    if query.path:
        where.append("input_path = ?")
        args.append(query.path)
    if query.since:
        where.append("processed_at >= ?")
        args.append(query.since)
    if query.until:
        where.append("processed_at < ?")
        args.append(query.until)
    # With a date filter, "newest first" walks the processed_at index (then the LIMIT stops
    # the walk early, whatever the range) instead of sorting the range by id.
    sort = f"{query.sort}_time" if query.sort in ("new", "old") and (
        query.since or query.until) else query.sort
    order, key = _ORDER[sort]
    if cursor:
        cond, cargs = _cursor_condition(sort, cursor)
        where.append(cond)
        args.extend(cargs)
    sql = "SELECT * FROM rows"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {order} LIMIT ?"
    rows = con.execute(sql, (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = key(rows[-1]) if more and rows else ""
    return Page([row_dict(r) for r in rows], next_cursor)


_ORDER = {
    "new": ("id DESC", lambda r: str(r["id"])),
    "old": ("id ASC", lambda r: str(r["id"])),
    "new_time": ("processed_at DESC, id DESC", lambda r: f"{r['processed_at']}|{r['id']}"),
    "old_time": ("processed_at ASC, id ASC", lambda r: f"{r['processed_at']}|{r['id']}"),
    "conf_desc": ("confidence DESC, id DESC",
                  lambda r: f"{'' if r['confidence'] is None else repr(r['confidence'])}:{r['id']}"),
    "conf_asc": ("confidence ASC, id ASC",
                 lambda r: f"{'' if r['confidence'] is None else repr(r['confidence'])}:{r['id']}"),
}


def _cursor_condition(sort: str, cursor: str) -> tuple[str, list]:
    try:
        if sort in ("new", "old"):
            rid = int(cursor)
            return ("id < ?" if sort == "new" else "id > ?"), [rid]
        if sort in ("new_time", "old_time"):
            ts, _, rid_s = cursor.rpartition("|")
            rid = int(rid_s)
            op = "<" if sort == "new_time" else ">"
            return f"(processed_at {op} ? OR (processed_at = ? AND id {op} ?))", [ts, ts, rid]
        conf_s, _, rid_s = cursor.rpartition(":")
        rid = int(rid_s)
        conf = float(conf_s) if conf_s else None
    except ValueError:
        raise QueryError("cursor is not one this server gave out; start from the first "
                          "page") from None
    # NULL confidences (error rows) sort first ascending, last descending (SQLite's rule)
    if sort == "conf_desc":
        if conf is None:
            return "(confidence IS NULL AND id < ?)", [rid]
        return ("(confidence < ? OR (confidence = ? AND id < ?) OR confidence IS NULL)",
                [conf, conf, rid])
    if conf is None:
        return "((confidence IS NULL AND id > ?) OR confidence IS NOT NULL)", [rid]
    return "(confidence > ? OR (confidence = ? AND id > ?))", [conf, conf, rid]
