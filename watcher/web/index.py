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

This module is the lifecycle (connections, rebuilds, when to refresh); the parts are
:mod:`watcher.web.store` (tables, schema, appends), :mod:`watcher.web.tail` (reading the new
records of the CSV) and :mod:`watcher.web.query` (filters, sorts, pages).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from watcher.web import store
from watcher.web.query import Page, Query, QueryError, row_dict, select_page
from watcher.web.store import ERROR_LABEL, SCHEMA_VERSION, IndexState
from watcher.web.tail import complete_end, read_new, was_replaced

__all__ = ["ResultsIndex", "Query", "QueryError", "Page", "ERROR_LABEL", "complete_end"]

log = logging.getLogger("pawcam.web")

ANALYZE_AFTER = 5000        # new rows in one refresh that warrant fresh planner statistics


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
        self._fts = store.read_meta(self.con).get("fts") == "1"

    # -- connections ----------------------------------------------------------------------
    @property
    def con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "generation", -1) != self._generation:
            if con is not None:
                con.close()
            con = self._local.con = store.connect(self.db_path)
            self._local.generation = self._generation
        return con

    def _open_checked(self) -> None:
        """Open the index; a corrupt one or one of another schema is deleted and rebuilt."""
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = store.connect(self.db_path)
            version = store.read_meta(con).get("schema")
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
        self._generation += 1
        self._fts = store.create(self.db_path)

    def state(self) -> IndexState:
        return store.read_state(self.con)

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
            if was_replaced(fh, size, st):
                log.info("%s was replaced or cut short; rebuilding the index", self.csv_path)
                self._recreate()
                st = IndexState()
            for tuples, offset, header, head in read_new(fh, size, st.offset, st.header):
                store.append(self.con, self._fts, tuples, offset, header, head)
                added += len(tuples)
        if added >= ANALYZE_AFTER:
            self.con.execute("ANALYZE")   # row statistics: the planner picks scan vs index
        if added:
            log.debug("indexed %d new row(s) of %s", added, self.csv_path)
        return added

    # -- queries --------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        """The newest row of ``job_id`` (ids are unique in pawcam's CSVs)."""
        r = self.con.execute("SELECT * FROM rows WHERE job_id = ? ORDER BY id DESC LIMIT 1",
                             (job_id,)).fetchone()
        return None if r is None else row_dict(r)

    def query(self, query: Query, limit: int = 50, cursor: str = "") -> Page:
        """One page of rows matching ``query``, in its sort order; ``cursor`` from the
        previous page's ``next_cursor`` (keyset pagination: constant cost per page)."""
        return select_page(self.con, self._fts, query, limit, cursor)

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
            yield row_dict(r)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
