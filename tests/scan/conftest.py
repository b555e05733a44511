"""Fixtures for the scanning stage: one real clamd per test session.

clamd is Debian's `clamav-daemon` (see tests/clamd.py). When it is not
installed the clamd tests are skipped with the reason, except under CI=true,
where a missing clamd is a failure: these tests are not optional there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpd_agent.config import ScanSettings
from smtpd_agent.scan import Scanner
from tests.clamd import APT_PACKAGES, Clamd, find_clamd


@pytest.fixture(scope="session")
def clamd_session() -> Iterator[Clamd]:
    binary = find_clamd()
    if binary is None:
        reason = f"clamd not installed (apt-get install -y {' '.join(APT_PACKAGES)})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    # /tmp, not pytest's deep tmp_path: a Unix socket path must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="smtpd-agent-clamd-"))
    server = Clamd(root=root, binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def clamd(clamd_session: Clamd) -> Iterator[Clamd]:
    """The session's clamd, guaranteed running (and not paused) before and after each test."""
    clamd_session.start()
    yield clamd_session
    if clamd_session.running:
        clamd_session.resume()
    else:
        clamd_session.start()


@pytest.fixture
def scan_settings(clamd: Clamd) -> ScanSettings:
    return ScanSettings(clamd=clamd.unix_address, required=True, timeout=5.0)


@pytest.fixture
def scanner(scan_settings: ScanSettings) -> Scanner:
    return Scanner(scan_settings)
