"""The web app and the metrics with a real ``pawcam watch`` process (tiny model).

One daemon per test costs a TensorFlow import, so one test covers: Prometheus metrics scraped
and parsed after a batch, an upload through the real server classified by the daemon, the
dashboard's figures from the daemon's status file, and ``pawcam serve`` as a real process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import image_bytes, write_image
from tests.test_watcher_helpers import DaemonProc, env, wait_rows, write_config
from tests.web_helpers import free_port, multipart


def scrape(port: int) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, name, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x
                                                            for k, x in labels.items()))


def http(port: int, path: str, data: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers=headers or {})
    with urllib.request.urlopen(req, timeout=20) as resp:
        return resp.status, resp.read()


def wait_http(proc: subprocess.Popen, port: int, log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pawcam serve exited {proc.returncode}: {log.read_text()}")
        try:
            http(port, "/healthz")
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"pawcam serve did not answer: {log.read_text()}")


@pytest.mark.slow
def test_metrics_upload_and_dashboard_with_a_real_daemon(tmp_path, tiny_model_path):
    mport, wport = free_port(), free_port()
    cfg = write_config(tmp_path, tiny_model_path, metrics_port=mport)
    with open(cfg, "a", encoding="utf-8") as fh:
        fh.write(f"[serve]\nport = {wport}\nrefresh_seconds = 0.0\n")
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProc(cfg)
    serve_log = tmp_path / "serve.log"
    serve = None
    try:
        daemon.wait_running()
        before = scrape(mport)
        assert value(before, "pawcam_up") == 1
        assert value(before, "pawcam_model_info", version="tiny-test-1") == 1
        for i in range(3):
            write_image(inbox / f"m{i}.jpg", seed=i)
        (inbox / "bad.jpg").write_bytes(b"not a picture")
        wait_rows(daemon, outbox, 4, 60)
        deadline = time.monotonic() + 10
        while True:  # the row is committed just before the metrics are updated
            after = scrape(mport)
            if value(after, "pawcam_files_processed_total") >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert value(after, "pawcam_files_processed_total") == 4
        assert value(after, "pawcam_files_processed_total", status="error", label="error") == 1
        assert value(after, "pawcam_files_processed_total", status="ok") == 3
        assert value(after, "pawcam_ready_to_row_seconds_count") == 4
        assert value(after, "pawcam_ready_to_row_seconds_sum") > 0
        assert value(after, "pawcam_inference_seconds_count") >= 1
        assert value(after, "pawcam_batch_size_sum") == 4
        assert value(after, "pawcam_last_batch_timestamp_seconds") > time.time() - 120
        assert value(after, "pawcam_queue_depth") == 0
        status = json.loads((outbox / "status.json").read_text())
        assert status["latency_p50_s"] > 0 and status["latency_p95_s"] >= status["latency_p50_s"]

        # -- pawcam serve as users start it, and an upload the daemon classifies -------------
        serve = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "--config", str(cfg), "serve"],
            stdout=open(serve_log, "ab"), stderr=subprocess.STDOUT, env=env(), cwd=tmp_path)
        wait_http(serve, wport, serve_log)
        data = image_bytes(width=80, height=60, seed=42)
        body, ctype = multipart([("from the browser.jpg", data)])
        code, reply = http(wport, "/api/upload", body, {"Content-Type": ctype,
                                                         "Origin": f"http://127.0.0.1:{wport}"})
        up = json.loads(reply)["files"][0]
        assert code == 200 and up["status"] == "queued", up
        rows = wait_rows(daemon, outbox, 5, 60)
        assert rows[-1]["input_path"] == "from the browser.jpg" and rows[-1]["status"] == "ok"
        assert (outbox / "processed" / "from the browser.jpg").read_bytes() == data
        q = f"/api/results?path={urllib.request.quote(up['stored_as'])}&since={up['uploaded_at']}"
        found = json.loads(http(wport, q)[1])["results"]
        assert len(found) == 1 and found[0]["status"] == "ok"
        code, photo = http(wport, found[0]["urls"]["detail"].replace("/results/", "/files/")
                           + "/photo")
        assert photo == data
        code, page = http(wport, "/dashboard")
        text = page.decode()
        assert code == 200 and "running" in text and "tiny-test-1" in text
        assert "5 files, 1 errors" in text and "<svg" in text
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(timeout=10)
        daemon.stop()
    # the exporter goes away with the daemon
    with pytest.raises(OSError):
        scrape(mport)
