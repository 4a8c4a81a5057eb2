"""The SQLite index of a results CSV: filters, keyset pages, tailing a growing CSV, rebuilds."""
from __future__ import annotations

import sqlite3

import pytest

from tests.web_helpers import make_result, write_outbox
from watcher.web.index import QueryError, Query, ResultsIndex


def _index(tmp_path, csv_name="results.csv"):
    return ResultsIndex(tmp_path / "out" / csv_name, tmp_path / "out" / ".idx.sqlite",
                        min_refresh_s=0)


def _rows(tmp_path, n=30):
    results = []
    for i in range(n):
        if i % 10 == 9:
            results.append(make_result(i, status="error", error="not an image"))
        else:
            results.append(make_result(i, label="uncertain" if i % 5 == 2 else None,
                                       confidence=0.5 + (i % 10) / 20,
                                       processed_at=f"2026-12-0{1 + i // 10}T10:00:{i:02d}.000Z"))
    write_outbox(tmp_path / "out", results)
    return results


def _all(index, query, limit=7):
    """Every row of ``query`` by following cursors, checking no page repeats a row."""
    seen, cursor = [], ""
    while True:
        page = index.query(query, limit=limit, cursor=cursor)
        seen += [r["job_id"] for r in page.rows]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert len(seen) == len(set(seen))
    return seen


def test_filters_and_pages_match_a_plain_scan(tmp_path):
    results = _rows(tmp_path)
    index = _index(tmp_path)
    assert index.refresh() == len(results)
    expect_new = [r.job_id for r in reversed(results)]
    assert _all(index, Query()) == expect_new
    assert _all(index, Query(sort="old")) == expect_new[::-1]
    errors = [r.job_id for r in reversed(results) if r.status == "error"]
    assert _all(index, Query(label="error")) == errors == [f"t1-{i:06d}" for i in (29, 19, 9)]
    unc = [r.job_id for r in reversed(results) if r.label == "uncertain"]
    assert unc and _all(index, Query(label="uncertain")) == unc
    mid = [r.job_id for r in reversed(results) if r.confidence is not None
           and 0.6 <= r.confidence <= 0.8]
    assert _all(index, Query(min_conf=0.6, max_conf=0.8)) == mid
    by_conf = sorted((r for r in results if r.confidence is not None),
                     key=lambda r: (-r.confidence, -int(r.job_id[3:])))
    got = _all(index, Query(sort="conf_desc"), limit=4)
    assert got[:len(by_conf)] == [r.job_id for r in by_conf]
    assert set(got[len(by_conf):]) == set(errors)      # no confidence: last
    asc = _all(index, Query(sort="conf_asc"), limit=4)
    assert asc[len(errors):] == [r.job_id for r in reversed(by_conf)]
    assert _all(index, Query(q="PHOTO001")) == [f"t1-{i:06d}" for i in range(19, 9, -1)]
    day2 = _all(index, Query(since="2026-12-02", until="2026-12-03"), limit=4)
    assert day2 == [f"t1-{i:06d}" for i in range(18, 9, -1)]  # 19 is an error row (no date set)
    assert _all(index, Query(since="2026-12-02", until="2026-12-03", sort="old"), limit=2) == \
        day2[::-1]
    assert index.label_counts() == {"cat": 12, "dog": 9, "error": 3, "uncertain": 6}


def test_get_and_row_contents(tmp_path):
    _rows(tmp_path, 5)
    index = _index(tmp_path)
    index.refresh()
    row = index.get("t1-000003")
    assert row["input_path"] == "photo0003.jpg" and row["label"] == "dog"
    assert row["probs"]["dog"] == pytest.approx(0.65) and row["status"] == "ok"
    assert index.get("nope") is None


def test_like_wildcards_in_the_search_are_literal(tmp_path):
    write_outbox(tmp_path / "out", [make_result(0, name="100%_real.jpg"),
                                     make_result(1, name="100abc.jpg")])
    index = _index(tmp_path)
    index.refresh()
    assert [r["input_path"] for r in index.query(Query(q="0%_")).rows] == ["100%_real.jpg"]


def test_bad_query_values_are_refused_with_a_reason(tmp_path):
    index = _index(tmp_path)
    with pytest.raises(QueryError, match="sort"):
        index.query(Query(sort="random"))
    with pytest.raises(QueryError, match="min_conf"):
        index.query(Query(min_conf=2))
    with pytest.raises(QueryError, match="cursor"):
        index.query(Query(), cursor="abc")


