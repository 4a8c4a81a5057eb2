"""deploy/*.service: valid for systemd and hardened (exposure <= 2.0 each), checked with the real
``systemd-analyze`` where it exists (Debian package ``systemd``; .ci/run installs it)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted((ROOT / "deploy").glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed "
                                   "(Debian package systemd)")


def test_daemon_unit_reloads_with_sighup():
    text = (ROOT / "deploy" / "pawcam.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "Type=notify" in text and "WatchdogSec=" in text


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(tmp_path, unit):
    # the units name /opt/pawcam/...; point ExecStart at a program that exists here
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/pawcam/.venv/bin/pawcam", "/bin/true"))
    out = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert unit.name not in out.stderr, out.stderr          # no warning about the unit


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_exposure_is_at_most_2(unit):
    out = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    found = re.search(rf"Overall exposure level for {re.escape(unit.name)}: ([0-9.]+)",
                      out.stdout)
    assert found, out.stdout[-2000:] + out.stderr
    assert float(found.group(1)) <= 2.0, out.stdout
