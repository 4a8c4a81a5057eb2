"""Chaos soak of the inbox daemon (run by hand: ``make soak``; not in CI).

    .venv/bin/python benchmarks/soak_watcher.py                  # 20,000 photos
    .venv/bin/python benchmarks/soak_watcher.py --photos 2000 --seed 3

Photos are dropped into a real ``pawcam watch`` process in bursts (renamed in from a staging
folder on the same file system) while, at random, the script SIGKILLs the daemon (and starts it
again), fills the outbox's file system and frees it again (a tmpfs mounted for the run when the
script may mount; skipped otherwise, with a note), removes and re-creates the inbox, and sends
SIGHUP. At the end a ``--once`` pass takes what is left, and the script checks: exactly one row
per photo (a photo that was still unclaimed in an inbox the script removed may have none: it
was deleted, like a user's ``rm -rf``), no photo in two rows, nothing left in the inbox or the
processing area, every daemon's peak RSS. Images: ../shared/dataset/test when present, else
synthetic JPEGs; model: the shipped one.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_engine import pick_images  # noqa: E402


def rows(outbox: Path) -> list[dict[str, str]]:
    try:
        text = (outbox / "results.csv").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return list(csv.DictReader(io.StringIO(text, newline="")))


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def claimed_names(inbox: Path) -> set[str]:
    """Inbox-relative names in the processing area's manifests."""
    found: set[str] = set()
    try:
        for entry in os.scandir(inbox / ".pawcam-processing"):
            if entry.name.startswith("batch-") and entry.name.endswith(".json"):
                try:
                    found |= {e["rel"] for e in json.loads(Path(entry.path).read_text())["entries"]}
                except (OSError, ValueError, KeyError):
                    pass
    except OSError:
        pass
    return found


def try_mount(folder: Path, size_mb: int) -> bool:
    folder.mkdir()
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    except OSError:
        return False
    return out.returncode == 0


