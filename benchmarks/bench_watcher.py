"""Inbox daemon latency and throughput, against the bulk run on the same files (run by hand).

    .venv/bin/python benchmarks/bench_watcher.py                 # 20 single drops, 3 x 1000 burst
    .venv/bin/python benchmarks/bench_watcher.py --singles 10 --burst 200 --rounds 1 --copy

Starts a real ``pawcam watch`` process on a temporary inbox/outbox and measures
  (0) start-up: from the process start to the status file saying ``running`` (inbox watched),
      and the daemon's resident memory (RSS) once idle;
  (1) lone photos: a file written beside the inbox, then renamed into it (as ``mv`` or a
      finished download does), to its row in results.csv (p50, p95), one at a time, the daemon
      idle in between; target p50 <= 150 ms, p95 <= 300 ms (natural batching: a photo that
      finds the model free goes at once; ``max_wait_ms`` only applies while it is busy);
  (2) bursts: N files renamed into the inbox at once (as ``mv`` or a finished download does),
      from the first rename to the last row, against the bulk runner (``engine.bulk.run_bulk``,
      what ``pawcam predict`` runs; model loaded, warmed up) on the same files right before;
      interleaved rounds, because load from other processes drifts; target >= 0.9x bulk;
  (3) with --copy, a burst copied into the inbox (the copying competes for the same cores).
Images: ../shared/dataset/test when present, else synthetic 500x375 JPEGs. Model:
models/cat_dog_model.keras when present, else a MobileNetV2 1.0/224 with the same head
(ImageNet weights from ../shared when present). Grad-CAM pictures on (all three), as configured
by default.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_engine import model_path, pick_images  # noqa: E402


def rows_by_path(csv_path: Path) -> dict[str, dict[str, str]]:
    try:
        text = csv_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return {r["input_path"]: r for r in csv.DictReader(io.StringIO(text, newline=""))}


class CsvTail:
    """New rows of the results CSV, reading only what was appended (a cheap poll, so the
    benchmark does not steal CPU from the daemon it measures). Bench file names are plain."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def new_paths(self) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self.partial + chunk
        lines = data.split(b"\r\n")
        self.partial = lines.pop()
        return [next(csv.reader([line.decode("utf-8")]))[0] for line in lines
                if line and not line.startswith(b"input_path,")]


def write_config(tmp: Path, model: Path, max_wait_ms: int, settle_ms: int,
                 runtime: str = "auto") -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text("\n".join([
        "[model]", f"path = {json.dumps(str(model))}",
        "[inference]", f"runtime = {json.dumps(runtime)}",
        "[paths]", f"inbox = {json.dumps(str(tmp / 'inbox'))}",
        f"outbox = {json.dumps(str(tmp / 'outbox'))}",
        "[watcher]", f"max_wait_ms = {max_wait_ms}", f"settle_ms = {settle_ms}",
    ]) + "\n", encoding="utf-8")
    (tmp / "inbox").mkdir()
    return cfg


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default): a load-independent figure."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_daemon(cfg: Path) -> tuple[subprocess.Popen, float]:
    log = open(cfg.parent / "daemon.log", "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "--config", str(cfg), "watch"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    status = cfg.parent / "outbox" / "status.json"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited: see {cfg.parent / 'daemon.log'}")
        try:
            if json.loads(status.read_text())["state"] == "running":
                return proc, time.perf_counter() - t0
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)


def single_drops(inbox: Path, csv_path: Path, images: list[Path], n: int) -> list[float]:
    """Lone photos renamed into the idle daemon's inbox: seconds from the rename to the row."""
    latencies = []
    tail = CsvTail(csv_path)
    stage = inbox.parent / "stage-singles"
    stage.mkdir(exist_ok=True)
    for i in range(n):
        name = f"single{i:03d}.jpg"
        shutil.copyfile(images[i % len(images)], stage / name)
        time.sleep(0.3)                  # the daemon is idle again
        t0 = time.perf_counter()
        os.rename(stage / name, inbox / name)
        while name not in tail.new_paths():
            time.sleep(0.002)
        latencies.append(time.perf_counter() - t0)
    return latencies


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def burst(inbox: Path, csv_path: Path, images: list[Path], mode: str, tag: str) -> float:
    """Drop all ``images`` at once; files/s from the first drop to the last row.

    ``move``: copies staged beside the inbox (same file system) are renamed in, as ``mv`` or a
    finished download does: the figure is the daemon's own. ``copy``: ``shutil.copyfile`` into
    the inbox, so the copying competes for the same 2 cores.
    """
    folder = f"burst-{tag}"
    stage = inbox.parent / f"stage-{tag}"
    stage.mkdir()
    (inbox / folder).mkdir()
    if mode == "move":
        for p in images:
            shutil.copyfile(p, stage / p.name)
    time.sleep(1.0)
    want = {f"{folder}/{p.name}" for p in images}
    tail = CsvTail(csv_path)
    t0 = time.perf_counter()
    for p in images:
        if mode == "move":
            os.rename(stage / p.name, inbox / folder / p.name)
        else:
            shutil.copyfile(p, inbox / folder / p.name)
    dropped = time.perf_counter() - t0
    left = set(want)
    while left:
        left.difference_update(tail.new_paths())
        if left:
            time.sleep(0.1)
    seconds = time.perf_counter() - t0
    rows = rows_by_path(csv_path)
    assert want <= set(rows) and all(rows[w]["status"] == "ok" for w in want)
    print(f"    ({mode}: dropping the {len(images)} files took {dropped:.2f} s)")
    return len(images) / seconds


