"""``pawcam report DIR``: one self-contained HTML file about a results CSV, opened from disk.

    write_report(Path("results"))                      # -> results/report.html
    write_report(Path("results"), embed=True)          # thumbnails inside the file (portable)
    pawcam report results/ --embed
    pawcam predict photos/ --out results/ --report     # written at the end of the run

The summary (counts per label, errors, confidence histogram, throughput over time) covers every
row; the gallery shows up to ``max_items`` rows (errors and uncertain ones first, then the rest
in CSV order) with filtering by label, confidence and name in the page itself (a small inline
script: no server, no network). Pictures are linked relative to the report (``gradcam/...``,
so keep the report beside them) or, with ``embed``, inlined as small JPEG thumbnails.
The CSV is streamed: memory is bounded by ``max_items``, however many rows there are.
Every name is HTML-escaped; the page's data travels in attributes, never as markup.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from engine.charts import LABEL_COLORS, bar_chart, line_chart
from engine.durable import write_atomic
from engine.errors import PawcamError
from engine.results import STATUS_ERROR, UNCERTAIN, unneutralize

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
THUMB_SIDE = 200


@dataclass
class Summary:
    total: int = 0
    labels: Counter = field(default_factory=Counter)
    errors: int = 0
    confidences: list[int] = field(default_factory=lambda: [0] * 20)
    per_minute: Counter = field(default_factory=Counter)
    first: str = ""
    last: str = ""
    models: Counter = field(default_factory=Counter)

    def add(self, row: dict[str, str]) -> None:
        self.total += 1
        label = "error" if row["status"] == STATUS_ERROR else row["label"]
        self.labels[label] += 1
        self.errors += row["status"] == STATUS_ERROR
        if row["confidence"]:
            c = float(row["confidence"])
            self.confidences[min(19, max(0, int(c * 20)))] += 1
        t = row.get("processed_at", "")
        if t:
            self.per_minute[t[:16]] += 1
            self.first = min(self.first, t) if self.first else t
            self.last = max(self.last, t)
        if row.get("model_version"):
            self.models[row["model_version"]] += 1

    @property
    def seconds(self) -> float:
        try:
            a = datetime.fromisoformat(self.first.replace("Z", "+00:00"))
            b = datetime.fromisoformat(self.last.replace("Z", "+00:00"))
        except ValueError:
            return 0.0
        return (b - a).total_seconds()


def _read(csv_path: Path, max_items: int) -> tuple[Summary, list[dict[str, str]]]:
    """Stream the CSV: the summary of all rows, the gallery's picks (bounded)."""
    summary = Summary()
    flagged: list[dict[str, str]] = []     # errors and uncertain first
    rest: list[dict[str, str]] = []
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        need = {"input_path", "label", "confidence", "status", "error", "job_id"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise PawcamError(f"{csv_path} is not a pawcam results CSV (columns "
                              f"{', '.join(sorted(need))} expected)")
        for raw in reader:
            if None in raw or any(v is None for v in raw.values()):
                continue  # a crash-cut last line
            row = {k: unneutralize(v) for k, v in raw.items()}
            summary.add(row)
            if row["status"] == STATUS_ERROR or row["label"] == UNCERTAIN:
                if len(flagged) < max_items:
                    flagged.append(row)
            elif len(rest) < max_items:
                rest.append(row)
    return summary, (flagged + rest)[:max_items]


def _thumb(folder: Path, rel: str) -> str:
    """A data: URI of a small JPEG of ``folder/rel`` ("" if unreadable)."""
    from PIL import Image

    path = folder / rel
    if not rel or ".." in Path(rel).parts or Path(rel).is_absolute() or path.is_symlink():
        return ""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIDE, THUMB_SIDE))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=70)
    except (OSError, ValueError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _src(folder: Path, rel: str, embed: bool) -> str:
    if not rel:
        return ""
    if embed:
        return _thumb(folder, rel)
    if ".." in Path(rel).parts or Path(rel).is_absolute():
        return ""
    return "/".join(_url_part(p) for p in rel.split("/"))


def _url_part(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


def _card(row: dict[str, str], folder: Path, embed: bool) -> str:
    label = "error" if row["status"] == STATUS_ERROR else row["label"]
    conf = row["confidence"]
    pct = "" if not conf else (">99.9%" if float(conf) > 0.999 else f"{float(conf):.1%}")
    src = _src(folder, row.get("overlay_path", ""), embed)
    img = (f'<img src="{escape(src)}" alt="overlay" loading="lazy">' if src
           else f'<div class="noimg">{"failed" if label == "error" else "no picture"}</div>')
    err = (f'<span class="err" title="{escape(row["error"])}">{escape(row["error"])}</span>'
           if row["error"] else "")
    return (f'<article class="card" data-label="{escape(label)}" data-conf="{escape(conf or "")}" '
            f'data-name="{escape(row["input_path"].lower())}">{img}<div class="t">'
            f'<span class="label label-{escape(label)}">{escape(label)}</span> '
            f'<span class="conf">{pct}</span><bdi class="name" title="{escape(row["input_path"])}">'
            f'{escape(row["input_path"])}</bdi>{err}</div></article>')


_CSS = """
body{margin:0;font:15px/1.4 system-ui,sans-serif;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.7rem 1.2rem}main{padding:1rem 1.2rem}
h1{font-size:1.3rem;margin:0}.tiles{display:flex;flex-wrap:wrap;gap:.8rem;margin:.8rem 0}
.tile{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:.5rem .8rem}
.tile b{display:block;font-size:1.2rem}.charts{display:grid;grid-template-columns:
repeat(auto-fill,minmax(420px,1fr));gap:1rem}.chart{width:100%;height:auto;background:#fff;
border:1px solid #dde1e7;border-radius:6px}.chart-title{font-size:13px;font-weight:600}
.chart-axis,.chart-value{font-size:10px;fill:#667}.filters{display:flex;flex-wrap:wrap;
gap:.8rem;margin:1rem 0;align-items:end}.filters label{display:flex;flex-direction:column;
font-size:.8rem;color:#667}.grid{display:grid;grid-template-columns:repeat(auto-fill,
minmax(170px,1fr));gap:.7rem}.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;
overflow:hidden}.card img,.noimg{width:100%;height:150px;object-fit:cover;display:block;
background:#eee}.noimg{display:flex;align-items:center;justify-content:center;color:#c0392b}
.t{padding:.35rem .5rem}.name,.err{display:block;overflow:hidden;text-overflow:ellipsis;
white-space:nowrap;font-size:.85rem}.err{color:#c0392b;font-size:.75rem}.label{color:#fff;
background:#556;border-radius:3px;padding:0 .3rem;font-weight:600}.label-cat{background:#2e86de}
.label-dog{background:#e67e22}.label-uncertain{background:#8e44ad}.label-error{background:#c0392b}
.hidden{display:none}.note{color:#667;font-size:.85rem}
"""

_JS = """
(function(){var l=document.getElementById('f-label'),a=document.getElementById('f-min'),
b=document.getElementById('f-max'),q=document.getElementById('f-q'),
n=document.getElementById('shown'),cards=document.querySelectorAll('.card');
function apply(){var lab=l.value,lo=parseFloat(a.value),hi=parseFloat(b.value),
s=q.value.toLowerCase(),k=0;cards.forEach(function(c){var cf=parseFloat(c.dataset.conf),
ok=(!lab||c.dataset.label===lab)&&(isNaN(lo)||cf>=lo)&&(isNaN(hi)||cf<=hi)&&
(!s||c.dataset.name.indexOf(s)>=0);c.classList.toggle('hidden',!ok);if(ok)k++;});
n.textContent=k;}[l,a,b,q].forEach(function(e){e.addEventListener('input',apply);
e.addEventListener('change',apply);});apply();})();
"""


def render_report(csv_path: Path, *, embed: bool = False, max_items: int = 5000,
                  title: str = "") -> str:
    """The report's HTML for ``csv_path`` (pictures relative to its folder)."""
    folder = csv_path.parent
    summary, picks = _read(csv_path, max_items)
    labels = sorted(summary.labels)
    minutes = sorted(summary.per_minute)
    rate = summary.total / summary.seconds if summary.seconds > 0 else 0.0
    ticks = [(i, m[11:]) for i, m in enumerate(minutes)][::max(1, len(minutes) // 6)]
    charts = [
        bar_chart([(k, summary.labels[k]) for k in labels], title="rows per label",
                  colors=LABEL_COLORS),
        bar_chart([(f"{k / 20:.2f}", c) for k, c in enumerate(summary.confidences)],
                  title="confidence of the predicted class (bins of 0.05)"),
        line_chart([summary.per_minute[m] for m in minutes], ticks,
                   title="rows per minute (processed_at)"),
    ]
    tiles = [("rows", f"{summary.total:,}"), ("errors", f"{summary.errors:,}"),
             *((k, f"{summary.labels[k]:,}") for k in labels if k != "error"),
             ("throughput, first to last row", f"{rate:.1f} files/s" if rate else "—"),
             ("from", summary.first[:19].replace("T", " ") or "—"),
             ("to", summary.last[:19].replace("T", " ") or "—"),
             ("model", ", ".join(summary.models) or "—")]
    options = "".join(f'<option value="{escape(k)}">{escape(k)}</option>' for k in labels)
    title = title or f"pawcam report: {csv_path.name}"
    shown = len(picks)
    parts = [
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{escape(title)}</h1></header><main>",
        '<section class="tiles">',
        *(f'<div class="tile">{escape(k)}<b>{escape(v)}</b></div>' for k, v in tiles),
        "</section>", '<section class="charts">', *charts, "</section>",
        '<form class="filters" onsubmit="return false">',
        f'<label>Label<select id="f-label"><option value="">all</option>{options}</select></label>',
        '<label>Confidence from<input id="f-min" type="number" min="0" max="1" step="0.01"></label>',
        '<label>to<input id="f-max" type="number" min="0" max="1" step="0.01"></label>',
        '<label>Name<input id="f-q" type="search"></label></form>',
        f'<p class="note">Showing <span id="shown">{shown}</span> of {shown:,} gallery items'
        + (f" (the gallery holds {shown:,} of {summary.total:,} rows: errors and uncertain "
           "first)" if shown < summary.total else "") + ".</p>",
        '<section class="grid">', *(_card(r, folder, embed) for r in picks), "</section>",
        f"</main><script>{_JS}</script></body></html>",
    ]
    return "".join(parts)


def write_report(folder: Path, csv_name: str | None = None, *, out: Path | None = None,
                 embed: bool = False, max_items: int = 5000) -> Path:
    """Write ``folder/report.html`` (or ``out``) for the results CSV in ``folder``."""
    folder = Path(folder)
    if csv_name is None:
        found = [n for n in ("predictions.csv", "results.csv") if (folder / n).is_file()]
        if not found:
            raise PawcamError(f"no predictions.csv or results.csv in {folder}; name the file "
                              "with --csv-name")
        csv_name = found[0]
    csv_path = folder / csv_name
    if not csv_path.is_file():
        raise PawcamError(f"{csv_path} not found")
    html = render_report(csv_path, embed=embed, max_items=max_items)
    out = Path(out) if out is not None else folder / REPORT_NAME
    write_atomic(out, html.encode("utf-8"), durable=False)
    log.info("report written to %s", out)
    return out


def register(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "report", parents=[parent], help="write a self-contained HTML report of a results CSV",
        description="Write DIR/report.html: counts per label, errors, confidence histogram, "
                    "throughput, and a gallery filterable in the page. Opens from disk (no "
                    "server). Pictures are linked relative to DIR, or embedded with --embed.",
        epilog="Exit codes: 0 written; 2 no results CSV in DIR.")
    p.add_argument("folder", type=Path, metavar="DIR",
                   help="a `pawcam predict --out` folder or the daemon's outbox")
    p.add_argument("--csv-name", default=None, metavar="NAME",
                   help="results file in DIR (default: predictions.csv, else results.csv)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="where to write (default: DIR/report.html; pictures are linked "
                        "relative to DIR, so use --embed when writing elsewhere)")
    p.add_argument("--embed", action="store_true",
                   help="embed thumbnails in the file (one portable file, larger)")
    p.add_argument("--max-items", type=int, default=5000, metavar="N",
                   help="most gallery items (errors and uncertain first); default 5000")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace, settings: Any) -> int:
    out = write_report(args.folder, args.csv_name, out=args.out, embed=args.embed,
                       max_items=max(1, args.max_items))
    sys.stdout.write(f"{out}\n")
    return 0
