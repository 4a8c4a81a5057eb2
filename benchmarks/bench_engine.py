"""Engine throughput, all figures from one run on the same images (run by hand, not a test).

    .venv/bin/python benchmarks/bench_engine.py            # 256 images, naive loop on 48
    .venv/bin/python benchmarks/bench_engine.py --images 512 --naive-images 64

Prints images/s for
  (a) the bare model forward on ready tensors at the configured batch (the ceiling),
  (b) the bulk run writing the CSV only (`pawcam predict --no-gradcam`),
  (c) the bulk run with all three Grad-CAM pictures,
  (d) a naive notebook loop: per image `load_img` + `model.predict` + a GradientTape Grad-CAM
      + OpenCV pictures,
and the ratios b/a, c/a, c/d. Images: ../shared/dataset/test when present, else synthetic
500x375 JPEGs. Model: models/cat_dog_model.keras when present, else a MobileNetV2 built with
the same head (ImageNet weights from ../shared when present).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
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

SHARED = ROOT.parent / "shared"
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


def bench_forward(clf: Classifier, images: list[Path], batch: int) -> float:
    """(a) the ceiling: compiled forward pass on ready float32 tensors, nothing else."""
    import tensorflow as tf

    from engine.decode import load_model_input

    d = clf.settings.decode
    x = np.stack([load_model_input(p, input_size=clf.meta.input_size, max_pixels=d.max_image_pixels,
                                   max_bytes=d.max_file_bytes, follow_symlinks=True)
                  for p in images]).astype(np.float32)
    model = clf.loaded.model
    forward = tf.function(lambda t: model(t, training=False), reduce_retracing=True)
    batches = [tf.constant(x[i:i + batch]) for i in range(0, len(x), batch)]
    for b in batches[:2]:
        forward(b).numpy()  # trace both the full and (maybe) the last partial batch shape
    forward(batches[-1]).numpy()
    t0 = time.perf_counter()
    for b in batches:
        forward(b).numpy()
    return len(x) / (time.perf_counter() - t0)


def bench_bulk(settings, clf: Classifier, folder: Path, out: Path, gradcam: bool) -> float:
    s = replace(settings, gradcam=replace(settings.gradcam, enabled=gradcam))
    clf.settings, clf.outputs = s, s.gradcam.active_outputs
    run_bulk([folder], out / "warm", s, classifier=clf, show_progress=False)  # trace shapes
    shutil.rmtree(out / "warm")
    summary = run_bulk([folder], out / ("cam" if gradcam else "csv"), s, classifier=clf,
                       show_progress=False)
    assert summary.errors == 0, summary.lines()
    return summary.rate


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--naive-images", type=int, default=48)
    ap.add_argument("--config", type=Path, default=ROOT / "config.toml")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="pawcam-bench-"))
    try:
        images = pick_images(args.images, tmp)
        settings = load_settings(args.config)
        settings = replace(settings, model=replace(settings.model, path=model_path(tmp)))
        clf = Classifier(settings)
        batch = settings.inference.batch_size
        print(f"batch size: {batch}; decode threads: {settings.inference.threads}; "
              f"CPU cores: {os.cpu_count()}; device: {clf.device}")
        a = bench_forward(clf, images, batch)
        print(f"(a) bare model forward, ready tensors   {a:7.1f} img/s")
        b = bench_bulk(settings, clf, tmp / "images", tmp / "out", gradcam=False)
        print(f"(b) bulk run, CSV only                   {b:7.1f} img/s")
        c = bench_bulk(settings, clf, tmp / "images", tmp / "out", gradcam=True)
        print(f"(c) bulk run, CSV + 3 Grad-CAM pictures  {c:7.1f} img/s")
        d = bench_naive(settings.model.path, images[:args.naive_images], tmp / "naive")
        print(f"(d) naive per-image notebook loop        {d:7.1f} img/s")
        print(f"b/a = {b / a:.2f}  (target >= 0.70)")
        print(f"c/a = {c / a:.2f}  (target >= 0.50)")
        print(f"c/d = {c / d:.1f}  (target >= 8)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
