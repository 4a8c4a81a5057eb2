"""Helpers for the web tests (no tests here): synthetic outboxes and a real uvicorn server."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.results import Result, ResultsCsv
from tests.helpers import image_bytes, write_image

CLASSES = ("cat", "dog")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_result(i: int, name: str | None = None, label: str | None = None,
                confidence: float = 0.9, status: str = "ok", error: str = "",
                processed_at: str = "", pictures: dict | None = None) -> Result:
    label = label if label is not None else CLASSES[i % 2]
    dog = confidence if label == "dog" else 1 - confidence
    r = Result(input_path=name or f"photo{i:04d}.jpg", job_id=f"t1-{i:06d}", status=status,
               label="" if status == "error" else label,
               confidence=None if status == "error" else confidence,
               probabilities={} if status == "error" else {"cat": 1 - dog, "dog": dog},
               pictures=pictures or {}, width=64, height=48, error=error,
               model_version="tiny-test-1", sha256=f"{i:064x}")
    if processed_at:
        r.processed_at = processed_at
    return r


def write_outbox(outbox: Path, results: list[Result], pictures: bool = False,
                 csv_name: str = "results.csv") -> ResultsCsv:
    """Append ``results`` to ``outbox/csv_name``; with ``pictures``, real JPEG files for each
    ok row under gradcam/ and its photo under processed/ (sha256 set to match)."""
    import hashlib

    outbox.mkdir(parents=True, exist_ok=True)
    for k, r in enumerate(results):
        if pictures and r.ok:
            for kind in ("gray", "heatmap", "overlay"):
                rel = f"gradcam/{Path(r.input_path).stem[:40]}.{r.job_id}.{kind}.jpg"
                write_image(outbox / rel, seed=k)
                r.pictures[kind] = rel
            data = image_bytes(seed=1000 + k)
            photo = outbox / "processed" / r.input_path
            photo.parent.mkdir(parents=True, exist_ok=True)
            photo.write_bytes(data)
            r.sha256 = hashlib.sha256(data).hexdigest()
    csv = ResultsCsv(outbox / csv_name, CLASSES)
    csv.append(results)
    return csv


class Server:
    """A real uvicorn server for ``app`` on a free loopback port, in a thread."""

    def __init__(self, app, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.host, self.port = host, free_port()
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> "Reply":
        con = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            con.request(method, path, body=body, headers=headers or {})
            resp = con.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            con.close()

    def get(self, path: str, **headers: str) -> "Reply":
        return self.request("GET", path, headers=headers)

    def json(self, path: str) -> Any:
        reply = self.get(path)
        assert reply.status == 200, (reply.status, reply.body[:500])
        return json.loads(reply.body)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    """A multipart/form-data body with ``files`` = [(filename, bytes)]; returns (body, type)."""
    boundary = "pawcamtestboundary7d1f"
    out = bytearray()
    for name, data in files:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "%0D").replace(
            "\n", "%0A")
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{quoted}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                ).encode("utf-8")
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"
