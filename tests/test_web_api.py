"""The web app over real HTTP (uvicorn on a free port): API, pages, files, security, upload."""
from __future__ import annotations

import json
import os
import threading
from urllib.parse import quote

import pytest

from engine.errors import ConfigError
from tests.helpers import image_bytes
from tests.web_helpers import Server, make_result, multipart, write_outbox
from watcher.config import WatcherSettings
from watcher.web.app import Source, create_app
from watcher.web.config import ServeSettings
from watcher.web.index import ResultsIndex

HOSTILE = ['<script>alert(1)</script>.jpg', 'quo"te\'s.jpg', "new\nline.jpg",
           "\u202egnp.exe.jpg", "x" * 196 + ".jpg", "=cmd|' /C calc'!A0.jpg"]


def _source(tmp_path, **kw) -> Source:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    return Source.for_outbox(tmp_path / "outbox", inbox, WatcherSettings(**kw))


@pytest.fixture()
def outbox_server(tmp_path):
    results = [make_result(i, label="uncertain" if i % 4 == 1 else None,
                           confidence=0.55 + i / 100) for i in range(12)]
    results += [make_result(12 + k, name=n) for k, n in enumerate(HOSTILE)]
    results.append(make_result(30, name="broken.jpg", status="error",
                               error="cannot decode: <b>not</b> an image"))
    write_outbox(tmp_path / "outbox", results, pictures=True)
    app = create_app(_source(tmp_path), ServeSettings(refresh_seconds=0))
    with Server(app) as server:
        yield server, tmp_path, results


