"""``pawcam train`` and ``pawcam evaluate`` subcommands (registered via entry points).

    pawcam train --data ../shared/dataset                 # settings from [training]
    pawcam train --data ../shared/dataset --data ../shared/dataset-extra   # + train-only folder
    pawcam train --data DIR --install never --run-dir runs/try1
    pawcam evaluate --data ../shared/dataset              # DIR/test, or DIR/<class>/ directly
    pawcam evaluate --data photos/ --model runs/x/model.keras --out /tmp/report
    pawcam evaluate --data ../shared/dataset --faithfulness 50 --methods gradcam,gradcampp
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine.config import CAM_METHODS, Settings
from engine.errors import ConfigError
from engine.modelio import read_meta
from engine.runtime import open_runtime
from training.config import INSTALL_POLICIES, training_settings

log = logging.getLogger("pawcam.training")


def register_train(subparsers, parent) -> None:
    p = subparsers.add_parser(
        "train", parents=[parent], help="train a model from a folder of labelled photos",
        description="Transfer-learn MobileNetV2 on DIR/train/<class>/ of every --data DIR "
                    "(validation split carved from them), calibrate, evaluate on DIR/test/<class>/ and write the model, "
                    "metadata, model card and plots into a run folder; settings in the "
                    "[training] section of config.toml.")
    p.add_argument("--data", type=Path, required=True, metavar="DIR", action="append",
                   help="dataset folder holding train/<class>/ and test/<class>/; repeat it to "
                        "add folders of extra training data (DIR/train/<class>/ only, same "
                        "classes); exactly one folder must hold test/")
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
    p.add_argument("--faithfulness", type=int, default=None, metavar="N",
                   help="photos of the seeded sample that score the explanation methods "
                        "(default: [training] faithfulness_images; 0 = skip)")
    p.add_argument("--methods", default=None, metavar="M[,M]",
                   help="explanation methods to score (default: [training] faithfulness_methods)")
    p.set_defaults(func=run_evaluate)


def register_export(subparsers, parent) -> None:
    p = subparsers.add_parser(
        "export", parents=[parent], help="compile a model to ONNX (fp32 and int8) for serving",
        description="Write MODEL.fp32.onnx, MODEL.int8.onnx and MODEL.export.json beside the "
                    ".keras model: the copies ONNX Runtime serves without TensorFlow. The int8 "
                    "copy is calibrated on a seeded sample of the training photos and checked "
                    "against fp32 on the validation split; a failed check is recorded and int8 "
                    "is then never served.")
    p.add_argument("--model", type=Path, default=None, metavar="PATH",
                   help="model to export (default: [model] path)")
    p.add_argument("--data", type=Path, default=None, metavar="DIR", action="append",
                   help="dataset folder with train/<class>/ for int8 calibration and its check; "
                        "repeat it as for `pawcam train` (default: the folders recorded in the "
                        "model's metadata)")
    p.add_argument("--no-int8", action="store_true", help="export fp32 only")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    from training.export import export_model, require_export_tools

    require_export_tools()
    manifest = export_model(args.model or settings.model.path, settings, data=args.data,
                            int8=not args.no_int8)
    int8 = manifest.checks.get("int8", {})
    log.info("int8: %s", "ready" if manifest.int8_ok else
             f"not served ({int8.get('reason') or 'check failed'})")
    return 0


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
    runtime = open_runtime(settings, model_path=model_path, need_maps=args.gallery > 0)
    folder = resolve_split(args.data, args.split)
    evaluation = evaluate_folder(settings, runtime, folder, max(0, args.gallery))
    cfg = training_settings(settings)
    count = cfg.faithfulness_images if args.faithfulness is None else max(0, args.faithfulness)
    methods = (cfg.faithfulness_methods if args.methods is None else
               tuple(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in methods if m not in CAM_METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {unknown}; choose from {list(CAM_METHODS)}")
    if count and methods:
        from training.explanations import score_methods

        evaluation.faithfulness = score_methods(settings, runtime, folder, methods, count,
                                                cfg.seed, model_path)
    target = Path(model_path) if args.out is None else Path(args.out) / Path(model_path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    card = write_report(target, read_meta(model_path), evaluation)
    m = evaluation.metrics
    log.info("accuracy %.2f%%, ROC-AUC %.5f, ECE %.4f on %d images (%d skipped); card %s",
             100 * m["accuracy"], m["roc_auc"], m["ece"], m["n"], m["skipped"], card)
    return 0
