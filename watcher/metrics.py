"""Prometheus metrics of the daemon (``[watcher] metrics_port``; 0 = off, the default).

    m = DaemonMetrics.start(wcfg.metrics_host, wcfg.metrics_port)   # NullMetrics when port 0
    m.model("1.2.0"); m.state("running")
    m.inference(0.12, 16)                                          # one model call
    m.batch(results, ready_ats, seconds, queue_depth)              # one committed batch
    m.latency_summary()                                            # (p50, p95) of recent files

Metric names follow Prometheus conventions (``_total`` counters, ``_seconds`` units, an
``_info`` gauge). The same object keeps the last files' ready-to-row latencies so the status
file (and so the web dashboard) shows p50/p95 even with the exporter off. Each daemon has its
own registry: nothing global, so tests can run several.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Iterable, Sequence

from engine.errors import ConfigError
from engine.results import Result

log = logging.getLogger("pawcam.watch")

LATENCY_WINDOW = 1000   # recent files kept for the status file's p50/p95
STATES = ("starting", "running", "degraded", "stopping", "stopped")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile: ``percentile([1, 2, 3, 4], 0.5)`` -> 2."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 1)) - 1))
    return ordered[k]


class NullMetrics:
    """Metrics off: records only the latency window (for the status file)."""

    def __init__(self) -> None:
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def model(self, version: str) -> None: ...
    def state(self, state: str) -> None: ...
    def inference(self, seconds: float, images: int) -> None: ...
    def stop(self) -> None: ...

    def batch(self, results: Sequence[Result], ready_ats: Iterable[float], seconds: float,
              queue_depth: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.latencies.extend(max(0.0, now - t) for t in ready_ats if t)

    def latency_summary(self) -> tuple[float | None, float | None]:
        lat = list(self.latencies)
        return percentile(lat, 0.5), percentile(lat, 0.95)


class DaemonMetrics(NullMetrics):
    """The exporter: an HTTP server on ``host:port`` serving ``/metrics``."""

    def __init__(self) -> None:
        super().__init__()
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.files = Counter("pawcam_files_processed", "Files with a committed row, by status "
                             "and label", ["status", "label"], registry=r)
        self.batch_size = Histogram("pawcam_batch_size", "Files per committed batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference_s = Histogram("pawcam_inference_seconds", "Seconds per model call "
                                     "(probabilities + Grad-CAM for one batch)",
                                     buckets=INFERENCE_BUCKETS, registry=r)
        self.latency_s = Histogram("pawcam_ready_to_row_seconds", "Seconds from a file being "
                                   "ready in the inbox to its committed row",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("pawcam_queue_depth", "Files seen and not yet committed", registry=r)
        self.last_batch = Gauge("pawcam_last_batch_timestamp_seconds",
                                "Unix time of the last committed batch", registry=r)
        self.info = Gauge("pawcam_model_info", "The loaded model (value 1)", ["version"],
                          registry=r)
        self.up = Gauge("pawcam_up", "1 while the daemon is up and watching (running or degraded)",
                        registry=r)
        self.state_g = Gauge("pawcam_state", "The daemon's state (1 for the current one)",
                             ["state"], registry=r)
        Gauge("pawcam_start_time_seconds", "Unix time the daemon started",
              registry=r).set(time.time())
        self._server = None
        self._thread = None

    @classmethod
    def start(cls, host: str, port: int) -> NullMetrics:
        """The exporter listening on ``host:port``, or :class:`NullMetrics` when port is 0."""
        if not port:
            return NullMetrics()
        try:
            from prometheus_client import start_http_server
        except ImportError as exc:
            raise ConfigError("[watcher] metrics_port is set but prometheus_client is not "
                              "installed: pip install 'pawcam[web]' (make setup installs it), "
                              "or set metrics_port = 0") from exc
        m = cls()
        try:
            m._server, m._thread = start_http_server(port, addr=host, registry=m.registry)
        except OSError as exc:
            raise ConfigError(f"[watcher] metrics_port {port} on {host}: {exc.strerror or exc} "
                              "(another daemon on that port? pick another or 0 for off)") from exc
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
        return m

    def model(self, version: str) -> None:
        self.info.clear()
        self.info.labels(version=version).set(1)

    def state(self, state: str) -> None:
        for s in STATES:
            self.state_g.labels(state=s).set(1 if s == state else 0)
        self.up.set(1 if state in ("running", "degraded") else 0)

    def inference(self, seconds: float, images: int) -> None:
        self.inference_s.observe(seconds)

    def batch(self, results: Sequence[Result], ready_ats: Iterable[float], seconds: float,
              queue_depth: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        ready_ats = list(ready_ats)
        super().batch(results, ready_ats, seconds, queue_depth, now)
        for r in results:
            self.files.labels(status=r.status, label=r.label or r.status).inc()
        for t in ready_ats:
            if t:
                self.latency_s.observe(max(0.0, now - t))
        self.batch_size.observe(len(results))
        self.queue.set(queue_depth)
        self.last_batch.set(time.time())

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
