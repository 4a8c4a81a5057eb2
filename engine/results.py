"""One result per input, and the CSV they are appended to.

    writer = ResultsCsv(out_dir / "predictions.csv", class_names=("cat", "dog"))
    writer.append(results)          # whole records, one write, flushed and fsync'ed
    writer.job_ids()                # ids already recorded (exactly-once bookkeeping)

The file opens with plain ``pandas.read_csv(path)``: UTF-8, a header, RFC 4180 quoting (any
file name is safe: commas, quotes, newlines, non-ASCII). Text cells that a spreadsheet would run
as a formula (starting with ``= + - @``, tab or carriage return) get a leading ``'``.
A crash can at worst leave a partial last record; opening the file again cuts it off.

``input_path``: one name, everywhere, for how an input is shown (the path as given on the
command line, inbox-relative in the daemon, folder-relative in evaluate): ``Result.input_path``,
``engine.classifier.Job.input_path`` and the daemon's ``watcher.spool.Item.input_path``. It is
the CSV column users already read and script against, and that column's name cannot change, so
the code takes the users' word rather than a second one (it was also ``display_path`` and
``rel``); grepping for the column finds every place the value passes through.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from engine.text import printable, utc_now

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_ERROR = "error"
UNCERTAIN = "uncertain"
PICTURE_KINDS = ("gray", "heatmap", "overlay")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_TERMINATOR = "\r\n"


@dataclass
class Result:
    """What pawcam concluded about one input file: one CSV row."""

    input_path: str
    job_id: str
    status: str = STATUS_OK
    label: str = ""
    confidence: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    pictures: dict[str, str] = field(default_factory=dict)  # kind -> path
    width: int | None = None
    height: int | None = None
    error: str = ""
    model_version: str = ""
    sha256: str = ""
    processed_at: str = field(default_factory=lambda: utc_now())

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


def neutralize(cell: str) -> str:
    """Defuse spreadsheet formula injection: ``=cmd|' /C calc'!A0`` -> ``'=cmd|' /C calc'!A0``."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def unneutralize(cell: str) -> str:
    """Undo :func:`neutralize`: drop the one ``'`` it added (a cell's own quotes are kept)."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_START) else cell


def columns(class_names: Sequence[str]) -> list[str]:
    return ["input_path", "label", "confidence",
            *(f"prob_{name}" for name in class_names),
            *(f"{kind}_path" for kind in PICTURE_KINDS),
            "width", "height", "status", "error", "model_version", "processed_at", "sha256",
            "job_id"]


def _fmt(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def to_row(result: Result, class_names: Sequence[str]) -> list[str]:
    text = lambda s: neutralize(printable(s))  # noqa: E731 - tiny local helper
    return [
        text(result.input_path), text(result.label), _fmt(result.confidence),
        *(_fmt(result.probabilities.get(name)) for name in class_names),
        *(text(result.pictures.get(kind, "")) for kind in PICTURE_KINDS),
        _fmt(result.width), _fmt(result.height), result.status, text(result.error),
        text(result.model_version), result.processed_at, result.sha256, text(result.job_id),
    ]


def last_complete_record_end(text: str) -> int:
    """Offset just past the last record terminator that is outside quotes (0 if none)."""
    in_quotes = False
    end = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            in_quotes = not in_quotes
        elif not in_quotes and ch == "\r" and text.startswith(_TERMINATOR, i):
            end = i + 2
            i += 1
        i += 1
    return end


class ResultsCsv:
    """Append-only results CSV with whole-record, durable appends."""

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self.path = Path(path)
        self.class_names = tuple(class_names)
        self.header = columns(self.class_names)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        """Cut a partial last record left by a crash; check the header matches this model."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        raw = self.path.read_bytes()
        if raw.endswith(b"\r\n") and raw.count(b'"') % 2 == 0:
            # Fast path (the usual case): quotes balanced and a terminator at the end means the
            # last record is complete; only the header needs checking.
            self._check_header(raw[:raw.index(b"\r\n") + 2].decode("utf-8", "surrogateescape"))
            return
        text = raw.decode("utf-8", "surrogateescape")
        end = last_complete_record_end(text)
        if end != len(text):
            keep = len(text[:end].encode("utf-8", "surrogateescape"))
            log.warning("%s: cutting off %d bytes of a partial last record (crash?)",
                        self.path, len(raw) - keep)
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
                fh.flush()
                os.fsync(fh.fileno())
            text = text[:end]
        self._check_header(text)

    def _check_header(self, text: str) -> None:
        if text:
            first = next(csv.reader(io.StringIO(text, newline="")), None)
            if first != self.header:
                from engine.errors import PawcamError

                raise PawcamError(
                    f"{self.path} has other columns than this model writes (a different model's "
                    "classes?); move it aside or choose another output folder")

    def append(self, results: Iterable[Result]) -> int:
        """Append whole records in a single write, then flush and fsync. Returns the count."""
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator=_TERMINATOR, quoting=csv.QUOTE_MINIMAL)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        if new_file:
            w.writerow(self.header)
        count = 0
        for result in results:
            w.writerow(to_row(result, self.class_names))
            count += 1
        if count == 0 and not new_file:
            return 0
        data = buf.getvalue().encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                     0o644)
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            # A short write (disk full, signal) must not leave half a record for the next
            # append to follow: roll the file back to where this append began.
            try:
                os.ftruncate(fd, start)
                os.fsync(fd)
            except OSError:  # the repair on next open still cuts a partial *last* record
                log.error("%s: could not roll back a failed append", self.path)
            raise
        finally:
            os.close(fd)
        return count

    def columns(self, *names: str) -> Iterator[tuple[str, ...]]:
        """Stream the recorded rows' ``names`` columns, as stored (formula guard kept; see
        :func:`unneutralize`); rows too short to hold them are skipped."""
        if not self.path.exists():
            return
        with open(self.path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                return
            at = [header.index(k) for k in names]
            last = max(at)
            for row in reader:
                if len(row) > last:
                    yield tuple(row[i] for i in at)

    def outcomes(self, wanted: set[str] | None = None) -> dict[str, tuple[str, str]]:
        """``job_id -> (status, error)`` for the rows already recorded (only ``wanted`` ids,
        when given): what exactly-once bookkeeping needs to know about past work."""
        found: dict[str, tuple[str, str]] = {}
        if wanted is not None and not wanted:
            return found
        for job_id, status, error in self.columns("job_id", "status", "error"):
            job = unneutralize(job_id)
            if wanted is None or job in wanted:
                found[job] = (status, unneutralize(error))
        return found

    def job_ids(self) -> set[str]:
        """Every job_id already in the file."""
        return set(self.outcomes())
