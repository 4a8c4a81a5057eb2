"""How faithful is each explanation method? Scores on a seeded sample of a labelled folder.

    runtime = open_runtime(settings)                       # what answers (any runtime)
    scores = score_methods(settings, runtime, Path("data/test"), ["gradcam", "gradcampp"],
                           images=200, seed=0)
    scores["gradcampp"]["keep_top_win_rate"], scores["gradcampp"]["deletion_auc"], ...

Each method's maps come from the runtime that serves it (:func:`engine.runtime.open_runtime`
with ``[gradcam] method`` set: ONNX Runtime for the closed-form methods, TensorFlow for
``layercam``); every perturbed photo is answered by ``runtime`` (``run(images, maps=False)``),
batch by batch. The metrics are :mod:`engine.faithfulness`; the sample is the same for every
method (seeded), and so are the random cells and the imputation noise (seeded per method).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine import faithfulness as F
from engine.config import Settings, replace
from engine.decode import decode_limits, load_model_input
from engine.errors import ImageError
from engine.runtime import Runtime, open_runtime
from training.dataset import scan_split

log = logging.getLogger("pawcam.explanations")

#: photos per perturbation batch (each step is one runtime call on this many photos)
CHUNK = 16


def sample_photos(folder: Path, class_names: Sequence[str], count: int, seed: int = 0
                  ) -> list[Path]:
    """A seeded sample of ``count`` photos of ``folder/<class>/`` (all of them if fewer)."""
    files = scan_split(folder, tuple(class_names)).files
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(files))[:count]
    return [files[i] for i in sorted(picked)]


def load_photos(paths: Sequence[Path], settings: Settings, input_size: tuple[int, int]
                ) -> tuple[np.ndarray, list[Path]]:
    """Decode with the engine's own path; unreadable files are skipped with a warning."""
    d = settings.decode
    images, kept = [], []
    for path in paths:
        try:
            images.append(load_model_input(path, input_size=input_size,
                                           max_bytes=d.max_file_bytes, **decode_limits(d)))
            kept.append(path)
        except ImageError as exc:
            log.warning("faithfulness: skipping %s: %s", path, exc)
    h, w = input_size
    return (np.stack(images) if images else np.zeros((0, h, w, 3), np.uint8)), kept


def method_runtime(settings: Settings, method: str, model_path: Path) -> Runtime:
    """The runtime that serves ``method``'s maps (its own choice and fallbacks)."""
    g = replace(settings.gradcam, method=method, enabled=True)
    return open_runtime(replace(settings, gradcam=g), model_path=model_path, need_maps=True)


def score_method(images: np.ndarray, maps_of: Runtime, answers: Runtime, seed: int = 0,
                 steps: int = F.STEPS) -> dict[str, Any]:
    """All the faithfulness numbers of one method on ``images`` (N, H, W, 3) 0-255."""
    def predict(x: np.ndarray) -> np.ndarray:
        return answers.run(x, maps=False)[0]

    rng_road = np.random.default_rng(seed + 1)
    rng_cells = np.random.default_rng(seed + 2)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                          ("del", "ins", "morf", "lerf", "orig", "top", "rand")}
    fractions = None
    for start in range(0, len(images), CHUNK):
        x = images[start:start + CHUNK].astype(np.float32)
        _, maps = maps_of.run(x, maps=True)
        classes = answers.meta.predicted_indices(predict(x))
        curves = F.deletion_insertion(x, maps, classes, predict, steps=steps)
        morf, lerf = F.road(x, maps, classes, predict, rng_road)
        top = F.keep_top_vs_random(x, maps, classes, predict, rng_cells)
        fractions = curves.fractions
        for key, value in (("del", curves.deletion), ("ins", curves.insertion), ("morf", morf),
                           ("lerf", lerf), ("orig", top.original), ("top", top.top),
                           ("rand", top.random)):
            parts[key].append(value)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return F.summarize(F.Curves(fractions, cat["del"], cat["ins"]), cat["morf"], cat["lerf"],
                       F.KeepTop(cat["orig"], cat["top"], cat["rand"]))


