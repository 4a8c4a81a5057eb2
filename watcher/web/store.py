"""The index's tables: schema, creation, its meta state, and appending rows with their counters.

    con = connect(db_path)                  # WAL, autocommit; rows come back as sqlite3.Row
    fts = create(db_path)                   # a fresh, empty index (old files deleted)
    state = read_state(con)                 # how far into the CSV it is
    append(con, fts, tuples, offset, header, head)   # one transaction: rows, counts, state

A schema change bumps ``SCHEMA_VERSION``: an index of another version is deleted and rebuilt
from the CSV (:class:`watcher.web.index.ResultsIndex`), so there are no migrations to keep.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from engine.results import STATUS_ERROR

log = logging.getLogger("pawcam.web")

SCHEMA_VERSION = "3"
ERROR_LABEL = "error"       # the label stored (and filtered on) for failed rows (status error)
FTS = ("CREATE VIRTUAL TABLE names USING fts5(name_lc, content='rows', content_rowid='id', "
       "tokenize='trigram')")

SCHEMA = """
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

#: the columns of a row tuple (:class:`watcher.web.tail.RowParser` makes them), in order
INSERT_COLUMNS = ("job_id", "input_path", "name_lc", "label", "status", "confidence", "probs",
                  "gray_path", "heatmap_path", "overlay_path", "width", "height", "error",
                  "model_version", "processed_at", "sha256")


@dataclass
class IndexState:
    """How much of the CSV is indexed: whole records up to ``offset``, the header, and a
    fingerprint of the CSV's start (a replaced file is noticed)."""

    offset: int = 0
    head: str = ""
    header: list[str] = field(default_factory=list)


def connect(db_path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


def read_meta(con: sqlite3.Connection) -> dict[str, str]:
    try:
        return {k: v for k, v in con.execute("SELECT key, value FROM meta")}
    except sqlite3.OperationalError:  # empty file: no tables yet
        return {}


def read_state(con: sqlite3.Connection) -> IndexState:
    m = read_meta(con)
    return IndexState(int(m.get("offset", 0)), m.get("head", ""), json.loads(m.get("header", "[]")))


def create(db_path: Path) -> bool:
    """Delete the index's files and create an empty one; returns whether it has the FTS5
    trigram name index (SQLite >= 3.34 with FTS5; else name search scans)."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    con = connect(db_path)
    con.executescript(SCHEMA)
    try:
        con.execute(FTS)
        fts = "1"
    except sqlite3.OperationalError as exc:
        if not _lacks_fts(exc):
            con.close()
            raise       # e.g. a locked or full database: not a reason to index without FTS
        log.info("no FTS5 trigram index (%s): file-name search scans", exc)
        fts = "0"
    con.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", SCHEMA_VERSION), ("fts", fts)])
    con.close()
    return fts == "1"


def _lacks_fts(exc: sqlite3.OperationalError) -> bool:
    """This SQLite has no FTS5 or no trigram tokenizer (the only reasons to go without)."""
    text = str(exc).lower()
    return "no such module" in text or "tokenizer" in text


def append(con: sqlite3.Connection, fts: bool, tuples: list[tuple], offset: int,
           header: list[str], head: str) -> None:
    """Rows, their label and per-minute counts and the new state, in one transaction."""
    con.execute("BEGIN IMMEDIATE")
    try:
        first_new = con.execute("SELECT coalesce(max(id), 0) FROM rows").fetchone()[0]
        cols = ", ".join(INSERT_COLUMNS)
        con.executemany(f"INSERT INTO rows({cols}) VALUES ({', '.join('?' * len(INSERT_COLUMNS))})",
                        tuples)
        counts: dict[str, int] = {}
        for t in tuples:
            counts[t[3]] = counts.get(t[3], 0) + 1
        if fts:
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
                        [("offset", str(offset)), ("header", json.dumps(header)), ("head", head)])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
