"""Engine throughput per runtime, all figures from one run on the same photos (by hand, not a test).

    .venv/bin/python benchmarks/bench_engine.py            # 256 photos, 3 interleaved rounds
    .venv/bin/python benchmarks/bench_engine.py --images 512 --rounds 5 --naive-images 0

Prints, for TensorFlow, ONNX Runtime fp32 and ONNX Runtime int8 side by side (best of
``--rounds`` rounds, interleaved so that drift on a shared machine hits every runtime alike):
  (a) the bare model call on ready tensors (probabilities + Grad-CAM maps, the ceiling),
  (b) the bulk run writing the CSV only (`pawcam predict --no-gradcam`),
  (c) the bulk run with all three Grad-CAM pictures,
then, each in a fresh process, one-image `pawcam predict` wall time and peak memory and the
daemon's start-up time to READY (sd_notify), per runtime; (d) a naive notebook loop; the
ratios the serving-runtime issue targets; and (e) the bulk run with pictures per explanation
method (``--methods``) on the default runtime, with the default method's cost against Grad-CAM. Images: ../shared/dataset/test when present, else
synthetic 500x375 JPEGs. Model: models/cat_dog_model.keras and its ONNX export.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from engine.bulk import run_bulk  # noqa: E402
from engine.config import load_settings, replace  # noqa: E402
from engine.classifier import Classifier  # noqa: E402
from engine.render import PictureOptions  # noqa: E402

SHARED = ROOT.parent / "shared"
PAWCAM = Path(sys.executable).with_name("pawcam")
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def pick_images(n: int, tmp: Path) -> list[Path]:
    test = SHARED / "dataset" / "test"
    if test.is_dir():
        files = sorted(p for p in test.rglob("*") if p.is_file())
        rng = np.random.default_rng(0)
        chosen = [files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)),
                                                       replace=False))]
        source = "../shared/dataset/test"
    else:
        from PIL import Image

        chosen = []
        rng = np.random.default_rng(0)
        for i in range(n):
            small = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
            p = tmp / "synthetic" / f"img{i:05d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(p, quality=90)
            chosen.append(p)
        source = "synthetic 500x375 JPEGs"
    # Same files for every measurement, copied into one flat folder (bulk runs take a folder).
    folder = tmp / "images"
    folder.mkdir()
    for i, src in enumerate(islice(cycle(chosen), n)):
        shutil.copyfile(src, folder / f"{i:05d}_{src.name}")
    print(f"images: {n} from {source}")
    return sorted(folder.iterdir())


def model_path(tmp: Path) -> Path:
    shipped = ROOT / "models" / "cat_dog_model.keras"
    if shipped.is_file():
        print(f"model: {shipped.relative_to(ROOT)}")
        return shipped
    import keras

    from engine.modelio import ModelMeta, save_model

    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    base = keras.applications.MobileNetV2(input_tensor=x, include_top=False,
                                          weights=str(WEIGHTS) if WEIGHTS.is_file() else None)
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    path = save_model(keras.Model(inputs, outputs),
                      ModelMeta(class_names=("cat", "dog"), version="bench"), tmp / "bench.keras")
    print("model: MobileNetV2 1.0/224 built for the benchmark (no shipped model found)")
    return path


RUNTIMES = (("tensorflow", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))


def label(runtime: str, precision: str) -> str:
    return "TensorFlow" if runtime == "tensorflow" else f"ORT {precision}"


def decoded_batch(clf: Classifier, images: list[Path]) -> np.ndarray:
    from engine.decode import load_model_input

    d = clf.decode_limits
    return np.stack([load_model_input(p, input_size=clf.meta.input_size,
                                      max_pixels=d.max_image_pixels, max_bytes=d.max_file_bytes,
                                      follow_symlinks=True) for p in images])


def bench_forward(clf: Classifier, x: np.ndarray, batch: int) -> float:
    """(a) the ceiling: the runtime's call on ready tensors (probabilities + maps), nothing else."""
    batches = [x[i:i + batch] for i in range(0, len(x), batch)]
    clf.runtime.run(batches[0], maps=True)  # warm-up: trace / allocate for both batch shapes
    clf.runtime.run(batches[-1], maps=True)
    t0 = time.perf_counter()
    for b in batches:
        clf.runtime.run(b, maps=True)
    return len(x) / (time.perf_counter() - t0)


def bench_bulk(settings, clf: Classifier, folder: Path, out: Path, gradcam: bool) -> float:
    s = replace(settings, gradcam=replace(settings.gradcam, enabled=gradcam))
    clf.pictures = PictureOptions.from_settings(s.gradcam)
    shutil.rmtree(out, ignore_errors=True)
    summary = run_bulk([folder], out, s, classifier=clf, show_progress=False)
    assert summary.errors == 0, summary.lines()
    return summary.rate