def score_methods(settings: Settings, answers: Runtime, folder: Path, methods: Sequence[str],
                  images: int = 200, seed: int = 0, model_path: Path | None = None
                  ) -> dict[str, dict[str, Any]]:
    """``{method: numbers}`` on the same seeded sample of ``folder`` for every method."""
    model_path = Path(model_path or settings.model.path)
    meta = answers.meta
    photos, kept = load_photos(sample_photos(folder, meta.class_names, images, seed), settings,
                               meta.input_size)
    if not kept:
        log.warning("faithfulness: no photo of %s could be decoded; not scored", folder)
        return {}
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        t0 = time.perf_counter()
        runtime = method_runtime(settings, method, model_path)
        numbers = score_method(photos, runtime, answers, seed)
        numbers["maps_by"] = runtime.describe()
        numbers["seconds"] = round(time.perf_counter() - t0, 1)
        results[method] = numbers
        log.info("faithfulness of %s on %d photos (%.0f s): keep-top-20%% wins %.1f%%, deletion "
                 "AUC %.3f, insertion AUC %.3f, ROAD gap %.3f", method, len(kept),
                 numbers["seconds"], 100 * numbers["keep_top_win_rate"], numbers["deletion_auc"],
                 numbers["insertion_auc"], numbers["road_gap"])
    return results


def method_figure(settings: Settings, photos: Sequence[Path], methods: Sequence[str],
                  model_path: Path | None = None, side: int = 256) -> np.ndarray:
    """One row per photo: the photo, then each method's overlay (the served pictures' look:
    ``[gradcam]`` colormap and opacity, label and confidence as caption). RGB uint8."""
    import cv2

    from engine.classifier import format_confidence
    from engine.decode import decode_image, read_file_bytes
    from engine.render import draw_caption, overlay

    model_path = Path(model_path or settings.model.path)
    runtimes = {m: method_runtime(settings, m, model_path) for m in methods}
    meta = next(iter(runtimes.values())).meta
    d, g = settings.decode, settings.gradcam
    rows = []
    for path in photos:
        image = decode_image(read_file_bytes(path, max_bytes=d.max_file_bytes),
                             input_size=meta.input_size, max_pixels=d.max_image_pixels,
                             preview_max_side=side)
        rgb = image.preview
        h, w = rgb.shape[:2]
        rgb = cv2.resize(rgb, (round(w * side / max(h, w)), round(h * side / max(h, w))),
                         interpolation=cv2.INTER_AREA) if max(h, w) != side else rgb
        cells = [draw_caption(rgb, Path(path).name)]
        for method, runtime in runtimes.items():
            probs, maps = runtime.run(image.model_input[None].astype(np.float32), maps=True)
            c = int(meta.predicted_indices(probs)[0])
            caption = f"{method}: {meta.class_names[c]} {format_confidence(float(probs[0, c]))}"
            cells.append(overlay(rgb, maps[0], alpha=g.overlay_alpha, colormap=g.colormap,
                                 caption=caption))
        row = np.concatenate([_pad_to(cell, cells[0].shape[0], side) for cell in cells], axis=1)
        rows.append(row)
    return np.concatenate(rows, axis=0)


def _pad_to(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre ``rgb`` on a white ``height`` x ``width`` canvas."""
    out = np.full((height, width, 3), 255, np.uint8)
    h, w = rgb.shape[:2]
    y, x = (height - h) // 2, (width - w) // 2
    out[y:y + h, x:x + w] = rgb
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.explanations --out models/cam_methods.jpg PHOTO...``: the README's
    side-by-side figure of the methods (``make figures``)."""
    import argparse

    from engine.config import load_settings
    from engine.render import write_picture

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("photos", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", default="gradcam,gradcampp,layercam")
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.config, required=False)
    picture = method_figure(settings, args.photos, [m for m in args.methods.split(",") if m])
    write_picture(args.out, picture, "jpg", 88)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
