"""``pawcam predict``: the one-shot bulk run.

    pawcam predict photos/ more.jpg --out results/ --recursive
    pawcam predict photos/ --out results/ --no-gradcam --batch-size 64
    pawcam predict photos/ --out results/ --report     # + results/report.html
    pawcam predict photos/ --out results/ --resume    # after Ctrl-C, a crash, a lost node
    pawcam predict photos/ --out results/ --ray       # on a local Ray (pip install -e ".[ray]")
    pawcam predict /shared/photos --out /shared/results --ray auto   # on this machine's cluster
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine.config import Settings, replace
from engine.exitcodes import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE

log = logging.getLogger("pawcam")


def register(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "predict", parents=[parent], help="classify files and folders once, then exit",
        description="Classify image files and folders: writes OUT/predictions.csv (one row per "
                    "input, appended across runs) and Grad-CAM pictures in OUT/gradcam/.",
        epilog="Exit codes: 0 all inputs ok; 1 some inputs gave error rows; 2 usage/config "
               "error or no input; 3 model error; 4 the output folder's storage failed (disk "
               "full, read-only: the rows written so far are whole, the message says how "
               "many); 130 interrupted.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    p.add_argument("--out", "-o", type=Path, required=True, metavar="DIR",
                   help="output folder (created if missing)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into subfolders")
    p.add_argument("--no-gradcam", action="store_true",
                   help="predictions only: no Grad-CAM pictures (faster)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="override [inference] batch_size")
    p.add_argument("--resume", action="store_true",
                   help="skip inputs that already have an ok row in the results file (same "
                        "path and same content; a changed file is classified again): picks "
                        "up a run that was interrupted")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray (needs the ray extra): no ADDRESS = [cluster] address "
                        "(default: a local Ray started for the run), 'auto' = this machine's "
                        "cluster, ray://HOST:10001 = Ray Client. Multi-node: inputs, --out and "
                        "the model must be on storage every node sees at the same path")
    p.add_argument("--csv-name", default="predictions.csv", metavar="NAME",
                   help="name of the results file inside --out (default: predictions.csv)")
    p.add_argument("--report", action="store_true",
                   help="also write OUT/report.html (see `pawcam report`) at the end")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace, settings: Settings) -> int:
    from engine.bulk import run_bulk
    from engine.errors import ConfigError

    if args.no_gradcam:
        settings = replace(settings, gradcam=replace(settings.gradcam, enabled=False))
    if args.batch_size is not None:
        if not 1 <= args.batch_size <= 4096:
            raise ConfigError("--batch-size must be between 1 and 4096")
        settings = replace(settings, inference=replace(settings.inference,
                                                       batch_size=args.batch_size))
    if "/" in args.csv_name or args.csv_name in ("", ".", ".."):
        raise ConfigError("--csv-name must be a plain file name")
    if args.ray is not None:
        from engine.bulk_ray import run_bulk_ray

        summary = run_bulk_ray(args.paths, args.out, settings, address=args.ray or None,
                               recursive=args.recursive, csv_name=args.csv_name,
                               show_progress=not args.quiet, resume=args.resume)
    else:
        summary = run_bulk(args.paths, args.out, settings, recursive=args.recursive,
                           csv_name=args.csv_name, show_progress=not args.quiet,
                           resume=args.resume)
    for line in summary.lines():
        log.warning(line) if args.quiet and summary.errors else log.info(line)
    if summary.total == 0 and not summary.skipped:
        log.error("no input files found (use --recursive to enter subfolders)")
        return EXIT_USAGE
    if summary.total == 0:
        log.info("nothing left to do: every input already has an ok row")
    if args.report:
        from engine.report import write_report

        log.info("report: %s", write_report(args.out, args.csv_name))
    return EXIT_SOME_FAILED if summary.errors else EXIT_OK
