"""The results CSV: plain pandas round trips, formula neutralising, crash repair."""
from __future__ import annotations

import csv
import io
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from engine.errors import PawcamError
from engine.results import Result, ResultsCsv, columns, last_complete_record_end, neutralize
from engine.text import printable, utc_now

CLASSES = ("cat", "dog")
ROOT = Path(__file__).resolve().parents[1]

HOSTILE = [
    "plain.jpg",
    "comma, in name.jpg",
    'double "quoted" name.jpg',
    '"starts with a quote.jpg',
    "new\nline.jpg",
    "windows\r\nline.jpg",
    "carriage\rreturn.jpg",
    "semi;colon\ttab.jpg",
    "Ünïcødé café.jpg",
    "猫と犬.png",
    "emoji 🐱🐶.jpeg",
    os.fsdecode(b"\xff\xfe broken.jpg"),
    "=HYPERLINK(\"http://evil\").jpg",
    "+1 plus.jpg",
    "-rf minus.jpg",
    "@SUM(A1) at.jpg",
    "\tleading tab.jpg",
    "\rleading cr.jpg",
    "  spaces around  .jpg",
    "folder/sub dir/x.jpg",
    "'already quoted.jpg",
    "back\\slash.jpg",
]
DANGEROUS_START = ("=", "+", "-", "@", "\t", "\r")


def _result(name: str, i: int, **changes) -> Result:
    fields = dict(input_path=name, job_id=f"job-{i:04d}", label="dog", confidence=0.75,
                  probabilities={"cat": 0.25, "dog": 0.75},
                  pictures={"gray": f"gradcam/x{i}.gray.jpg", "heatmap": f"gradcam/x{i}.heat.jpg",
                            "overlay": f"gradcam/x{i}.overlay.jpg"},
                  width=640, height=480, model_version="v1", sha256="ab" * 32)
    fields.update(changes)
    return Result(**fields)


def _expected_cell(name: str) -> str:
    text = printable(name)
    return "'" + text if text.startswith(DANGEROUS_START) else text


def test_hostile_names_round_trip_through_plain_pandas(tmp_path):
    path = tmp_path / "results.csv"
    writer = ResultsCsv(path, CLASSES)
    results = [_result(name, i) for i, name in enumerate(HOSTILE)]
    results.append(Result(input_path="=cmd|' /C calc'!A0.jpg", job_id="job-err",
                          status="error", error="-not an image (whatever the extension)"))
    assert writer.append(results[:5]) == 5
    assert writer.append(results[5:]) == len(results) - 5

    frame = pd.read_csv(path)
    assert list(frame.columns) == columns(CLASSES)
    assert len(frame) == len(results)
    for i, name in enumerate(HOSTILE):
        cell = frame["input_path"][i]
        assert cell == _expected_cell(name), (name, cell)
        if not name.startswith("'"):  # a real leading quote is kept as is
            assert cell.startswith("'") == name.startswith(DANGEROUS_START)
    assert frame["input_path"].iloc[-1] == "'=cmd|' /C calc'!A0.jpg"
    assert frame["error"].iloc[-1] == "'-not an image (whatever the extension)"
    assert frame["status"].tolist() == ["ok"] * len(HOSTILE) + ["error"]
    assert frame["prob_dog"][0] == pytest.approx(0.75) and frame["prob_cat"][0] == pytest.approx(0.25)
    assert frame["confidence"][0] == pytest.approx(0.75)
    assert frame["width"][0] == 640 and frame["height"][0] == 480
    assert frame["overlay_path"][3] == "gradcam/x3.overlay.jpg"
    assert pd.isna(frame["confidence"].iloc[-1]) and pd.isna(frame["width"].iloc[-1])

    # undecodable bytes are written as a visible escape, valid UTF-8 throughout
    raw = path.read_bytes()
    raw.decode("utf-8")
    assert frame["input_path"][11] == "\\xff\\xfe broken.jpg"
    # also readable with the csv module and by job_ids()
    assert writer.job_ids() == {r.job_id for r in results}


def test_python_engine_and_csv_module_agree(tmp_path):
    path = tmp_path / "r.csv"
    ResultsCsv(path, CLASSES).append(_result(n, i) for i, n in enumerate(HOSTILE))
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == columns(CLASSES)
    assert [r[0] for r in rows[1:]] == [_expected_cell(n) for n in HOSTILE]
    frame = pd.read_csv(path, engine="python")
    assert len(frame) == len(HOSTILE)