def bulk(clf, settings, paths: list[Path], out: Path) -> float:
    from engine.bulk import run_bulk

    summary = run_bulk(paths, out, settings, classifier=clf, show_progress=False)
    assert summary.errors == 0, summary.lines()
    return summary.rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--singles", type=int, default=20)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--max-wait-ms", type=int, default=500)
    ap.add_argument("--settle-ms", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved bulk/daemon rounds")
    ap.add_argument("--copy", action="store_true", help="also a burst copied into the inbox")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--runtime", default="auto", choices=("auto", "onnxruntime", "tensorflow"),
                    help="[inference] runtime of the daemon and the bulk runs (default: auto)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pawcam-bench-watch-"))
    try:
        images = pick_images(args.burst, tmp)
        model = model_path(tmp)
        cfg = write_config(tmp, model, args.max_wait_ms, args.settle_ms, args.runtime)
        inbox, csv_path = tmp / "inbox", tmp / "outbox" / "results.csv"
        print(f"CPU cores: {os.cpu_count()}; runtime {args.runtime}; max_wait_ms "
              f"{args.max_wait_ms}; settle_ms {args.settle_ms}; batch: [inference] batch_size")

        proc, start_s = start_daemon(cfg)
        time.sleep(1.0)
        print(f"(0) daemon start-up to watching (import, model load, warm-up, first scan): "
              f"{start_s:.2f} s (target <= 2 s); RSS idle {rss_mib(proc.pid):.0f} MiB "
              "(target <= 500 MiB)")
        lat = single_drops(inbox, csv_path, images, args.singles)
        qs = statistics.quantiles(lat, n=20) if len(lat) >= 2 else lat * 19
        p50, p95 = statistics.median(lat), qs[18]
        print(f"(1) lone photo, renamed into the idle inbox -> its CSV row, {len(lat)} photos: "
              f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms "
              "(target p50 <= 150 ms, p95 <= 300 ms)")
        print("    each, sorted (ms): " + " ".join(f"{x * 1000:.0f}" for x in sorted(lat)))
        from engine.classifier import Classifier
        from engine.config import load_settings

        settings = load_settings(cfg)
        clf = Classifier.from_settings(settings)   # the bulk runner's model, loaded once like the daemon's
        bulk(clf, settings, sorted((tmp / "images").iterdir())[:64], tmp / "bulk-warm")
        # interleaved rounds: the machine's load drifts, so each daemon burst is compared with
        # a bulk run right before it
        pairs = []
        n = len(images)
        for r in range(args.rounds):
            c0 = cpu_seconds()
            rb = bulk(clf, settings, [tmp / "images"], tmp / f"bulk{r}")
            cb = (cpu_seconds() - c0) / n * 1000
            c0 = cpu_seconds(proc.pid)
            rw = burst(inbox, csv_path, images, "move", f"move{r}")
            cw = (cpu_seconds(proc.pid) - c0) / n * 1000
            pairs.append((rw, rb))
            print(f"(2) round {r + 1}: bulk {rb:.1f} files/s ({cb:.0f} CPU-ms/file); daemon, {n} "
                  f"files moved into the inbox at once: {rw:.1f} files/s ({cw:.0f} CPU-ms/file); "
                  f"ratio {rw / rb:.2f}")
        if args.copy:
            rb = bulk(clf, settings, [tmp / "images"], tmp / "bulk-c")
            rw = burst(inbox, csv_path, images, "copy", "copy")
            print(f"(3) bulk {rb:.1f} files/s; daemon, {len(images)} files copied into the inbox "
                  f"(copying competes for the cores): {rw:.1f} files/s; ratio {rw / rb:.2f}")
        rss_end = rss_mib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        t0 = time.perf_counter()
        rc = proc.wait(timeout=30)
        print(f"SIGTERM -> exit {rc} in {time.perf_counter() - t0:.2f} s")
        ratios = sorted(w / b for w, b in pairs)
        print(f"daemon burst / bulk (move), median of {len(ratios)} rounds: "
              f"{statistics.median(ratios):.2f}  (target >= 0.90)")
        print(f"lone photo p50 {p50 * 1000:.0f} ms / p95 {p95 * 1000:.0f} ms vs targets 150 / "
              f"300 ms: {'met' if p50 <= 0.15 and p95 <= 0.3 else 'MISSED'}; start-up "
              f"{start_s:.2f} s vs 2 s: {'met' if start_s <= 2 else 'MISSED'}; "
              f"RSS after the bursts {rss_end:.0f} MiB")
        print(f"load average at the end: {os.getloadavg()[0]:.2f} (other processes skew these "
              "figures on a shared machine)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
