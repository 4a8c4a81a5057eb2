"""How much does the keep-top-20 %-vs-random test move with the sample? (issue 12's protocol)

    python benchmarks/keep_top_samples.py --model models/cat_dog_model.keras --seeds 0,1,2,3,4
    git show a60e14e:models/cat_dog_model.keras > /tmp/old/cat_dog_model.keras   # and .json:
    python benchmarks/keep_top_samples.py --model /tmp/old/cat_dog_model.keras    # the issue's model

For each seeded sample of ``--images`` test photos (the sample of ``pawcam evaluate``), the
method's maps (TensorFlow) and, on the calibrated probability of the predicted class:
the protocol's win rate (one random draw of 10 of the 7x7 cells per photo, ties lose), the
share of ``--draws`` draws beaten, the same test with the map's top 10 cells instead of its
top 20 % of pixels, and the mean drops (map / first random draw); ties counted too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import faithfulness as F  # noqa: E402
from engine.config import load_settings  # noqa: E402
from engine.gradcam import GradCam  # noqa: E402
from engine.modelio import load_model  # noqa: E402
from training.explanations import load_photos, sample_photos  # noqa: E402


def top_cells(maps: np.ndarray, size: tuple[int, int], count: int) -> np.ndarray:
    """(N, H, W) bool: the ``count`` highest cells of each (N, h, w) map, nearest-upsampled."""
    n, h, w = maps.shape
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")[:, :count]
    cells = np.zeros((n, h * w), bool)
    np.put_along_axis(cells, order, True, axis=1)
    H, W = size
    return cells.reshape(n, h, w)[:, np.arange(H) * h // H][:, :, np.arange(W) * w // W]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/cat_dog_model.keras"))
    ap.add_argument("--data", type=Path, default=Path("../shared/dataset/test"))
    ap.add_argument("--method", default="gradcam")
    ap.add_argument("--seeds", default="0,1,2,3,4,1337")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--draws", type=int, default=F.KEEP_DRAWS)
    args = ap.parse_args()
    loaded = load_model(args.model)
    meta = loaded.meta
    cam = GradCam(loaded.model, meta, method=args.method)
    settings = load_settings(Path("config.toml"), required=False)

    def predict(x: np.ndarray) -> np.ndarray:
        return np.concatenate([cam.probabilities(x[i:i + 32]) for i in range(0, len(x), 32)])

    print(f"{args.model} ({meta.version}), {args.method}, {args.images} photos per sample")
    print("seed | wins, 1 draw | share of draws | top cells, 1 draw | drop map / random | ties")
    for seed in (int(s) for s in args.seeds.split(",")):
        paths = sample_photos(args.data, meta.class_names, args.images, seed)
        x = load_photos(paths, settings, meta.input_size)[0].astype(np.float32)
        parts = [cam(x[i:i + 32]) for i in range(0, len(x), 32)]
        probs = np.concatenate([p for p, _ in parts])
        maps = np.concatenate([m for _, m in parts])
        classes = meta.predicted_indices(probs)
        # the pawcam evaluate stream of random cells (seed + 2), first draw = the protocol's
        top = F.keep_top_vs_random(x, maps, classes, predict, np.random.default_rng(seed + 2),
                                   draws=args.draws)
        mean = x.astype(np.float64).mean(axis=(1, 2), keepdims=True)
        cells = top_cells(maps, meta.input_size, round(0.2 * maps[0].size))[..., None]
        kept = predict(np.where(cells, x, mean).astype(np.float32))[np.arange(len(x)), classes]
        print(f"{seed} | {100 * top.wins.mean():.1f} % | {100 * top.win_share.mean():.1f} % | "
              f"{100 * (kept > top.random[:, 0]).mean():.1f} % | "
              f"{(top.original - top.top).mean():.3f} / "
              f"{(top.original - top.random[:, 0]).mean():.3f} | "
              f"{int((top.top == top.random[:, 0]).sum())}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
