"""``pawcam watch`` and ``pawcam status`` (registered through the pawcam.commands entry points).

    pawcam watch                                  # run the daemon (Ctrl-C / SIGTERM to stop)
    pawcam watch --inbox in/ --outbox out/ --once # take what is there now, then exit
    pawcam status                                 # the daemon's status file, readably

Importing this module is cheap (no TensorFlow): the model is loaded by the handler.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engine.config import Settings, replace

log = logging.getLogger("pawcam")


def register_watch(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "watch", parents=[parent], help="watch the inbox and classify every file dropped in it",
        description="Run the inbox daemon: every file dropped, copied or moved into the inbox "
                    "(subfolders included) gets exactly one row in OUTBOX/results.csv plus "
                    "Grad-CAM pictures; inputs then move to OUTBOX/processed/ or, with a note "
                    "saying why, OUTBOX/failed/. Stop with SIGTERM or Ctrl-C: the batch in hand "
                    "is finished first; SIGHUP reloads the model and settings. A full or "
                    "read-only outbox or a removed inbox makes it 'degraded' (see `pawcam "
                    "status`) until the fault is gone; it does not exit. Settings: the "
                    "[watcher] section of config.toml.",
        epilog="Exit codes: 0 stopped cleanly; 1 fatal error (claimed files are taken over at "
               "the next start); 2 usage/config error; 3 model error; 4 --once stopped by a "
               "storage fault (disk full, read-only: the next start takes over).")
    p.add_argument("--inbox", type=Path, metavar="DIR", help="override [paths] inbox")
    p.add_argument("--outbox", type=Path, metavar="DIR", help="override [paths] outbox")
    p.add_argument("--once", action="store_true",
                   help="process what is in the inbox (and any crash leftovers), then exit")
    p.add_argument("--polling", action="store_true",
                   help="use the polling observer (as [watcher] observer = \"polling\")")
    p.set_defaults(func=run_watch)


def _with_paths(args: argparse.Namespace, settings: Settings) -> Settings:
    paths = settings.paths
    if getattr(args, "inbox", None) is not None:
        paths = replace(paths, inbox=args.inbox.resolve())
    if getattr(args, "outbox", None) is not None:
        paths = replace(paths, outbox=args.outbox.resolve())
    return replace(settings, paths=paths)


def run_watch(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    # a SIGHUP during start-up must not end the daemon (its default action): the model is
    # being loaded from the configuration just read anyway
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from watcher.config import watcher_settings
    from watcher.daemon import Daemon

    settings = _with_paths(args, settings)
    wcfg = watcher_settings(settings)
    if args.polling:
        wcfg = replace(wcfg, observer="polling")
    return Daemon(settings, wcfg, once=args.once).run()


def register_status(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "status", parents=[parent], help="show the inbox daemon's status",
        description="Print the status file the daemon keeps in the outbox: state, counts, "
                    "queue depth, last batch, model version.",
        epilog="Exit codes: 0 printed; 1 no status file (the daemon never ran with this outbox).")
    p.add_argument("--outbox", type=Path, metavar="DIR", help="override [paths] outbox")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=run_status)


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    from watcher.config import watcher_settings
    from watcher.status import format_status, read_status

    settings = _with_paths(args, settings)
    path = Path(settings.paths.outbox) / watcher_settings(settings).status_file
    try:
        data = read_status(path)
    except FileNotFoundError:
        log.error("no status file at %s: the daemon has not run with this outbox "
                  "(start it with `pawcam watch`)", path)
        return 1
    except (OSError, ValueError) as exc:
        log.error("cannot read %s: %s", path, exc)
        return 1
    out = json.dumps(data, indent=2, ensure_ascii=False) if args.json else format_status(data, path)
    sys.stdout.write(out + "\n")
    return 0
