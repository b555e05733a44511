"""Fixtures for the operations tests: `smtpd-agent serve` in a subprocess."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dnsserver import DnsTestServer
from tests.ops.serve_process import ServeProcess


@pytest.fixture
def serve_process(database_url: str, tmp_path: Path, dns_server: DnsTestServer,
                  smtp_session: str) -> Iterator[Callable[..., ServeProcess]]:
    """Start `smtpd-agent serve` with settings (`**{"smtp.shutdown_grace": 1}`), ready to use."""
    started: list[ServeProcess] = []

    def start(**settings: Any) -> ServeProcess:
        settings.setdefault("smtp.session", smtp_session)
        process = ServeProcess(tmp_path, database_url, dns_server.nameserver, **settings)
        started.append(process)
        process.wait_for_state("READY=1")
        return process

    yield start
    for process in started:
        process.close()
