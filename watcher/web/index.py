"""An SQLite index of a results CSV, kept up to date by tailing the CSV.

    index = ResultsIndex(outbox / "results.csv", outbox / ".pawcam-web.sqlite")
    index.refresh()                               # reads only the bytes added since last time
    page = index.query(Query(label="uncertain", min_conf=0.5), limit=50)
    page.rows, page.next_cursor                   # newest first; pass the cursor for more
    index.get("w20261206T174000Z-1a2b3c-000001")  # one row, or None

The CSV (written by engine.results) stays the source of truth: the index remembers how many
bytes of it were read (always a whole number of records) and a fingerprint of its start; a CSV
that was replaced, shrank below that point or has another header, and an index that is
missing, of an older schema or corrupt, are rebuilt from scratch. Deleting the index loses
nothing. A partial last record (a crash cut it, or it is being written) waits for its end.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from engine.results import PICTURE_KINDS, STATUS_ERROR, unneutralize

log = logging.getLogger("pawcam.web")

SCHEMA_VERSION = "3"
HEAD_BYTES = 4096           # fingerprint of the CSV's start: a replaced file is noticed
CHUNK_BYTES = 8 << 20       # CSV bytes parsed per transaction while catching up
ERROR_LABEL = "error"       # the label filter's name for failed rows (status error)
SORTS = ("new", "old", "conf_asc", "conf_desc")
MAX_LIMIT = 500
ANALYZE_AFTER = 5000        # new rows in one refresh that warrant fresh planner statistics
FTS_PROBE = 2000            # name search: fewer trigram hits than this -> look them up by id,
                            # more -> scan in page order (common terms fill a page at once)
_FTS = ("CREATE VIRTUAL TABLE names USING fts5(name_lc, content='rows', content_rowid='id', "
        "tokenize='trigram')")

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rows(
    id INTEGER PRIMARY KEY,            -- CSV order: newest = highest
    job_id TEXT NOT NULL,
    input_path TEXT NOT NULL,
    name_lc TEXT NOT NULL,             -- lower-cased input_path, for the name search
    label TEXT NOT NULL,               -- the model's label, or 'error' for a failed row
    status TEXT NOT NULL,
    confidence REAL,
    probs TEXT NOT NULL,               -- JSON {class: probability}
    gray_path TEXT NOT NULL, heatmap_path TEXT NOT NULL, overlay_path TEXT NOT NULL,
    width INTEGER, height INTEGER,
    error TEXT NOT NULL, model_version TEXT NOT NULL,
    processed_at TEXT NOT NULL, sha256 TEXT NOT NULL
);
CREATE INDEX rows_job ON rows(job_id);
CREATE INDEX rows_label ON rows(label, id);
CREATE INDEX rows_conf ON rows(confidence, id);
CREATE INDEX rows_label_conf ON rows(label, confidence, id);
CREATE INDEX rows_time ON rows(processed_at);
CREATE INDEX rows_path ON rows(input_path);
CREATE TABLE label_counts(label TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE minute_counts(minute TEXT PRIMARY KEY, n INTEGER NOT NULL, errors INTEGER NOT NULL);
"""

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


@dataclass
class IndexState:
    offset: int = 0
    head: str = ""
    header: list[str] = field(default_factory=list)


def _row_dict(r: sqlite3.Row) -> dict[str, Any]:
    d = {k: r[k] for k in ROW_FIELDS}
    d["probs"] = json.loads(d["probs"])
    d["pictures"] = {k: d.pop(f"{k}_path") for k in PICTURE_KINDS if d[f"{k}_path"]}
    for k in PICTURE_KINDS:
        d.pop(f"{k}_path", None)
    d["id"] = r["id"]
    return d


def _float(cell: str) -> float | None:
    try:
        return float(cell) if cell else None
    except ValueError:
        return None


def _int(cell: str) -> int | None:
    try:
        return int(cell) if cell else None
    except ValueError:
        return None


class RowParser:
    """CSV record -> index tuple, by the header's column names (engine.results.columns)."""

    def __init__(self, header: list[str]) -> None:
        need = ("input_path", "label", "confidence", "status", "error", "job_id")
        missing = [c for c in need if c not in header]
        if missing:
            raise ValueError(f"not a pawcam results CSV (no {', '.join(missing)} column)")
        self.pos = {name: i for i, name in enumerate(header)}
        self.classes = [c[5:] for c in header if c.startswith("prob_")]

    def __call__(self, row: list[str]) -> tuple | None:
        if len(row) != len(self.pos):
            return None
        get = lambda k: row[self.pos[k]] if k in self.pos else ""  # noqa: E731
        text = lambda k: unneutralize(get(k))  # noqa: E731
        status = get("status")
        path = text("input_path")
        label = ERROR_LABEL if status == STATUS_ERROR else text("label")
        probs = {c: _float(get(f"prob_{c}")) for c in self.classes}
        return (text("job_id"), path, path.lower(), label, status, _float(get("confidence")),
                json.dumps({k: v for k, v in probs.items() if v is not None}),
                *(text(f"{k}_path") for k in PICTURE_KINDS),
                _int(get("width")), _int(get("height")), text("error"), text("model_version"),
                get("processed_at"), get("sha256"))