#: started from a small interpreter: a child forked from this big process would inherit its
#: resident pages into ru_maxrss
_MEASURE = """
import os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status))
"""


def child_usage(cmd: list[str]) -> tuple[float, float, int]:
    """Run ``cmd``; (wall seconds, peak RSS MiB, exit code) measured from outside it."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def daemon_start_to_ready(config: Path, runtime: str, precision: str, tmp: Path) -> float:
    """Seconds from `pawcam watch` start to its READY=1 (systemd notify protocol)."""
    sock_path = tmp / f"notify-{runtime}-{precision}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(120)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(PAWCAM), "watch", "--config", str(config), "--runtime", runtime,
                             "--precision", precision, "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if b"READY=1" in sock.recv(4096):
                return time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        sock.close()


def bench_naive(model_file: Path, images: list[Path], out: Path) -> float:
    """(d) how notebooks do it: one image at a time, predict + eager GradientTape + cv2."""
    import cv2
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(model_file, compile=False)
    last_conv = next(l for l in reversed(model.layers) if len(l.output.shape) == 4)
    grad_model = keras.Model(model.inputs, [last_conv.output, model.output])
    out.mkdir(parents=True, exist_ok=True)
    size = tuple(model.inputs[0].shape[1:3])

    def one(path: Path, i: int) -> None:
        img = keras.utils.load_img(path, target_size=size)
        x = keras.utils.img_to_array(img)[None]
        p = float(model.predict(x, verbose=0)[0, 0])
        with tf.GradientTape() as tape:
            conv, pred = grad_model(x)
            score = pred[:, 0] if p >= 0.5 else 1 - pred[:, 0]
        grads = tape.gradient(score, conv)
        w = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.nn.relu(tf.reduce_sum(conv * w[:, None, None, :], axis=-1))[0].numpy()
        cam = cam / (cam.max() + 1e-8)
        orig = cv2.imread(str(path))
        cam_big = cv2.resize(cam, (orig.shape[1], orig.shape[0]))
        gray = np.uint8(255 * cam_big)
        heat = cv2.applyColorMap(gray, cv2.COLORMAP_JET)
        over = cv2.addWeighted(orig, 0.55, heat, 0.45, 0)
        cv2.imwrite(str(out / f"{i}_gray.jpg"), gray)
        cv2.imwrite(str(out / f"{i}_heat.jpg"), heat)
        cv2.imwrite(str(out / f"{i}_over.jpg"), over)

    one(images[0], -1)  # warm-up
    t0 = time.perf_counter()
    for i, p in enumerate(images):
        one(p, i)
    return len(images) / (time.perf_counter() - t0)


def bench_methods(settings, args: argparse.Namespace, tmp: Path) -> None:
    """(e) the bulk run with the three pictures per explanation method, each on the runtime the
    shipped config picks for it, interleaved rounds; ratios to the first (today's Grad-CAM)."""
    methods = [m for m in args.methods.split(",") if m]
    if settings.gradcam.method not in methods:
        methods.append(settings.gradcam.method)
    clfs = {}
    for m in methods:
        s = replace(settings, gradcam=replace(settings.gradcam, method=m, enabled=True))
        clfs[m] = (s, Classifier.from_settings(s))
    rates = {m: 0.0 for m in methods}
    for _ in range(args.rounds):
        for m, (s, clf) in clfs.items():
            rates[m] = max(rates[m], bench_bulk(s, clf, tmp / "images", tmp / "out", True))
    print()
    print("(e) bulk run, CSV + 3 pictures, per explanation method (default runtime):")
    for m, (s, clf) in clfs.items():
        mark = "  <- [gradcam] method" if m == settings.gradcam.method else ""
        print(f"  {m:10s} {rates[m]:7.1f} img/s  {rates[m] / rates[methods[0]]:5.2f} x "
              f"{methods[0]}  ({clf.runtime.describe()}){mark}")
    print(f"  default method / {methods[0]}: {rates[settings.gradcam.method] / rates[methods[0]]:.2f}"
          "   target >= 0.85")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--naive-images", type=int, default=32)
    ap.add_argument("--config", type=Path, default=ROOT / "config.toml")
    ap.add_argument("--methods", default="gradcam,gradcampp",
                    help="explanation methods timed in (e) on the default runtime; the first is "
                         "the reference, the configured [gradcam] method is always included")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="pawcam-bench-"))
    try:
        images = pick_images(args.images, tmp)
        settings = load_settings(args.config)
        settings = replace(settings, model=replace(settings.model, path=model_path(tmp)))
        batch = settings.inference.batch_size
        clfs = {}
        for rt, prec in RUNTIMES:
            s = replace(settings, inference=replace(settings.inference, runtime=rt,
                                                    precision=prec))
            clfs[(rt, prec)] = (s, Classifier.from_settings(s))
        print(f"batch size: {batch}; decode threads: {settings.inference.threads}; "
              f"CPU cores: {os.cpu_count()}; best of {args.rounds} interleaved rounds")
        x = decoded_batch(next(iter(clfs.values()))[1], images)
        best: dict[tuple, dict[str, float]] = {k: {"a": 0.0, "b": 0.0, "c": 0.0} for k in clfs}
        for r in range(args.rounds):
            for key, (s, clf) in clfs.items():
                run = best[key]
                run["a"] = max(run["a"], bench_forward(clf, x, batch))
                run["b"] = max(run["b"], bench_bulk(s, clf, tmp / "images", tmp / "out", False))
                run["c"] = max(run["c"], bench_bulk(s, clf, tmp / "images", tmp / "out", True))
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
        rows = [("(a) bare model call + maps, ready tensors", "a"),
                ("(b) bulk run, CSV only", "b"),
                ("(c) bulk run, CSV + 3 Grad-CAM pictures", "c")]
        print(f"{'images/s':44s}" + "".join(f"{label(*k):>12s}" for k in clfs))
        for name, key in rows:
            print(f"{name:44s}" + "".join(f"{best[k][key]:12.1f}" for k in clfs))

        one = images[0]
        config = tmp / "config.toml"
        config.write_text(f'[model]\npath = "{settings.model.path}"\n[paths]\n'
                          f'inbox = "{tmp / "inbox"}"\noutbox = "{tmp / "outbox"}"\n',
                          encoding="utf-8")
        (tmp / "inbox").mkdir()
        single: dict[tuple, tuple[float, float]] = {}
        ready: dict[tuple, float] = {}
        for key in clfs:
            rt, prec = key
            walls, peaks = [], []
            for i in range(2):
                wall, peak, code = child_usage(
                    [str(PAWCAM), "predict", str(one), "--out", str(tmp / f"one-{i}"),
                     "--config", str(config), "--runtime", rt, "--precision", prec, "-q"])
                assert code == 0, f"one-image predict failed under {key}"
                walls.append(wall)
                peaks.append(peak)
            single[key] = (min(walls), max(peaks))
            ready[key] = daemon_start_to_ready(config, rt, prec, tmp)
        print(f"{'one-image pawcam predict, wall s':44s}"
              + "".join(f"{single[k][0]:12.2f}" for k in clfs))
        print(f"{'one-image pawcam predict, peak MiB':44s}"
              + "".join(f"{single[k][1]:12.0f}" for k in clfs))
        print(f"{'daemon start-up to READY, s':44s}" + "".join(f"{ready[k]:12.2f}" for k in clfs))

        d = 0.0
        if args.naive_images:
            d = bench_naive(settings.model.path, images[:args.naive_images], tmp / "naive")
            print(f"(d) naive per-image notebook loop (TensorFlow)  {d:7.1f} img/s")
        tf, f32, i8 = (best[k] for k in RUNTIMES)
        chosen = Classifier.from_settings(settings).runtime  # what the shipped config serves here
        dkey = (chosen.name, chosen.precision)
        dflt = best[dkey]
        print()
        print(f"default runtime on this machine: {chosen.describe()}")
        checks = [
            ("ORT fp32 bare / TF bare", f32["a"] / tf["a"], ">= 2"),
            ("ORT int8 bare / TF bare", i8["a"] / tf["a"], ">= 5"),
            ("bulk + pictures, default / TF", dflt["c"] / tf["c"], ">= 2.5"),
            ("bulk CSV only, default / TF", dflt["b"] / tf["b"], ">= 3"),
            ("one-image wall, default / TF", single[dkey][0] / single[RUNTIMES[0]][0], "<= 0.2"),
            ("one-image peak memory, default / TF", single[dkey][1] / single[RUNTIMES[0]][1],
             "<= 0.33"),
            ("bulk + pictures / bare call (default)", dflt["c"] / dflt["a"], "(picture cost)"),
        ]
        if d:
            checks.append(("bulk + pictures (default) / naive loop", dflt["c"] / d, ">= 8"))
        for name, value, target in checks:
            print(f"  {name:40s} {value:7.2f}   target {target}")
        bench_methods(settings, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