def test_api_results_filters_and_cursor_pages(outbox_server):
    server, _, results = outbox_server
    data = server.json("/api/results?limit=5")
    assert [r["job_id"] for r in data["results"]] == [r.job_id for r in results[::-1][:5]]
    ids, cursor = [], ""
    while True:
        page = server.json("/api/results?limit=4" + (f"&cursor={quote(cursor)}" if cursor else ""))
        ids += [r["job_id"] for r in page["results"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert ids == [r.job_id for r in results[::-1]]
    unc = server.json("/api/results?label=uncertain")["results"]
    assert {r["job_id"] for r in unc} == {r.job_id for r in results if r.label == "uncertain"}
    err = server.json("/api/results?label=error")["results"]
    assert [r["input_path"] for r in err] == ["broken.jpg"] and err[0]["status"] == "error"
    conf = server.json("/api/results?min_conf=0.6&max_conf=0.62&sort=conf_asc")["results"]
    assert [r["confidence"] for r in conf] == pytest.approx([0.6, 0.61, 0.62])
    assert server.get("/api/results?min_conf=abc").status == 400
    assert server.get("/api/results?sort=nope").status == 400


def test_api_detail_status_health_and_unknown_ids(outbox_server):
    server, tmp_path, results = outbox_server
    one = server.json(f"/api/results/{results[3].job_id}")
    assert one["input_path"] == results[3].input_path and one["sha256"] == results[3].sha256
    assert set(one["urls"]) == {"detail", "gray", "heatmap", "overlay"}
    assert server.get("/api/results/no-such-job").status == 404
    assert server.get("/results/no-such-job").status == 404
    status = server.json("/api/status")
    assert status["index"]["rows"] == len(results) and status["daemon"]["state"] == "never started"
    (tmp_path / "outbox" / "status.json").write_text(json.dumps(
        {"state": "running", "pid": os.getpid(), "queue_depth": 3}))
    assert server.json("/api/status")["daemon"]["queue_depth"] == 3
    assert server.get("/healthz").status == 200


def test_pictures_and_photo_are_served_by_job_id_only(outbox_server):
    server, tmp_path, results = outbox_server
    r = results[0]
    reply = server.get(f"/files/{r.job_id}/overlay")
    assert reply.status == 200 and reply.headers["content-type"] == "image/jpeg"
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.body == (tmp_path / "outbox" / r.pictures["overlay"]).read_bytes()
    photo = server.get(f"/files/{r.job_id}/photo")
    assert photo.status == 200
    assert photo.body == (tmp_path / "outbox" / "processed" / r.input_path).read_bytes()
    assert server.get(f"/files/{results[-1].job_id}/overlay").status == 404   # error row
    for bad in ("/files/../../etc/passwd", "/files/%2e%2e/overlay", f"/files/{r.job_id}/..%2F..",
                f"/files/{r.job_id}/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                "/static/../app.py", "/static/%2e%2e/app.py", "/files/x/photo"):
        reply = server.get(bad)
        assert reply.status in (400, 404), bad
        assert b"root:" not in reply.body and b"import" not in reply.body


def test_a_csv_row_or_a_symlink_pointing_outside_is_not_served(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"SECRET")
    outbox = tmp_path / "outbox"
    (outbox / "gradcam").mkdir(parents=True)
    os.symlink(secret, outbox / "gradcam" / "link.overlay.jpg")
    (outbox / "processed").mkdir()
    os.symlink(tmp_path, outbox / "processed" / "sub")
    rows = [make_result(0, pictures={"overlay": "gradcam/../../secret.jpg"}),
            make_result(1, pictures={"overlay": "gradcam/link.overlay.jpg"}),
            make_result(2, pictures={"overlay": "/etc/passwd"}),
            make_result(3, name="sub/secret.jpg", pictures={"overlay": "failed/x.jpg"})]
    rows[3].sha256 = ""
    write_outbox(outbox, rows)
    with Server(create_app(_source(tmp_path), ServeSettings())) as server:
        for r in rows:
            for kind in ("overlay", "photo"):
                reply = server.get(f"/files/{r.job_id}/{kind}")
                assert reply.status == 404 and b"SECRET" not in reply.body, (r.job_id, kind)


def test_hostile_names_are_text_in_pages_and_headers_are_strict(outbox_server):
    server, _, results = outbox_server
    page = server.get("/")
    assert page.status == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert "<script>alert(1)" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in page.text
    assert "<script" not in page.text.replace('<script src="/static/app.js" defer></script>', "")
    for r in results[12:]:
        detail = server.get(f"/results/{quote(r.job_id, safe='')}")
        assert detail.status == 200
        assert "<script>alert" not in detail.text and "<b>not</b>" not in detail.text
    err = server.get(f"/results/{results[-1].job_id}")
    assert "cannot decode: &lt;b&gt;not&lt;/b&gt; an image" in err.text
    filtered = server.get("/?label=uncertain&sort=conf_desc")
    assert filtered.status == 200 and filtered.text.count('class="card ') == 3
    for path in ("/upload", "/dashboard", "/api/status"):
        assert server.get(path).status == 200, path


def test_host_header_of_another_name_is_refused(outbox_server):
    server, _, _ = outbox_server
    assert server.get("/api/status", Host="evil.example:8000").status == 400
    assert server.get("/api/status", Host=f"localhost:{server.port}").status == 200


def test_upload_lands_in_the_inbox_intact_and_atomically(outbox_server):
    server, tmp_path, _ = outbox_server
    inbox = tmp_path / "inbox"
    photos = [("a.jpg", image_bytes(seed=1)), ("../../evil/a.jpg", image_bytes(seed=2)),
              (".hidden.jpg", image_bytes(seed=3)), ("x.jpg.part", b"abc"),
              ("<img src=x onerror=alert(1)>.png", image_bytes(fmt="PNG", seed=4))]
    body, ctype = multipart(photos)
    origin = server.base
    reply = server.request("POST", "/api/upload", body, {"Content-Type": ctype, "Origin": origin})
    assert reply.status == 200, reply.text
    files = reply.json()["files"]
    assert [f["status"] for f in files] == ["queued", "queued", "queued", "refused", "queued"]
    assert [f["stored_as"] for f in files[:3]] == ["a.jpg", "a (1).jpg", "hidden.jpg"]
    assert "ignore" in files[3]["reason"]
    assert (inbox / "a.jpg").read_bytes() == photos[0][1]
    assert (inbox / "a (1).jpg").read_bytes() == photos[1][1]
    assert (inbox / files[4]["stored_as"]).read_bytes() == photos[4][1]
    assert sorted(os.listdir(inbox)) == sorted(f["stored_as"] for f in files if f["stored_as"])
    assert not (tmp_path / "evil").exists()


def test_upload_refusals_say_why(tmp_path):
    write_outbox(tmp_path / "outbox", [make_result(0)])
    scfg = ServeSettings(max_upload_bytes=1000, max_upload_files=2)
    with Server(create_app(_source(tmp_path), scfg)) as server:
        body, ctype = multipart([("big.jpg", b"x" * 5000)])
        reply = server.request("POST", "/api/upload", body, {"Content-Type": ctype})
        assert reply.status == 422 and "max_upload_bytes" in reply.json()["files"][0]["reason"]
        body, ctype = multipart([(f"{i}.jpg", b"x") for i in range(3)])
        reply = server.request("POST", "/api/upload", body, {"Content-Type": ctype})
        assert reply.status == 400 and "max_upload_files" in reply.json()["error"]
        body, ctype = multipart([("ok.jpg", b"x")])
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            reply = server.request("POST", "/api/upload", body, {"Content-Type": ctype, **headers})
            assert reply.status == 403 and "refused" in reply.json()["error"]
        assert os.listdir(tmp_path / "inbox") == []
    with Server(create_app(_source(tmp_path), ServeSettings(), read_only=True)) as server:
        reply = server.request("POST", "/api/upload", body, {"Content-Type": ctype})
        assert reply.status == 403
        assert server.get("/upload").status == 404
        assert 'href="/upload"' not in server.get("/").text
    bulk = Source.for_results(tmp_path / "outbox", "results.csv")
    with Server(create_app(bulk, ServeSettings())) as server:
        assert server.json("/api/results")["results"][0]["job_id"] == "t1-000000"
        assert server.request("POST", "/api/upload", body, {"Content-Type": ctype}).status == 403


def test_token_is_required_off_loopback_and_checked(tmp_path):
    write_outbox(tmp_path / "outbox", [make_result(0)])
    with pytest.raises(ConfigError, match="token"):
        create_app(_source(tmp_path), ServeSettings(), bound_host="0.0.0.0")
    token = "correct-horse-battery-staple"
    app = create_app(_source(tmp_path), ServeSettings(token=token), bound_host="0.0.0.0")
    with Server(app) as server:
        assert server.get("/api/results").status == 401
        assert server.get("/api/results", Authorization="Bearer wrong-token-000000").status == 401
        assert server.get("/api/results", Authorization=f"Bearer {token}").status == 200
        assert server.get("/").status == 303                    # to the login page
        assert server.get("/healthz").status == 200
        login = server.request("POST", "/login", f"token={token}".encode(),
                               {"Content-Type": "application/x-www-form-urlencoded"})
        assert login.status == 303
        cookie = login.headers["set-cookie"].split(";")[0]
        assert "httponly" in login.headers["set-cookie"].lower()
        assert server.get("/", Cookie=cookie).status == 200
        assert server.get("/api/status", Host="192.0.2.7:8000",          # reached by its IP
                          Authorization=f"Bearer {token}").status == 200


def test_the_index_follows_a_csv_growing_while_the_app_runs(tmp_path):
    csv = write_outbox(tmp_path / "outbox", [make_result(0)])
    app = create_app(_source(tmp_path), ServeSettings(refresh_seconds=0))
    with Server(app) as server:
        assert len(server.json("/api/results")["results"]) == 1
        stop = threading.Event()

        def writer():
            for i in range(1, 41):
                csv.append([make_result(i)])
            stop.set()

        t = threading.Thread(target=writer)
        t.start()
        while not stop.is_set():
            server.json("/api/results?limit=3")          # reads while the CSV grows
        t.join()
        with open(csv.path, "ab") as fh:
            fh.write(b'"crash-cut.jpg",dog,0.7')
        ids = [r["job_id"] for r in server.json("/api/results?limit=500")["results"]]
        assert ids == [f"t1-{i:06d}" for i in range(40, -1, -1)]
    # a restart reuses the index: nothing is read twice
    index = ResultsIndex(csv.path, tmp_path / "outbox" / ".pawcam-web.sqlite", 0)
    assert index.refresh() == 0 and index.total() == 41


def test_bulk_results_folder_can_be_served(tmp_path):
    out = tmp_path / "results"
    write_outbox(out, [make_result(i) for i in range(3)], pictures=True,
                 csv_name="predictions.csv")
    with Server(create_app(Source.for_results(out), ServeSettings())) as server:
        rows = server.json("/api/results")["results"]
        assert len(rows) == 3
        assert server.get(rows[0]["urls"]["overlay"]).status == 200
        assert server.get(f"/files/{rows[0]['job_id']}/photo").status == 404  # not kept
        assert 'href="/upload"' not in server.get("/").text
