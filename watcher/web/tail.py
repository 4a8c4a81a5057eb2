"""Reading a results CSV from where the index stopped: whole records only, as row tuples.

    if was_replaced(fh, size, state):            # another file, or cut short: start over
        ...
    for tuples, offset, header, head in read_new(fh, size, state.offset, state.header):
        store.append(con, fts, tuples, offset, header, head)

A partial last record (a crash cut it, or it is being written) is not read: it waits for its
end. The CSV is parsed by its header's column names (engine.results.columns), so an older
CSV with fewer columns still indexes.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from typing import BinaryIO, Iterator

from engine.results import PICTURE_KINDS, STATUS_ERROR, unneutralize
from watcher.web.store import ERROR_LABEL, IndexState

HEAD_BYTES = 4096           # fingerprint of the CSV's start: a replaced file is noticed
CHUNK_BYTES = 8 << 20       # CSV bytes parsed per transaction while catching up


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
    """CSV record -> index tuple (:data:`watcher.web.store.INSERT_COLUMNS`), by the header's
    column names (engine.results.columns)."""

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


def complete_end(raw: bytes) -> int:
    """Offset just past the last ``\\r\\n`` outside quotes in ``raw`` (0 if none): the same
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


def fingerprint(fh: BinaryIO, offset: int) -> str:
    """sha256 of the file's first ``min(offset, HEAD_BYTES)`` bytes."""
    fh.seek(0)
    return hashlib.sha256(fh.read(min(offset, HEAD_BYTES))).hexdigest()


def was_replaced(fh: BinaryIO, size: int, state: IndexState) -> bool:
    """The CSV shrank below what was indexed, or its start is not the one indexed."""
    return bool(state.offset) and (size < state.offset or fingerprint(fh, state.offset) != state.head)


def read_new(fh: BinaryIO, size: int, offset: int,
             header: list[str]) -> Iterator[tuple[list[tuple], int, list[str], str]]:
    """``(row tuples, offset after them, header, fingerprint)`` for each chunk of whole
    records from ``offset`` to ``size``; the header is read first when ``offset`` is 0."""
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
            return             # a partial last record: wait for its end
        text = raw[:end].decode("utf-8", "surrogateescape")
        records = list(csv.reader(io.StringIO(text, newline="")))
        offset += end
        if not header:
            header = records.pop(0) if records else []
            parser = RowParser(header)
        tuples = [t for t in map(parser, records) if t is not None]
        yield tuples, offset, header, fingerprint(fh, offset)