def test_neutralize_only_dangerous_cells():
    for cell in ("=1+1", "+1", "-1", "@x", "\tx", "\rx"):
        assert neutralize(cell) == "'" + cell
    for cell in ("cat", "1-2", "a=b", "", " =x", "'x"):
        assert neutralize(cell) == cell


def test_labels_and_other_text_cells_are_neutralised(tmp_path):
    path = tmp_path / "r.csv"
    ResultsCsv(path, ("=evil", "@other")).append(
        [_result("a.jpg", 0, label="=evil", probabilities={"=evil": 0.9, "@other": 0.1},
                 model_version="+v2", pictures={"overlay": "-x.jpg"})])
    frame = pd.read_csv(path)
    assert frame["label"][0] == "'=evil"
    assert frame["model_version"][0] == "'+v2"
    assert frame["overlay_path"][0] == "'-x.jpg"
    assert frame["prob_=evil"][0] == pytest.approx(0.9)


def test_processed_at_is_utc_iso8601(tmp_path):
    path = tmp_path / "r.csv"
    before = datetime.now(timezone.utc)
    ResultsCsv(path, CLASSES).append([_result("a.jpg", 0), _result("b.jpg", 1)])
    after = datetime.now(timezone.utc)
    frame = pd.read_csv(path)
    for text in frame["processed_at"]:
        assert text.endswith("Z")
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert stamp.utcoffset().total_seconds() == 0
        assert before.replace(microsecond=0) <= stamp <= after
    parsed = pd.to_datetime(frame["processed_at"], utc=True)
    assert str(parsed.dt.tz) == "UTC"
    assert datetime.fromisoformat(utc_now().replace("Z", "+00:00")).tzinfo is not None


def test_job_ids(tmp_path):
    path = tmp_path / "r.csv"
    writer = ResultsCsv(path, CLASSES)
    assert writer.job_ids() == set()
    writer.append([_result("a.jpg", 1), _result("b.jpg", 2, job_id="-dash-id"),
                   _result("c,\n.jpg", 3, job_id="run 7, \"x\""),
                   _result("d.jpg", 4, job_id="'quoted'"), _result("e.jpg", 5, job_id="''=x")])
    expected = {"job-0001", "-dash-id", 'run 7, "x"', "'quoted'", "''=x"}
    assert writer.job_ids() == expected
    assert ResultsCsv(path, CLASSES).job_ids() == expected


def test_empty_append_writes_a_header_only_once(tmp_path):
    path = tmp_path / "r.csv"
    writer = ResultsCsv(path, CLASSES)
    assert writer.append([]) == 0
    assert writer.append([]) == 0
    writer.append([_result("a.jpg", 0)])
    text = path.read_text(encoding="utf-8")
    assert text.count("input_path") == 1
    assert len(pd.read_csv(path)) == 1


def _valid_file(tmp_path, n=3):
    path = tmp_path / "r.csv"
    ResultsCsv(path, CLASSES).append(_result(f"ok {i}.jpg", i) for i in range(n))
    return path


@pytest.mark.parametrize("garbage", [
    b"partial.jpg,dog,0.9",                          # no terminator
    b'"new\nline in a quoted field, never closed',     # mid-quoted field
    b'"quoted ""twice"" then cut',                    # doubled quotes then cut
    b"half a terminator\r",
    "caf\u00e9 \U0001F431".encode("utf-8")[:-2],      # cut inside a UTF-8 sequence
])
def test_partial_last_record_is_cut_and_next_append_is_valid(tmp_path, garbage):
    path = _valid_file(tmp_path)
    good = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(garbage)
    writer = ResultsCsv(path, CLASSES)
    assert path.read_bytes() == good
    writer.append([_result("after repair.jpg", 99)])
    frame = pd.read_csv(path)
    assert frame["input_path"].tolist() == ["ok 0.jpg", "ok 1.jpg", "ok 2.jpg",
                                            "after repair.jpg"]


