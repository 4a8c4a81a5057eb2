"""The web app in a real headless browser: Debian's Chromium driven by Selenium.

Loads the results page, filters to ``uncertain``, opens a detail page, checks hostile names
show as text, and uploads a photo through the page's file input that a real daemon then
classifies (the row appears on the page). Skips, saying why, where Chromium or its driver is
missing; in CI (CI=true; .ci/run installs them) a missing browser is a failure instead.
With PAWCAM_SCREENSHOTS=DIR the pages are saved there as JPEGs (README's screenshots).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import write_image
from tests.test_watcher_helpers import DaemonProc, wait_rows, write_config
from tests.web_helpers import Server, make_result, write_outbox
from watcher.config import WatcherSettings
from watcher.web.app import Source, create_app
from watcher.web.config import ServeSettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
HOSTILE = '<script>alert("x")</script> \u202eevil.jpg'


def _browser():
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not p]
    if missing:
        reason = (f"{' and '.join(missing)} not installed: apt-get install chromium "
                  "chromium-driver (CI installs them)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)


def _wait(fn, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _shot(driver, name: str) -> None:
    folder = os.environ.get("PAWCAM_SCREENSHOTS")
    if folder:
        import io

        from PIL import Image

        Path(folder).mkdir(parents=True, exist_ok=True)
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        shot.save(Path(folder) / f"{name}.jpg", quality=82)


def _images_loaded(driver) -> bool:
    return driver.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")


@pytest.mark.slow
def test_browse_filter_detail_and_upload_classified_by_a_real_daemon(tmp_path, tiny_model_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    cfg = write_config(tmp_path, tiny_model_path)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProc(cfg)
    driver = None
    try:
        # rows from a real run of the daemon, plus a hostile name
        daemon.wait_running()
        for i in range(8):
            write_image(inbox / f"photo{i}.jpg", seed=i, width=96, height=72)
        write_image(inbox / HOSTILE.replace("/", "_"), seed=50)
        (inbox / "broken.jpg").write_bytes(b"not a picture at all")
        wait_rows(daemon, outbox, 10, 60)
        # a few synthetic uncertain rows so the filter has something to find whatever the
        # tiny model says (appended by the same CSV writer)
        write_outbox(outbox, [make_result(900 + i, label="uncertain", confidence=0.52 + i / 100,
                                          name=f"unsure{i}.jpg") for i in range(3)])
        app = create_app(Source.for_outbox(outbox, inbox, WatcherSettings()),
                         ServeSettings(refresh_seconds=0))
        with Server(app) as server:
            driver = _browser()
            driver.get(server.base + "/")
            cards = driver.find_elements(By.CSS_SELECTOR, "article.card")
            assert len(cards) == 13
            _wait(lambda: _images_loaded(driver), what="thumbnails")
            names = [e.get_attribute("textContent") for e in
                     driver.find_elements(By.CSS_SELECTOR, "article.card .name")]
            assert HOSTILE.replace("/", "_") in names          # shown as text, not run
            assert driver.execute_script("return window.__xss === undefined")
            _shot(driver, "results")

            Select(driver.find_element(By.ID, "f-label")).select_by_value("uncertain")
            driver.find_element(By.ID, "f-apply").click()
            _wait(lambda: "label=uncertain" in driver.current_url, what="filtered page")
            labels = {e.text for e in driver.find_elements(By.CSS_SELECTOR, "article.card .label")}
            assert labels == {"uncertain"}
            assert len(driver.find_elements(By.CSS_SELECTOR, "article.card")) >= 3

            driver.get(server.base + "/?q=photo3")              # a row of the daemon's
            driver.find_elements(By.CSS_SELECTOR, "article.card a")[0].click()
            _wait(lambda: "/results/" in driver.current_url, what="detail page")
            for kind in ("photo", "overlay", "heatmap", "gray"):
                assert driver.find_element(By.ID, f"pic-{kind}")
            _wait(lambda: _images_loaded(driver), what="detail pictures")
            assert "P(dog)" in driver.find_element(By.ID, "facts").text
            _shot(driver, "detail")

            driver.get(server.base + "/upload")
            upload = tmp_path / "staging" / "dropped from the browser.jpg"
            write_image(upload, seed=77, width=120, height=90)
            driver.find_element(By.ID, "upload-input").send_keys(str(upload))
            row = _wait(lambda: [r for r in driver.find_elements(By.CSS_SELECTOR, "tr.upload-row")
                                 if r.get_attribute("data-status") in ("ok", "error")],
                        timeout=60, what="the uploaded photo's row")[0]
            assert row.get_attribute("data-status") == "ok", row.text
            assert row.find_element(By.CSS_SELECTOR, ".result-link").text.split()[0] in (
                "cat", "dog", "uncertain")
            _shot(driver, "upload")
            rows = wait_rows(daemon, outbox, 11, 5)
            assert rows[-1]["input_path"] == "dropped from the browser.jpg"
            assert (outbox / "processed" / "dropped from the browser.jpg").read_bytes() == \
                upload.read_bytes()

            driver.get(server.base + "/dashboard")
            assert "running" in driver.find_element(By.ID, "d-state").text
            assert driver.find_elements(By.CSS_SELECTOR, "svg.chart")
            _shot(driver, "dashboard")
            logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            assert not logs, logs                               # no CSP violations, no JS errors
    finally:
        if driver is not None:
            driver.quit()
        daemon.stop()


@pytest.mark.slow
@pytest.mark.shared
def test_shipped_model_on_real_photos_in_the_browser(tmp_path, shared_dir):
    """The shipped model through a real daemon on 6 cats and 6 dogs of ../shared: the results
    page shows the right labels, the detail page the photo and pictures (the README's
    screenshots come from here with PAWCAM_SCREENSHOTS=docs/screenshots)."""
    from selenium.webdriver.common.by import By

    model = Path(__file__).resolve().parents[1] / "models" / "cat_dog_model.keras"
    cfg = write_config(tmp_path, model)
    cfg.write_text(cfg.read_text().replace("max_side = 64", "max_side = 320"))
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    daemon = DaemonProc(cfg)
    driver = None
    try:
        daemon.wait_running(timeout=180)
        for label in ("cat", "dog"):
            for src in sorted((shared_dir / "dataset" / "test" / label).glob("*.jpg"))[:6]:
                shutil.copyfile(src, tmp_path / src.name)
                os.rename(tmp_path / src.name, inbox / src.name)
        rows = wait_rows(daemon, outbox, 12, 120)
        right = sum(r["label"] == r["input_path"].split(".")[0] for r in rows)
        assert right >= 11, [(r["input_path"], r["label"]) for r in rows]
        app = create_app(Source.for_outbox(outbox, inbox, WatcherSettings()),
                         ServeSettings(refresh_seconds=0))
        with Server(app) as server:
            driver = _browser()
            driver.get(server.base + "/")
            _wait(lambda: _images_loaded(driver), what="thumbnails")
            shown = {e.get_attribute("textContent"): e for e in
                     driver.find_elements(By.CSS_SELECTOR, "article.card .name")}
            assert len(shown) == 12
            labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "article.card .label")]
            assert labels.count("cat") >= 5 and labels.count("dog") >= 5
            _shot(driver, "results")
            driver.get(server.base + "/?label=dog&sort=conf_desc")
            driver.find_elements(By.CSS_SELECTOR, "article.card a")[0].click()
            _wait(lambda: "/results/" in driver.current_url, what="detail page")
            _wait(lambda: _images_loaded(driver), what="detail pictures")
            assert driver.find_element(By.ID, "detail-label").text == "dog"
            _shot(driver, "detail")
            driver.get(server.base + "/dashboard")
            assert "running" in driver.find_element(By.ID, "d-state").text
            _shot(driver, "dashboard")
    finally:
        if driver is not None:
            driver.quit()
        daemon.stop()


def test_report_opens_from_disk_and_filters_in_the_page(tmp_path):
    """`pawcam report`'s file in a real browser, from file://, no server: the gallery filters."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from engine.report import write_report

    rows = [make_result(i, label="uncertain" if i % 3 == 0 else None) for i in range(9)]
    rows.append(make_result(20, name=HOSTILE.replace("/", "_"), status="error", error="<b>x</b>"))
    write_outbox(tmp_path / "out", rows, pictures=True, csv_name="predictions.csv")
    report = write_report(tmp_path / "out")
    driver = _browser()
    try:
        driver.get(report.as_uri())
        _wait(lambda: _images_loaded(driver), what="gallery pictures")
        shown = lambda: driver.find_element(By.ID, "shown").text  # noqa: E731
        assert shown() == "10"
        Select(driver.find_element(By.ID, "f-label")).select_by_value("error")
        assert shown() == "1"
        visible = [c for c in driver.find_elements(By.CSS_SELECTOR, "article.card")
                   if c.is_displayed()]
        assert visible[0].find_element(By.CSS_SELECTOR, ".name").text == HOSTILE.replace("/", "_")
        Select(driver.find_element(By.ID, "f-label")).select_by_value("uncertain")
        assert shown() == "3"
        driver.find_element(By.ID, "f-q").send_keys("photo0003")
        assert shown() == "1"
        assert driver.execute_script("return window.__xss === undefined")
        assert not [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    finally:
        driver.quit()
