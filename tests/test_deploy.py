"""deploy/pawcam.service: valid for systemd and hardened (exposure <= 2.0), checked with the real
``systemd-analyze`` where it exists (Debian package ``systemd``; .ci/run installs it)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "pawcam.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed "
                                   "(Debian package systemd)")


def test_unit_reloads_with_sighup_and_waits_out_faults():
    text = UNIT.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "Type=notify" in text and "WatchdogSec=" in text


@needs_analyze
def test_unit_verifies(tmp_path):
    # the unit names /opt/pawcam/...; point ExecStart at a program that exists here
    unit = tmp_path / "pawcam.service"
    unit.write_text(UNIT.read_text().replace("/opt/pawcam/.venv/bin/pawcam", "/bin/true"))
    out = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pawcam.service" not in out.stderr, out.stderr   # no warning about the unit


@needs_analyze
def test_unit_exposure_is_at_most_2(tmp_path):
    out = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for pawcam\.service: ([0-9.]+)", out.stdout)
    assert found, out.stdout[-2000:] + out.stderr
    assert float(found.group(1)) <= 2.0, out.stdout
