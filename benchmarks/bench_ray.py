"""`pawcam predict --ray` on a local Ray against the local run, same photos, one run (by hand).

    nice .venv/bin/python benchmarks/bench_ray.py                       # 400 photos, all CPUs
    .venv/bin/python benchmarks/bench_ray.py --images 2000 --actors 4 --cpus-per-actor 4

Prints images/s for
  (a) the local bulk run (`pawcam predict`, model loaded beforehand; mean of one run before
      and one after the Ray run),
  (b) the Ray run on a local Ray already started (`--ray` joining it: actors start, load the
      model, classify, rows come back), and (b') the same including Ray's own start-up,
and the ratios b/a and b'/a. Photos: a fixed sample of ../shared/dataset/test (synthetic
500x375 JPEGs when absent); shipped model, runtime as [inference] decides (ONNX Runtime on
a CPU, TensorFlow with a GPU); Grad-CAM pictures on (--no-gradcam to leave them out).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import pick_images  # noqa: E402
from engine.bulk import run_bulk  # noqa: E402
from engine.classifier import Classifier  # noqa: E402
from engine.config import load_settings, replace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--actors", type=int, default=0, help="0 = [cluster] actors (auto)")
    ap.add_argument("--cpus-per-actor", type=float, default=None)
    ap.add_argument("--gpus-per-actor", type=float, default=None)
    ap.add_argument("--no-gradcam", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    settings = load_settings(ROOT / "config.toml")
    cluster = replace(settings.cluster, actors=args.actors)
    if args.cpus_per_actor is not None:
        cluster = replace(cluster, cpus_per_actor=args.cpus_per_actor)
    if args.gpus_per_actor is not None:
        cluster = replace(cluster, gpus_per_actor=args.gpus_per_actor)
    settings = replace(settings, cluster=cluster,
                       gradcam=replace(settings.gradcam, enabled=not args.no_gradcam))
    from engine.bulk_ray import run_bulk_ray

    with tempfile.TemporaryDirectory(prefix="pawcam-bench-ray-") as tmp_name:
        tmp = Path(tmp_name)
        folder = pick_images(args.images, tmp)[0].parent
        classifier = Classifier.from_settings(settings)
        print(f"runtime: {classifier.runtime.describe()}; cores: {os.cpu_count()}; "
              f"gradcam: {not args.no_gradcam}")
        run_bulk([folder], tmp / "warm", settings, classifier=classifier, show_progress=False)
        local = run_bulk([folder], tmp / "local", settings, classifier=classifier,
                         show_progress=False)
        t0 = time.monotonic()
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray_start = time.monotonic() - t0
        try:
            remote = run_bulk_ray([folder], tmp / "ray", settings, show_progress=False)
            res = ray.cluster_resources()
        finally:
            ray.shutdown()
        local2 = run_bulk([folder], tmp / "local2", settings, classifier=classifier,
                          show_progress=False)  # again after: the machine's load may drift
        assert remote.total == local.total == args.images and remote.errors == local.errors
        print(f"local runs before and after the Ray run: {local.rate:.1f}, {local2.rate:.1f} "
              "img/s (a = their mean)")
        a, b = (local.rate + local2.rate) / 2, remote.rate
        b_cold = remote.total / (remote.seconds + ray_start)
        print(f"Ray: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; actors: "
              f"{cluster.actors or 'auto'} x {cluster.cpus_per_actor:g} CPU / "
              f"{cluster.gpus_per_actor:g} GPU")
        print(f"(a)  local run                         {a:7.1f} img/s")
        print(f"(b)  --ray, Ray already running         {b:7.1f} img/s   b/a  = {b / a:.2f}")
        print(f"(b') --ray, with Ray's start-up ({ray_start:4.1f} s) {b_cold:7.1f} img/s   "
              f"b'/a = {b_cold / a:.2f}")


if __name__ == "__main__":
    main()
