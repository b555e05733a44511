"""The systemd units: `systemd-analyze verify` clean, and the hardening the issue asks for."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import required

REPO = Path(__file__).resolve().parents[2]
UNITS = ("smtpd-agent.service", "smtpd-agent-worker.service")
# Where docs/operations.md installs the virtualenv; the units name its binary.
INSTALLED_BINARY = "/opt/smtpd-agent/venv/bin/smtpd-agent"


def directives(unit: str) -> dict[str, list[str]]:
    """`Key` -> every value it is given (systemd keys may repeat)."""
    values: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / unit).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.fixture
def systemd_analyze() -> str:
    return required(shutil.which("systemd-analyze"), "systemd-analyze", "systemd")


def test_systemd_analyze_verify_is_clean(systemd_analyze, tmp_path):
    """Verify both units as shipped, except that the binary path points at this checkout's
    (verify insists that ExecStart exists). Any output at all, even a warning about an
    unknown key that systemd would ignore, fails the test."""
    binary = Path(sys.prefix) / "bin" / "smtpd-agent"
    assert binary.exists(), binary
    paths = []
    for unit in UNITS:
        text = (REPO / "systemd" / unit).read_text()
        assert f"ExecStart={INSTALLED_BINARY} " in text, unit
        path = tmp_path / unit
        path.write_text(text.replace(INSTALLED_BINARY, str(binary)))
        paths.append(f"./{unit}")
    result = subprocess.run([systemd_analyze, "verify", "--man=no", *paths], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_sandbox_exposure_stays_low(systemd_analyze, tmp_path):
    """`systemd-analyze security` scores the sandbox (0 best, 10 worst); both units score
    about 1.9 ("OK"). The threshold (x10) catches a hardening line dropped by mistake."""
    binary = Path(sys.prefix) / "bin" / "smtpd-agent"
    for unit in UNITS:
        text = (REPO / "systemd" / unit).read_text().replace(INSTALLED_BINARY, str(binary))
        (tmp_path / unit).write_text(text)
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--threshold=25", "--no-pager",
         *(f"./{unit}" for unit in UNITS)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_units_run_unprivileged_and_hardened(unit):
    found = directives(unit)
    expected = {
        "User": "smtpd-agent", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "ReadWritePaths": "/var/lib/smtpd-agent",
        "SystemCallFilter": "@system-service", "Restart": "on-failure",
        "EnvironmentFile": "/etc/smtpd-agent/env",
    }
    for key, value in expected.items():
        assert found.get(key) == [value], (unit, key, found.get(key))
    assert "AF_INET" in found["RestrictAddressFamilies"][0].split()
    assert found["KillMode"] == ["mixed"]


def test_server_unit_binds_port_25_with_one_capability_and_notifies():
    found = directives("smtpd-agent.service")
    assert found["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert found["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert found["Type"] == ["notify"] and found["NotifyAccess"] == ["main"]
    assert found["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert found["ExecStart"] == [f"{INSTALLED_BINARY} serve"]
    # The stop timeout must outlast the default drain grace, or systemd kills mid-DATA.
    assert float(found["TimeoutStopSec"][0]) > 30


def test_worker_unit_has_no_capabilities():
    found = directives("smtpd-agent-worker.service")
    assert found["CapabilityBoundingSet"] == [""]
    assert "AmbientCapabilities" not in found
    assert found["ExecStart"] == [f"{INSTALLED_BINARY} worker"]