def test_truncating_anywhere_keeps_only_whole_records(tmp_path):
    path = tmp_path / "r.csv"
    names = ['a "quoted", name\r\nwith lines.jpg', "plain.jpg", "猫.jpg", "=x.jpg"]
    ResultsCsv(path, CLASSES).append(_result(n, i) for i, n in enumerate(names))
    full = path.read_bytes()
    header_len = full.index(b"\r\n") + 2
    # record ends (byte offsets) from the csv module's own reading
    ends = [header_len]
    for i in range(1, len(names) + 1):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(columns(CLASSES))
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        for row in rows[1:i + 1]:
            w.writerow(row)
        ends.append(len(buf.getvalue().encode("utf-8")))
    assert ends[-1] == len(full)
    for cut in range(header_len, len(full), 7):
        path.write_bytes(full[:cut])
        ResultsCsv(path, CLASSES)
        kept = path.read_bytes()
        expected_end = max(e for e in ends if e <= cut)
        assert kept == full[:expected_end], cut
        if len(kept) > header_len:
            assert len(pd.read_csv(path)) == ends.index(expected_end)


def test_partial_header_is_cut_to_an_empty_file(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b"input_path,label,conf")
    writer = ResultsCsv(path, CLASSES)
    assert path.read_bytes() == b""
    writer.append([_result("a.jpg", 0)])
    assert pd.read_csv(path)["input_path"].tolist() == ["a.jpg"]


def test_last_complete_record_end():
    assert last_complete_record_end("") == 0
    assert last_complete_record_end("a,b\r\n") == 5
    assert last_complete_record_end('a,"b\r\n') == 0
    assert last_complete_record_end('a,"b\r\nc"\r\nd') == 10
    assert last_complete_record_end('a,"b""\r\n""c"\r\nd') == 14
    assert last_complete_record_end("a\nb") == 0


def test_other_model_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "r.csv"
    ResultsCsv(path, ("cat", "dog")).append([_result("a.jpg", 0)])
    before = path.read_bytes()
    with pytest.raises(PawcamError) as info:
        ResultsCsv(path, ("cat", "dog", "fox"))
    message = str(info.value)
    assert str(path) in message and "columns" in message
    assert path.read_bytes() == before
    other = tmp_path / "other.csv"
    other.write_text("some,random,table\r\n1,2,3\r\n", encoding="utf-8")
    with pytest.raises(PawcamError):
        ResultsCsv(other, CLASSES)


def test_file_is_created_with_its_folder(tmp_path):
    path = tmp_path / "deep" / "er" / "results.csv"
    ResultsCsv(path, CLASSES).append([_result("a.jpg", 0)])
    assert pd.read_csv(path).shape == (1, len(columns(CLASSES)))


def test_printable_escapes_undecodable_bytes():
    assert printable(os.fsdecode(b"\xff.jpg")) == "\\xff.jpg"
    assert printable("café.jpg") == "café.jpg"
    assert printable("\ud800x.jpg") == "\\ud800x.jpg"  # lone surrogate: escaped, no crash


def test_lone_surrogate_name_does_not_lose_the_batch(tmp_path):
    path = tmp_path / "r.csv"
    ResultsCsv(path, CLASSES).append([_result("\ud83dbad.jpg", 0), _result("good.jpg", 1)])
    assert pd.read_csv(path)["input_path"].tolist() == ["\\ud83dbad.jpg", "good.jpg"]


def test_a_failed_append_leaves_no_half_record_behind(tmp_path):
    """A write that fails halfway (here: the file-size limit, as with a full disk) is rolled
    back, so the same writer's next append does not follow half a record."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "r.csv"
    ResultsCsv(path, CLASSES).append([_result("ok.jpg", 0)])
    limit = path.stat().st_size + 300
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from engine.results import Result, ResultsCsv
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        writer = ResultsCsv({str(path)!r}, ("cat", "dog"))
        rows = [Result(input_path="big%03d.jpg" % i, job_id="big-%d" % i, label="cat",
                       confidence=0.9) for i in range(50)]
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
        try:
            writer.append(rows)
            sys.exit("the oversized append did not fail")
        except OSError as exc:
            print("failed as expected:", exc.errno)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        writer.append([Result(input_path="after.jpg", job_id="after", label="dog",
                              confidence=0.8)])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and "failed as expected" in run.stdout, run.stderr
    df = pd.read_csv(path)
    assert list(df["job_id"]) == ["job-0000", "after"]


def test_reopening_a_complete_file_keeps_it_byte_for_byte(tmp_path):
    path = tmp_path / "r.csv"
    ResultsCsv(path, CLASSES).append([_result('a,"b"\nc.jpg', 0), _result("d.jpg", 1)])
    before = path.read_bytes()
    ResultsCsv(path, CLASSES)
    assert path.read_bytes() == before
