"""``pawcam train`` and ``pawcam evaluate`` subcommands (registered via entry points).

    pawcam train --data ../shared/dataset                 # settings from [training]
    pawcam train --data DIR --install never --run-dir runs/try1
    pawcam evaluate --data ../shared/dataset              # DIR/test, or DIR/<class>/ directly
    pawcam evaluate --data photos/ --model runs/x/model.keras --out /tmp/report
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine.config import Settings
from engine.modelio import load_model
from training.config import INSTALL_POLICIES

log = logging.getLogger("pawcam.training")


def register_train(subparsers, parent) -> None:
    p = subparsers.add_parser(
        "train", parents=[parent], help="train a model from a folder of labelled photos",
        description="Transfer-learn MobileNetV2 on DIR/train/<class>/ (validation split carved "
                    "from it), calibrate, evaluate on DIR/test/<class>/ and write the model, "
                    "metadata, model card and plots into a run folder; settings in the "
                    "[training] section of config.toml.")
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="dataset folder holding train/<class>/ and test/<class>/")
    p.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                   help="run folder (default: [training] output_dir/<date-time>)")
    p.add_argument("--install", choices=INSTALL_POLICIES, default=None,
                   help="copy the result to [training] install_to: if_better (default from "
                        "config), always or never")
    p.set_defaults(func=run_train)


def register_evaluate(subparsers, parent) -> None:
    p = subparsers.add_parser(
        "evaluate", parents=[parent], help="evaluate a model on a labelled folder",
        description="Classify every photo of DIR/test/<class>/ (or DIR/<class>/) through the "
                    "engine and write evaluation.json, a Markdown model card and PNG plots "
                    "beside the model (or under --out).")
    p.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="folder holding test/<class>/ (or <class>/ directly)")
    p.add_argument("--split", default="test", help="sub-folder of DIR to use (default: test)")
    p.add_argument("--model", type=Path, default=None, metavar="PATH",
                   help="model to evaluate (default: [model] path)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write the card and report here instead of beside the model")
    p.add_argument("--gallery", type=int, default=12, metavar="N",
                   help="how many most-confidently-wrong images to show (default 12)")
    p.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    from training.train import TrainOptions, train

    result = train(settings, TrainOptions(data=args.data, run_dir=args.run_dir,
                                          install=args.install))
    m = result.evaluation.metrics
    log.info("done in %.1f min: test accuracy %.2f%%, ROC-AUC %.5f, ECE %.4f (before "
             "calibration %.4f); model %s%s", result.train_seconds / 60, 100 * m["accuracy"],
             m["roc_auc"], m["ece"], m["ece_uncalibrated"], result.model_path,
             f", installed as {result.install_path}" if result.installed else "")
    return 0


def run_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from training.evaluate import evaluate_folder, resolve_split
    from training.report import write_report

    model_path = args.model or settings.model.path
    loaded = load_model(model_path)
    folder = resolve_split(args.data, args.split)
    evaluation = evaluate_folder(settings, loaded, folder, max(0, args.gallery))
    target = Path(model_path) if args.out is None else Path(args.out) / Path(model_path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    card = write_report(target, loaded.meta, evaluation)
    m = evaluation.metrics
    log.info("accuracy %.2f%%, ROC-AUC %.5f, ECE %.4f on %d images (%d skipped); card %s",
             100 * m["accuracy"], m["roc_auc"], m["ece"], m["n"], m["skipped"], card)
    return 0
