"""``pawcam report``: one HTML file, from disk, with escaped names and bounded gallery."""
from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from engine.errors import PawcamError
from engine.report import write_report
from tests.helpers import write_image
from tests.web_helpers import make_result, write_outbox

HOSTILE = ['<script>alert(1)</script>.jpg', 'quo"te\'s&amp.jpg', "\u202egnp.exe.jpg"]


class Page(HTMLParser):
    """Collects tags, attributes and text (what a browser would build)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)

    def cards(self) -> list[dict]:
        return [a for t, a in self.tags if t == "article"]


def _folder(tmp_path) -> tuple[Path, list]:
    out = tmp_path / "results"
    rows = [make_result(i, label="uncertain" if i % 3 == 0 else None, confidence=0.55 + i / 50)
            for i in range(9)]
    rows += [make_result(20 + k, name=n) for k, n in enumerate(HOSTILE)]
    rows.append(make_result(40, name="bad.jpg", status="error", error="<img src=x> not an image"))
    write_outbox(out, rows, pictures=True, csv_name="predictions.csv")
    return out, rows


def test_report_summarises_every_row_and_links_pictures_relatively(tmp_path):
    out, rows = _folder(tmp_path)
    path = write_report(out)
    assert path == out / "report.html"
    html = path.read_text(encoding="utf-8")
    page = Page(html)
    cards = page.cards()
    assert len(cards) == len(rows)
    assert cards[0]["data-label"] in ("uncertain", "error")        # flagged rows first
    assert {c["data-label"] for c in cards} == {"cat", "dog", "uncertain", "error"}
    names = {c["data-name"] for c in cards}
    assert {n.lower() for n in HOSTILE} <= names                    # attribute values, as text
    assert "<script>alert(1)" not in html and "<img src=x>" not in html
    assert len(page.scripts) == 1 and "alert" not in page.scripts[0]
    srcs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(srcs) == len(rows) - 1                              # the error row has none
    for src in srcs:
        assert not src.startswith(("/", "http", "data:"))
        from urllib.parse import unquote
        assert (out / unquote(src)).is_file(), src
    text = " ".join(page.text)
    assert re.search(r"rows\s*13\b", text) and re.search(r"errors\s*1\b", text)
    assert "<svg" in html and "confidence of the predicted class" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_embedded_thumbnails_make_one_portable_file(tmp_path):
    out, rows = _folder(tmp_path)
    path = write_report(out, out=tmp_path / "elsewhere.html", embed=True)
    page = Page(path.read_text(encoding="utf-8"))
    srcs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(srcs) == len(rows) - 1 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)


def test_gallery_is_bounded_and_a_cut_last_line_is_skipped(tmp_path):
    out, rows = _folder(tmp_path)
    with open(out / "predictions.csv", "ab") as fh:
        fh.write(b'"cut.jpg",cat,0.9')
    page = Page(write_report(out, max_items=4).read_text(encoding="utf-8"))
    assert len(page.cards()) == 4
    assert all(c["data-label"] in ("uncertain", "error") for c in page.cards())
    assert "cut.jpg" not in {c["data-name"] for c in page.cards()}
    assert "4 of 13 rows" in " ".join(page.text)


def test_no_csv_is_a_clear_error(tmp_path):
    with pytest.raises(PawcamError, match="predictions.csv"):
        write_report(tmp_path)
    (tmp_path / "predictions.csv").write_text("a,b\n1,2\n")
    with pytest.raises(PawcamError, match="not a pawcam results CSV"):
        write_report(tmp_path)


def test_predict_report_writes_it_at_the_end(tmp_path, tiny_model_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\npath = "{tiny_model_path}"\n[gradcam]\nmax_side = 64\n',
                   encoding="utf-8")
    for i in range(3):
        write_image(tmp_path / "in" / f"p{i}.jpg", seed=i)
    r = subprocess.run([sys.executable, "-m", "engine.cli", "--config", str(cfg), "predict",
                        "in", "--out", "out", "--report"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    page = Page((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    assert sorted(c["data-name"] for c in page.cards()) == ["in/p0.jpg", "in/p1.jpg", "in/p2.jpg"]
    r = subprocess.run([sys.executable, "-m", "engine.cli", "report", "out", "--embed"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("report.html"), r.stderr
