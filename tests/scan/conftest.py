"""Fixtures for the scanning stage: one real clamd per test session.

clamd is Debian's `clamav-daemon` (see tests/clamd.py). When it is not
installed the clamd tests are skipped with the reason, except under CI=true,
where a missing clamd is a failure: these tests are not optional there.
"""

from __future__ import annotations


import pytest

from smtpd_agent.config import ScanSettings
from smtpd_agent.scan import Scanner
from tests.clamd import Clamd


@pytest.fixture
def scan_settings(clamd: Clamd) -> ScanSettings:
    return ScanSettings(clamd=clamd.unix_address, required=True, timeout=5.0)


@pytest.fixture
def scanner(scan_settings: ScanSettings) -> Scanner:
    return Scanner(scan_settings)
