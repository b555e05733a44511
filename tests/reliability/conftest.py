"""A server shared by the generated-input tests (hypothesis calls a test many times)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.support import make_settings, ServerThread, start_with_acme_support


@pytest.fixture(scope="module")
def fuzz_server(cluster, dns_server_session, tmp_path_factory,
                smtp_session) -> Iterator[ServerThread]:
    url = asyncio.run(cluster.new_database())
    settings = make_settings(url, tmp_path_factory.mktemp("fuzz"), **{
        "dns.nameservers": [dns_server_session.nameserver], "smtp.command_timeout": 5,
        "smtp.session": smtp_session})
    server = start_with_acme_support(url, settings)
    yield server
    server.stop()