class ResultsIndex:
    """The SQLite index (WAL) of one results CSV; thread-safe (a connection per thread)."""

    def __init__(self, csv_path: str | Path, db_path: str | Path, min_refresh_s: float = 0.5):
        self.csv_path = Path(csv_path)
        self.db_path = Path(db_path)
        self.min_refresh_s = min_refresh_s
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._last_refresh = 0.0
        self._generation = 0
        self._fts = False
        self._open_checked()
        self._fts = self._meta(self.con).get("fts") == "1"

    # -- connections ----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None,
                              check_same_thread=False)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    @property
    def con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "generation", -1) != self._generation:
            if con is not None:
                con.close()
            con = self._local.con = self._connect()
            self._local.generation = self._generation
        return con

    def _open_checked(self) -> None:
        """Open the index; a corrupt one or one of another schema is deleted and rebuilt."""
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = self._connect()
            version = self._meta(con).get("schema")
            if version != SCHEMA_VERSION:
                con.close()
                if version is not None:
                    log.info("index %s has schema %s; rebuilding", self.db_path, version)
                self._recreate()
            else:
                con.execute("SELECT count(*) FROM label_counts").fetchone()
                con.close()
        except sqlite3.DatabaseError as exc:
            log.warning("index %s is unreadable (%s); rebuilding it from the CSV",
                        self.db_path, exc)
            self._recreate()

    def _recreate(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.db_path) + suffix).unlink(missing_ok=True)
        self._generation += 1
        con = self._connect()
        con.executescript(_SCHEMA)
        try:   # substring search index; SQLite >= 3.34 with FTS5 (else: plain scans)
            con.execute(_FTS)
            fts = "1"
        except sqlite3.OperationalError as exc:
            log.info("no FTS5 trigram index (%s): file-name search scans", exc)
            fts = "0"
        con.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", SCHEMA_VERSION),
                                                            ("fts", fts)])
        con.close()
        self._fts = fts == "1"

    @staticmethod
    def _meta(con: sqlite3.Connection) -> dict[str, str]:
        try:
            return {k: v for k, v in con.execute("SELECT key, value FROM meta")}
        except sqlite3.OperationalError:  # empty file: no tables yet
            return {}

    def state(self) -> IndexState:
        m = self._meta(self.con)
        return IndexState(int(m.get("offset", 0)), m.get("head", ""),
                          json.loads(m.get("header", "[]")))

    # -- tailing --------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> int:
        """Index the records appended since the last call; returns how many were added.
        Calls closer together than ``min_refresh_s`` do nothing (unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_refresh < self.min_refresh_s:
            return 0
        with self._write_lock:
            self._last_refresh = now
            try:
                return self._refresh()
            except sqlite3.DatabaseError as exc:
                log.warning("index %s failed (%s); rebuilding it from the CSV", self.db_path, exc)
                self._recreate()
                return self._refresh()

    def _refresh(self) -> int:
        try:
            fh = open(self.csv_path, "rb")
        except FileNotFoundError:
            if self.state().offset:
                self._recreate()
            return 0
        added = 0
        with fh:
            size = os.fstat(fh.fileno()).st_size
            st = self.state()
            if st.offset and (size < st.offset or _fingerprint(fh, st.offset) != st.head):
                log.info("%s was replaced or cut short; rebuilding the index", self.csv_path)
                self._recreate()
                st = IndexState()
            offset, header = st.offset, st.header
            parser = RowParser(header) if header else None
            while offset < size:
                n = CHUNK_BYTES
                while True:
                    fh.seek(offset)
                    raw = fh.read(n)
                    end = complete_end(raw)
                    if end or offset + len(raw) >= size:
                        break
                    n *= 2             # one record longer than a chunk: read more
                if end == 0:
                    break              # a partial last record: wait for its end
                text = raw[:end].decode("utf-8", "surrogateescape")
                records = list(csv.reader(io.StringIO(text, newline="")))
                offset += end
                if not header:
                    header = records.pop(0) if records else []
                    parser = RowParser(header)
                tuples = [t for t in map(parser, records) if t is not None]
                self._store(tuples, offset, header, _fingerprint(fh, offset))
                added += len(tuples)
        if added >= ANALYZE_AFTER:
            self.con.execute("ANALYZE")   # row statistics: the planner picks scan vs index
        if added:
            log.debug("indexed %d new row(s) of %s", added, self.csv_path)
        return added

    def _store(self, tuples: list[tuple], offset: int, header: list[str], head: str) -> None:
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            first_new = con.execute("SELECT coalesce(max(id), 0) FROM rows").fetchone()[0]
            cols = ", ".join(("job_id", "input_path", "name_lc", "label", "status", "confidence",
                              "probs", "gray_path", "heatmap_path", "overlay_path", "width",
                              "height", "error", "model_version", "processed_at", "sha256"))
            con.executemany(f"INSERT INTO rows({cols}) VALUES ({', '.join('?' * 16)})", tuples)
            counts: dict[str, int] = {}
            for t in tuples:
                counts[t[3]] = counts.get(t[3], 0) + 1
            if self._fts:
                con.execute("INSERT INTO names(rowid, name_lc) SELECT id, name_lc FROM rows "
                            "WHERE id > ?", (first_new,))
            con.executemany("INSERT INTO label_counts VALUES (?, ?) ON CONFLICT(label) "
                            "DO UPDATE SET n = n + excluded.n", counts.items())
            minutes: dict[str, list[int]] = {}
            for t in tuples:
                m = minutes.setdefault(t[14][:16], [0, 0])
                m[0] += 1
                m[1] += t[4] == STATUS_ERROR
            con.executemany("INSERT INTO minute_counts VALUES (?, ?, ?) ON CONFLICT(minute) "
                            "DO UPDATE SET n = n + excluded.n, errors = errors + excluded.errors",
                            [(k, n, e) for k, (n, e) in minutes.items()])
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [("offset", str(offset)), ("header", json.dumps(header)),
                             ("head", head)])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    # -- queries --------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        """The newest row of ``job_id`` (ids are unique in pawcam's CSVs)."""
        r = self.con.execute("SELECT * FROM rows WHERE job_id = ? ORDER BY id DESC LIMIT 1",
                             (job_id,)).fetchone()
        return None if r is None else _row_dict(r)

    def query(self, query: Query, limit: int = 50, cursor: str = "") -> Page:
        """One page of rows matching ``query``, in its sort order; ``cursor`` from the
        previous page's ``next_cursor`` (keyset pagination: constant cost per page)."""
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
            if self._fts and len(term) >= 3:
                phrase = '"' + term.replace('"', '""') + '"'
                hits = self.con.execute(
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
        rows = self.con.execute(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = key(rows[-1]) if more and rows else ""
        return Page([_row_dict(r) for r in rows], next_cursor)

    def label_counts(self) -> dict[str, int]:
        return {k: n for k, n in self.con.execute("SELECT label, n FROM label_counts ORDER BY label")}

    def total(self) -> int:
        return sum(self.label_counts().values())

    def per_minute(self, since: str) -> list[tuple[str, int, int]]:
        """``(minute 'YYYY-MM-DDTHH:MM', rows, errors)`` for the minutes from ``since`` on,
        oldest first (counts kept per minute as rows are indexed)."""
        return [(m, n, e) for m, n, e in self.con.execute(
            "SELECT minute, n, errors FROM minute_counts WHERE minute >= ? ORDER BY minute",
            (since[:16],))]

    def newest(self, n: int = 1) -> Iterator[dict[str, Any]]:
        for r in self.con.execute("SELECT * FROM rows ORDER BY id DESC LIMIT ?", (n,)):
            yield _row_dict(r)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def complete_end(raw: bytes) -> int:
    """Offset just past the last ``\r\n`` outside quotes in ``raw`` (0 if none): the same
    rule as engine.results.last_complete_record_end, on bytes and in C-speed steps (a
    position is outside quotes when the quotes before it are even in number, since quotes
    inside a field are doubled)."""
    quotes = raw.count(b'"')
    pos = len(raw)
    while True:
        i = raw.rfind(b"\r\n", 0, pos)
        if i < 0:
            return 0
        if (quotes - raw.count(b'"', i)) % 2 == 0:
            return i + 2
        pos = i


def _fingerprint(fh, offset: int) -> str:
    """sha256 of the file's first ``min(offset, HEAD_BYTES)`` bytes."""
    fh.seek(0)
    return hashlib.sha256(fh.read(min(offset, HEAD_BYTES))).hexdigest()


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
