"""``pawcam serve`` and ``pawcam report`` (registered through the pawcam.commands entry points).

    pawcam serve                                  # the daemon's outbox, http://127.0.0.1:8000
    pawcam serve --results results/ --port 8080   # a bulk run's output (no upload)
    pawcam serve --read-only                      # no upload page, POST refused
    pawcam report results/                        # results/report.html, opens from disk

Importing this module is cheap (no TensorFlow, no Starlette): the handlers import what they use.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine.config import Settings, replace
from engine.errors import ConfigError

log = logging.getLogger("pawcam")


def register_serve(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "serve", parents=[parent], help="web app: browse results, upload photos, dashboard",
        description="Serve the results as web pages and a JSON API: results with filters, a "
                    "detail page per photo with its Grad-CAM pictures, an upload page that drops "
                    "photos into the daemon's inbox, and a dashboard. Listens on loopback unless "
                    "[serve] host says otherwise (then a token is required). Settings: the "
                    "[serve] section of config.toml.",
        epilog="Exit codes: 0 stopped; 2 usage/config error (missing web extra: pip install "
               "'pawcam[web]').")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--outbox", type=Path, metavar="DIR",
                     help="the daemon's outbox (default: [paths] outbox)")
    src.add_argument("--results", type=Path, metavar="DIR",
                     help="a bulk run's --out folder (predictions.csv) instead; no upload")
    p.add_argument("--inbox", type=Path, metavar="DIR",
                   help="where uploads go (default: [paths] inbox)")
    p.add_argument("--csv-name", default=None, metavar="NAME",
                   help="results file inside the folder (default: [watcher] results_csv, or "
                        "predictions.csv with --results)")
    p.add_argument("--host", default=None, help="listen address (default: [serve] host)")
    p.add_argument("--port", type=int, default=None, help="port (default: [serve] port)")
    p.add_argument("--read-only", action="store_true", help="hide upload, refuse POST")
    p.add_argument("--index", type=Path, metavar="PATH",
                   help="SQLite index file (default: [serve] index_path, else beside the CSV)")
    p.set_defaults(func=run_serve)


def build_source(args: argparse.Namespace, settings: Settings):
    from watcher.config import watcher_settings
    from watcher.web.state import Source

    if args.results is not None:
        folder = args.results.resolve()
        if not folder.is_dir():
            raise ConfigError(f"--results {folder}: no such folder (a `pawcam predict --out` "
                              "folder)")
        return Source.for_results(folder, args.csv_name or "predictions.csv")
    wcfg = watcher_settings(settings)
    if args.csv_name:
        wcfg = replace(wcfg, results_csv=args.csv_name)
    outbox = (args.outbox or Path(settings.paths.outbox)).resolve()
    inbox = (args.inbox or Path(settings.paths.inbox)).resolve()
    if not outbox.is_dir():
        raise ConfigError(f"outbox {outbox} does not exist: start the daemon once (`pawcam "
                          "watch`) or pass --outbox DIR / --results DIR")
    return Source.for_outbox(outbox, inbox if inbox.is_dir() else None, wcfg)


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import uvicorn

        from watcher.web.app import create_app
    except ImportError as exc:
        raise ConfigError(f"pawcam serve needs the web extra ({exc.name} missing): "
                          "pip install 'pawcam[web]' (make setup installs it)") from exc
    from watcher.web.config import serve_settings

    scfg = serve_settings(settings)
    if args.index is not None:
        scfg = replace(scfg, index_path=str(args.index.resolve()))
    host = args.host or scfg.host
    port = scfg.port if args.port is None else args.port
    source = build_source(args, settings)
    app = create_app(source, scfg, read_only=args.read_only or scfg.read_only, bound_host=host)
    log.info("serving %s on http://%s:%d/%s", source.csv_path,
             f"[{host}]" if ":" in host else host, port, " (read-only)"
             if args.read_only or scfg.read_only else "")
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False,
                proxy_headers=False, access_log=False)
    return 0

