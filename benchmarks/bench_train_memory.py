"""Peak memory of `pawcam train` against the number of photos (run by hand, not a test).

    .venv/bin/python benchmarks/bench_train_memory.py                      # 2,000 / 8,000 / 50,000
    .venv/bin/python benchmarks/bench_train_memory.py --sizes 2000 8000 --image-size 224

For each size N a synthetic folder of N small JPEGs (64x48, half "cat", half "dog", noisy
colours; plus a 40-photo test split) is made under --workdir (default: a folder in /tmp, never in
the repository) and `pawcam train` runs on it in a child process with a small, fixed recipe
(MobileNetV2 alpha 0.35 with random weights, --image-size pixels, 2 head epochs, 1 fine-tune
epoch on cached activations, no install). Printed per N: the child's peak RSS (``wait4``'s
ru_maxrss, the high-water mark of its resident memory, file-backed pages included), the
wall time, the size of the on-disk cache, and what the decoded images alone would occupy in
memory if they were held in one array (the design before the on-disk cache). The figures
are from one run on one machine; the ratio peak(N_max) / peak(N_min) is the point: flat
means memory does not grow with the data.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """N training photos (half per class) + 20 test photos per class, made once per size."""
    marker = root / ".complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    colours = {"cat": (200, 60, 40), "dog": (40, 80, 210)}
    for split, count in (("train", n // 2), ("test", 20)):
        for name, base in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            noise = rng.normal(0, 40, size=(min(count, 512), 48, 64, 3))
            for i in range(count):
                img = np.clip(np.asarray(base) + noise[i % len(noise)] * rng.uniform(0.5, 1.5),
                              0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{name}_{i:06d}.jpg", quality=85)
    marker.write_text("ok")
    return root


def write_config(path: Path, image_size: int) -> Path:
    training = {"image_size": image_size, "alpha": 0.35, "backbone_weights": "none",
                "batch_size": 64, "head_epochs": 2, "head_patience": 2, "fine_tune_epochs": 1,
                "fine_tune_from": "block_13_expand", "fine_tune_cache": True,
                "fine_tune_learning_rate": 1e-4, "deterministic": False, "gallery_size": 0,
                "keep_cache": True, "install": "never"}
    lines = ["[training]"] + [f"{k} = {json.dumps(v)}" for k, v in training.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(n: int, work: Path, image_size: int) -> dict:
    data = make_folder(work / f"data-{n}", n)
    cfg = write_config(work / "bench.toml", image_size)
    run_dir = work / f"run-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    with open(work / f"train-{n}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", "--config",
                                 str(cfg), "--data", str(data), "--run-dir", str(run_dir)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pawcam train failed for N={n}; see {work / f'train-{n}.log'}")
    cache = du(run_dir / "cache")
    shutil.rmtree(run_dir / "cache", ignore_errors=True)
    return {"n": n, "peak_rss_mb": usage.ru_maxrss / 1024, "seconds": seconds,
            "cache_mb": cache / 2**20, "in_memory_mb": n * image_size * image_size * 3 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 50000])
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the synthetic folders and runs go (default: a folder in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic folders")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.gettempdir()) / "pawcam-bench-train"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.sizes:
            row = run(n, work, args.image_size)
            rows.append(row)
            print(f"N={n:>6}: peak RSS {row['peak_rss_mb']:7.0f} MB | {row['seconds']:6.0f} s | "
                  f"cache on disk {row['cache_mb']:7.0f} MB | decoded images in one array "
                  f"would be {row['in_memory_mb']:7.0f} MB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if len(rows) > 1:
        print(f"peak RSS ratio N={rows[-1]['n']} / N={rows[0]['n']}: "
              f"{rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f} "
              f"(photos x{rows[-1]['n'] / rows[0]['n']:.0f}); image size {args.image_size}")


if __name__ == "__main__":
    main()
