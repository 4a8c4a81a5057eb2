"""Web app at scale: page loads over an index of 1,000,000 synthetic rows (run by hand).

    make bench-web                                   # or: python benchmarks/bench_web.py --rows 1000000

Writes a synthetic results CSV (the engine's own writer and columns) into a temp folder,
builds the SQLite index from it (timed), serves it with uvicorn on loopback and times real
HTTP page loads (p50/p95 over repeats) for the first page, filtered pages, a deep page reached
by cursor, a name search and the dashboard; then the tail of 1,000 appended rows, and the
naive way (pandas.read_csv + filter per request) for the same filtered query, as a ratio.
"""
from __future__ import annotations

import argparse
import http.client
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.results import Result, ResultsCsv  # noqa: E402
from watcher.config import WatcherSettings  # noqa: E402
from watcher.web.app import Source, create_app  # noqa: E402
from watcher.web.config import ServeSettings  # noqa: E402
from watcher.web.index import Query  # noqa: E402

CLASSES = ("cat", "dog")


RATE = 20                   # synthetic rows per second of processed_at, ending now


def synthetic(start: int, n: int, rng: random.Random, t0: int) -> list[Result]:
    out = []
    for i in range(start, start + n):
        if rng.random() < 0.02:
            out.append(Result(input_path=f"cam{i % 7}/IMG_{i:07d}.jpg", job_id=f"b-{i:07d}",
                              status="error", error="not a supported image", sha256=f"{i:064x}",
                              processed_at=_ts(t0 + i // RATE)))
            continue
        dog = rng.random()
        conf = max(dog, 1 - dog)
        label = "uncertain" if conf < 0.6 else ("dog" if dog >= 0.5 else "cat")
        name = f"cam{i % 7}/IMG_{i:07d}.jpg"
        stem = f"IMG_{i:07d}.b-{i:07d}"
        out.append(Result(
            input_path=name, job_id=f"b-{i:07d}", label=label, confidence=conf,
            probabilities={"cat": 1 - dog, "dog": dog},
            pictures={k: f"gradcam/{stem}.{k}.jpg" for k in ("gray", "heatmap", "overlay")},
            width=640, height=480, model_version="bench-1", sha256=f"{i:064x}",
            processed_at=_ts(t0 + i // RATE)))
    return out


def _ts(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_get(port: int, path: str) -> float:
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    con.request("GET", path)
    resp = con.getresponse()
    body = resp.read()
    dt = time.perf_counter() - t0
    con.close()
    assert resp.status == 200, (path, resp.status, body[:300])
    return dt


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--naive-repeats", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="pawcam-bench-web-") as tmp:
        outbox = Path(tmp) / "outbox"
        csv = ResultsCsv(outbox / "results.csv", CLASSES)
        first = int(time.time()) - args.rows // RATE
        t0 = time.perf_counter()
        for start in range(0, args.rows, 100_000):
            csv.append(synthetic(start, min(100_000, args.rows - start), rng, first))
        size = csv.path.stat().st_size
        print(f"CSV: {args.rows:,} rows, {size / 1e6:.0f} MB written in "
              f"{time.perf_counter() - t0:.1f} s")

        source = Source.for_outbox(outbox, None, WatcherSettings())
        t0 = time.perf_counter()
        app = create_app(source, ServeSettings(refresh_seconds=0))
        app.state.web.index.refresh(force=True)
        build = time.perf_counter() - t0
        db = outbox / ".pawcam-web.sqlite"
        print(f"index: built in {build:.1f} s ({args.rows / build:,.0f} rows/s), "
              f"{db.stat().st_size / 1e6:.0f} MB")

        import uvicorn

        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        page = app.state.web.index.query(Query(label="dog"), limit=48)
        for _ in range(200):                     # walk 200 pages deep for the cursor case
            page = app.state.web.index.query(Query(label="dog"), limit=48,
                                             cursor=page.next_cursor)
        deep = page.next_cursor
        day = _ts(first + args.rows // RATE // 2)[:10]
        next_day = _ts(first + args.rows // RATE // 2 + 86400)[:10]
        cases = [
            ("results page, no filter", "/"),
            ("results page, label=uncertain + confidence 0.55-0.58",
             "/?label=uncertain&min_conf=0.55&max_conf=0.58"),
            ("results page, label=error", "/?label=error"),
            ("results page, least confident first", "/?sort=conf_asc"),
            ("results page, 200 pages deep (cursor)", f"/?label=dog&cursor={deep}"),
            ("results page, one day", f"/?since={day}&until={next_day}"),
            ("API, label=cat, confidence >= 0.99", "/api/results?label=cat&min_conf=0.99"),
            ("name search, a rare term (trigram index)", f"/?q=IMG_{args.rows // 2:07d}"),
            ("name search, a common term (scan in page order)", "/?q=cam3/"),
            ("detail page", f"/results/b-{args.rows // 3:07d}"),
            ("dashboard (3 h)", "/dashboard"),
        ]
        results = {}
        print(f"\npage loads over real HTTP, {args.repeats} repeats each (p50 / p95):")
        for name, path in cases:
            timed_get(port, path)                # warm
            times = [timed_get(port, path) for _ in range(args.repeats)]
            results[name] = times
            print(f"  {name:<55} {1000 * statistics.median(times):8.1f} ms "
                  f"{1000 * pct(times, 0.95):8.1f} ms")

        csv.append(synthetic(args.rows, 1000, rng, first))
        t0 = time.perf_counter()
        added = app.state.web.index.refresh(force=True)
        print(f"\ntail: {added} appended rows indexed in {1000 * (time.perf_counter() - t0):.1f} ms")
        server.should_exit = True
        thread.join(timeout=10)

        import pandas as pd

        naive = []
        for _ in range(args.naive_repeats):
            t0 = time.perf_counter()
            df = pd.read_csv(csv.path)
            sel = df[(df["label"] == "uncertain") & df["confidence"].between(0.55, 0.58)]
            sel.iloc[::-1].head(48).to_dict("records")
            naive.append(time.perf_counter() - t0)
        filt = statistics.median(results["results page, label=uncertain + confidence 0.55-0.58"])
        print(f"naive (pandas.read_csv + filter per request), same filtered query: "
              f"{1000 * statistics.median(naive):.0f} ms p50 -> the index is "
              f"{statistics.median(naive) / filt:.0f}x faster (page incl. HTML vs bare pandas)")


if __name__ == "__main__":
    main()