def test_tailing_reads_only_new_records_and_waits_for_a_cut_last_line(tmp_path):
    csv = write_outbox(tmp_path / "out", [make_result(i) for i in range(3)])
    index = _index(tmp_path)
    assert index.refresh() == 3
    assert index.refresh() == 0
    csv.append([make_result(3), make_result(4)])
    assert index.refresh() == 2
    # a writer that crashed (or is writing) mid-record: the partial line waits
    with open(csv.path, "ab") as fh:
        fh.write(b'"half,written.jpg",cat,0.9')
    assert index.refresh() == 0
    assert index.total() == 5
    # the next writer's repair cuts it off and appends whole records: those are read
    csv2 = type(csv)(csv.path, ("cat", "dog"))
    csv2.append([make_result(5, name='quote"comma,new\nline.jpg')])
    assert index.refresh() == 1
    assert index.get("t1-000005")["input_path"] == 'quote"comma,new\nline.jpg'
    assert index.state().offset == csv.path.stat().st_size


def test_a_replaced_csv_or_a_corrupt_index_is_rebuilt(tmp_path):
    csv = write_outbox(tmp_path / "out", [make_result(i) for i in range(4)])
    index = _index(tmp_path)
    index.refresh()
    csv.path.unlink()                                   # replaced by another run's CSV
    write_outbox(tmp_path / "out", [make_result(i, name=f"new{i}.jpg") for i in range(2)])
    assert index.refresh() == 2 and index.total() == 2
    assert index.get("t1-000000")["input_path"] == "new0.jpg"
    index.close()
    db = tmp_path / "out" / ".idx.sqlite"
    db.write_bytes(b"this is not a database" * 100)    # corrupt
    for extra in ("-wal", "-shm"):
        (tmp_path / "out" / f".idx.sqlite{extra}").unlink(missing_ok=True)
    index = _index(tmp_path)
    assert index.refresh() == 2 and index.total() == 2
    db.unlink()                                         # deleted: loses nothing
    for extra in ("-wal", "-shm"):
        (tmp_path / "out" / f".idx.sqlite{extra}").unlink(missing_ok=True)
    index = _index(tmp_path)
    assert index.refresh() == 2
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_missing_csv_is_an_empty_index(tmp_path):
    index = _index(tmp_path)
    assert index.refresh() == 0 and index.query(Query()).rows == []


@pytest.mark.parametrize("text", [
    'a,b\r\n', 'a,b\r\n"x\r\ny",1\r\n', 'a,b\r\n"x\r\n', 'a,"b""\r\n""c"\r\nd', '', 'abc',
    '"q""\r\n', 'h\r\n"é\r\n",1\r\n"z', 'h\r\n"a""b",1\r\n"c\r\n""d""\r\n',
])
def test_record_end_on_bytes_matches_the_engine_rule(text):
    from engine.results import last_complete_record_end
    from watcher.web.index import complete_end

    want = len(text[:last_complete_record_end(text)].encode("utf-8"))
    assert complete_end(text.encode("utf-8")) == want


def test_per_minute_counts_follow_appends(tmp_path):
    rows = [make_result(i, processed_at=f"2026-12-01T10:0{i // 3}:00.000Z") for i in range(6)]
    rows.append(make_result(6, status="error", error="x", processed_at="2026-12-01T10:01:30.000Z"))
    csv = write_outbox(tmp_path / "out", rows)
    index = _index(tmp_path)
    index.refresh()
    assert index.per_minute("2026-12-01T10:00") == [("2026-12-01T10:00", 3, 0),
                                                    ("2026-12-01T10:01", 4, 1)]
    csv.append([make_result(7, processed_at="2026-12-01T10:01:59.000Z")])
    index.refresh()
    assert index.per_minute("2026-12-01T10:01:00") == [("2026-12-01T10:01", 5, 1)]


def _sqlite_has_trigram_fts() -> bool:
    """What this process's SQLite can do. Not its version alone: TensorFlow bundles an SQLite
    without FTS5 (3.50.3 here) that the sqlite3 module binds to when TensorFlow was loaded
    first, as in the full suite."""
    con = sqlite3.connect(":memory:")
    try:
        con.execute("CREATE VIRTUAL TABLE t USING fts5(a, tokenize='trigram')")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


@pytest.mark.parametrize("probe", [1, 2000])   # 1: every term "common" (scan); 2000: by id
def test_name_search_gives_the_same_rows_either_way(tmp_path, monkeypatch, probe):
    import watcher.web.query as index_mod

    names = [f"Ünï {i % 7} Katze-{i}.JPG" if i % 2 else f"dog_{i}.png" for i in range(60)]
    write_outbox(tmp_path / "out", [make_result(i, name=n) for i, n in enumerate(names)])
    index = _index(tmp_path)
    index.refresh()
    assert index._fts == _sqlite_has_trigram_fts()
    monkeypatch.setattr(index_mod, "FTS_PROBE", probe)
    for term in ("katze", "ÜNÏ 3", "g_1", '"', "e-5", "zzz", ".jpg"):
        want = [f"t1-{i:06d}" for i in range(59, -1, -1) if term.lower() in names[i].lower()]
        assert _all(index, Query(q=term), limit=4) == want, term