class Daemon:
    def __init__(self, cfg: Path, log: Path, outbox: Path) -> None:
        self.cfg, self.log, self.outbox = cfg, log, outbox
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0.0
        self.starts = 0

    def start(self, *args: str) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "--config", str(self.cfg), "watch", *args],
                stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT))
        self.starts += 1

    def sample(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.peak_rss = max(self.peak_rss, rss_mib(self.proc.pid))
        elif self.proc is not None and self.proc.returncode not in (0, -9):
            raise SystemExit(f"daemon exited with {self.proc.returncode}: see {self.log}")

    def ready(self) -> bool:
        """The status file says this process is watching (what systemd's READY=1 says)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            status = json.loads((self.outbox / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return status.get("pid") == self.proc.pid and status.get("state") in ("running",
                                                                              "degraded")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--outbox-mb", type=int, default=512, help="size of the outbox tmpfs")
    ap.add_argument("--chaos-every", type=float, default=8.0, help="mean seconds between faults")
    ap.add_argument("--rate", type=float, default=15.0, help="photos dropped per second")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="pawcam-soak-"))
    volume = tmp / "volume"
    mounted = try_mount(volume, args.outbox_mb)
    inbox, outbox, staging = tmp / "inbox", volume / "outbox", tmp / "staging"
    inbox.mkdir()
    staging.mkdir()
    cfg = tmp / "config.toml"
    cfg.write_text("\n".join([
        "[model]", f"path = {json.dumps(str(ROOT / 'models' / 'cat_dog_model.keras'))}",
        "[paths]", f"inbox = {json.dumps(str(inbox))}", f"outbox = {json.dumps(str(outbox))}",
        "[gradcam]", "max_side = 128", 'outputs = ["overlay"]',
        "[watcher]", "on_success = \"delete\"", "rescan_seconds = 5.0", "min_free_mb = 4",
    ]) + "\n", encoding="utf-8")
    where = (f"on a {args.outbox_mb} MB tmpfs" if mounted
             else "on the disk (cannot mount here: no fill/free faults)")
    print(f"soak in {tmp}; outbox {where}")
    sources = pick_images(min(args.photos, 500), tmp)
    names = [f"s{i:06d}.jpg" for i in range(args.photos)]
    deleted: set[str] = set()
    counts = Counter()
    daemon = Daemon(cfg, tmp / "daemon.log", outbox)
    daemon.start()
    t0 = time.monotonic()
    next_chaos = time.monotonic() + rng.expovariate(1 / args.chaos_every)
    filler: Path | None = None
    dropped = 0
    deadline = time.monotonic() + len(names) / 5 + 600
    try:
        while time.monotonic() < deadline:
            daemon.sample()
            due = int((time.monotonic() - t0) * args.rate)      # photos that should be in
            if dropped < min(due, len(names)):
                n = min(rng.choice((1, 5, 20, 50, 150, 300)), len(names) - dropped)
                for i, name in enumerate(names[dropped:dropped + n], start=dropped):
                    shutil.copyfile(sources[i % len(sources)], staging / name)
                for name in names[dropped:dropped + n]:
                    try:
                        os.rename(staging / name, inbox / name)
                    except FileNotFoundError:          # the inbox is being re-created
                        inbox.mkdir(exist_ok=True)
                        os.rename(staging / name, inbox / name)
                dropped += n
            elif dropped == len(names) and filler is None:
                left = [e for e in os.scandir(inbox) if e.is_file()]
                if not left and len(set(r["input_path"] for r in rows(outbox)) | deleted) \
                        >= len(names):
                    break                                  # everything is in: stop the chaos
            if time.monotonic() >= next_chaos:
                next_chaos = time.monotonic() + rng.expovariate(1 / args.chaos_every)
                action = rng.choice(("kill", "fill", "inbox", "hup"))
                if filler is not None:
                    filler.unlink()
                    filler = None
                    counts["free"] += 1
                elif action == "kill":
                    daemon.kill()
                    daemon.start()
                    counts["kill"] += 1
                elif action == "fill" and mounted:
                    st = os.statvfs(volume)
                    filler = volume / "filler.bin"
                    try:
                        with open(filler, "wb") as fh:
                            fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 512 * 1024))
                    except OSError:          # the daemon wrote meanwhile: full is the point
                        pass
                    counts["fill"] += 1
                elif action == "inbox":
                    # what a user's rm -rf deletes: unclaimed photos, and claimed ones (their
                    # batch in memory still gets rows, unless the daemon is killed before)
                    deleted |= {e.name for e in os.scandir(inbox) if e.is_file()}
                    deleted |= claimed_names(inbox)
                    shutil.rmtree(inbox, ignore_errors=True)
                    inbox.mkdir(exist_ok=True)
                    counts["inbox"] += 1
                elif action == "hup" and daemon.ready():   # as systemd: only once READY
                    daemon.proc.send_signal(signal.SIGHUP)
                    counts["hup"] += 1
            time.sleep(rng.uniform(0.05, 0.5))
        if filler is not None:
            filler.unlink()
            filler = None
        rc = daemon.stop()
        daemon.start("--once")
        rc_once = daemon.proc.wait(timeout=600)
        seconds = time.monotonic() - t0
    finally:
        daemon.kill()
        if filler is not None and filler.exists():
            filler.unlink()
    got = Counter(r["input_path"] for r in rows(outbox))
    dupes = {k: v for k, v in got.items() if v > 1}
    missing = [n for n in names if n not in got and n not in deleted]
    unknown = set(got) - set(names)
    processing = [n for n in os.listdir(inbox / ".pawcam-processing") if n != ".lock"] \
        if (inbox / ".pawcam-processing").exists() else []
    inbox_left = [e.name for e in os.scandir(inbox) if e.is_file()]
    statuses = Counter(r["status"] for r in rows(outbox))
    print(f"{len(names)} photos dropped in {seconds:.0f} s; faults: {dict(counts)}; daemon "
          f"starts {daemon.starts}; peak RSS {daemon.peak_rss:.0f} MiB")
    print(f"rows {sum(got.values())} ({dict(statuses)}); photos deleted with a removed inbox "
          f"{len(deleted)} (of which {len(deleted & set(got))} had been claimed and have a row)")
    print(f"duplicates {len(dupes)}; missing {len(missing)}; unknown {len(unknown)}; left in "
          f"the inbox {len(inbox_left)}; left in the processing area {len(processing)}; exit "
          f"codes {rc}, {rc_once}")
    ok = not dupes and not missing and not unknown and not inbox_left and not processing \
        and rc == 0 and rc_once == 0
    print("SOAK PASSED" if ok else f"SOAK FAILED: dupes {list(dupes)[:5]} missing {missing[:5]}")
    if args.keep or not ok:
        print(f"kept {tmp}" + (f" (unmount {volume} when done)" if mounted else ""))
    else:
        if mounted:
            subprocess.run(["umount", "-l", str(volume)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
