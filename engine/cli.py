"""The ``pawcam`` command.

    pawcam predict photos/ --out results/ --recursive
    pawcam watch                   # from the watcher package
    pawcam train --data DIR        # from the training package
    pawcam --help

The engine owns the entry point and the ``predict`` subcommand. Other packages add
subcommands through the ``pawcam.commands`` entry-point group (see pyproject.toml): each entry
point is a ``register(subparsers)`` function that adds a parser and sets
``func=handler(args, settings) -> int`` on it. That keeps the engine free of imports of the
packages built on it.

Exit codes (:mod:`engine.exitcodes`): 0 success; 1 some inputs failed (results still written);
2 usage or configuration error; 3 model could not be loaded; 4 the output storage failed (disk
full, read-only, ...: the rows written so far are whole); 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Sequence

from engine import __version__
from engine.bulk_cli import register as register_predict
from engine.config import PRECISIONS, RUNTIMES, Settings, load_settings, replace
from engine.errors import ConfigError, ModelLoadError, PawcamError, StorageError
from engine.exitcodes import (EXIT_INTERRUPTED, EXIT_MODEL, EXIT_OK, EXIT_SOME_FAILED,  # noqa: F401
                              EXIT_STORAGE, EXIT_USAGE)

DEFAULT_CONFIG = Path("config.toml")
#: modules that come with an extra (pyproject.toml), and which one
OPTIONAL_MODULES = {"tensorflow": "train", "keras": "train", "matplotlib": "train",
                    "onnx": "train", "tf2onnx": "train"}
log = logging.getLogger("pawcam")

Handler = Callable[[argparse.Namespace, Settings], int]


def _add_common(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """--config/-v/-q; accepted before or after the subcommand (``suppress`` for the latter,
    so a subcommand's unset option does not overwrite one given before it)."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--config", type=Path, default=default(None), metavar="PATH",
                        help="settings file (default: ./config.toml if present, else built-in "
                             "defaults)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=default(None),
                        help="what runs the model (overrides [inference] runtime): onnxruntime, "
                             "tensorflow or auto")
    parser.add_argument("--precision", choices=PRECISIONS, default=default(None),
                        help="ONNX Runtime precision (overrides [inference] precision)")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=default(0),
                           help="more log output (-vv for debug)")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=default(False),
                           help="only warnings and errors")


def common_options() -> argparse.ArgumentParser:
    """Parent parser with --config/-v/-q, for subcommands added by other packages."""
    parent = argparse.ArgumentParser(add_help=False)
    _add_common(parent, suppress=True)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pawcam",
        description="Cat-vs-dog photo classifier with Grad-CAM explanations.",
        epilog="Exit codes: 0 ok, 1 some inputs failed, 2 usage/config error, "
               "3 model error, 4 output storage failed (disk full, read-only), 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"pawcam {__version__}")
    _add_common(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_predict(subparsers, common_options())
    for ep in sorted(entry_points(group="pawcam.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as exc:  # a broken plugin must not take `predict` down with it
            logging.getLogger(__name__).warning("subcommand %r unavailable: %s", ep.name, exc)
            continue
        register(subparsers, common_options())
    return parser


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO if verbose < 2 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # TensorFlow's C++ start-up chatter is not for users; -vv shows it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose >= 2 else "2")
    if verbose < 2:
        logging.getLogger("absl").setLevel(logging.ERROR)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)


def with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    """``--runtime`` / ``--precision`` given anywhere on the command line win over the file."""
    changes = {key: getattr(args, key) for key in ("runtime", "precision")
               if getattr(args, key, None)}
    if not changes:
        return settings
    inference = replace(settings.inference, **changes)
    inference.validate("command line")
    return replace(settings, inference=inference)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        if args.config is None:
            settings = load_settings(DEFAULT_CONFIG, required=False)
        else:
            settings = load_settings(args.config)
        return int(args.func(args, with_overrides(settings, args)))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_USAGE
    except ModelLoadError as exc:
        log.error("model error: %s", exc)
        return EXIT_MODEL
    except StorageError as exc:
        log.error("%s", exc)
        return EXIT_STORAGE
    except PawcamError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        if exc.name not in OPTIONAL_MODULES:
            raise
        log.error("%s is not installed: %s needs the %r extra (pip install 'pawcam[%s]', or "
                  "`make setup`)", exc.name, args.command, OPTIONAL_MODULES[exc.name],
                  OPTIONAL_MODULES[exc.name])
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
