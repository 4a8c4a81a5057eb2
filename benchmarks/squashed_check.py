"""Are squashed photos classified as well as natural ones? (run by hand; figures in README)

    .venv/bin/python benchmarks/squashed_check.py [--runtime onnxruntime --precision fp32] [--card]

Every photo of ../shared/dataset/test is resized to 200x200 without keeping its aspect ratio
(as the publisher of ../shared/dataset-extra did), then both sets are scored by the engine as
served (`pawcam evaluate`'s own function). Prints accuracy, ROC-AUC and ECE side by side;
``--card`` also records them in the shipped model's report and card (section "Squashed photos";
a later `pawcam evaluate` of the same model keeps it).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from engine.config import load_settings, replace  # noqa: E402
from engine.runtime import open_runtime  # noqa: E402
from training.evaluate import evaluate_folder  # noqa: E402

TEST = ROOT.parent / "shared" / "dataset" / "test"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runtime", default="onnxruntime")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--card", action="store_true", help="record the result in the model card")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings(ROOT / "config.toml")
    settings = replace(settings, inference=replace(settings.inference, runtime=args.runtime,
                                                   precision=args.precision))
    runtime = open_runtime(settings, need_maps=False)
    with tempfile.TemporaryDirectory(prefix="pawcam-squashed-") as tmp:
        squashed = Path(tmp)
        for cls in sorted(p.name for p in TEST.iterdir() if p.is_dir()):
            (squashed / cls).mkdir()
            for photo in sorted((TEST / cls).iterdir()):
                Image.open(photo).convert("RGB").resize((200, 200), Image.BICUBIC).save(
                    squashed / cls / photo.name, quality=90)
        print(f"runtime: {runtime.describe()}")
        found = {}
        for name, folder in (("natural", TEST), ("squashed", squashed)):
            m = evaluate_folder(settings, runtime, folder, gallery_size=0,
                                progress_every=0).metrics
            found[name] = {k: m[k] for k in ("accuracy", "roc_auc", "ece", "n")}
            print(f"{name:18s} accuracy {m['accuracy']:.2%}  ROC-AUC {m['roc_auc']:.5f}  "
                  f"ECE {m['ece']:.4f}  ({m['n']} photos)")
    if args.card:
        from engine.modelio import read_meta  # noqa: E402
        from training.report import add_squashed_check  # noqa: E402

        model_path = settings.model.path
        card = add_squashed_check(model_path, read_meta(model_path), {
            **found, "label": "squashed to 200x200",
            "runtime": runtime.describe(),
            "how": "every photo of the test set resized to 200x200 without keeping its aspect "
                   "ratio (bicubic, JPEG quality 90), as the publisher of the extra training "
                   "photos did, then scored like the photos as published "
                   "(`benchmarks/squashed_check.py --card`)."})
        print(f"recorded in {card}")


if __name__ == "__main__":
    main()
