"""A server shared by the generated-input tests (hypothesis calls a test many times)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from smtpd_agent.store import directory
from tests.support import ServerThread, make_settings


@pytest.fixture(scope="module")
def fuzz_server(cluster, dns_server_session, tmp_path_factory) -> Iterator[ServerThread]:
    url = asyncio.run(cluster.new_database())
    settings = make_settings(url, tmp_path_factory.mktemp("fuzz"), **{
        "dns.nameservers": [dns_server_session.nameserver], "smtp.command_timeout": 5})
    server = ServerThread(settings).start()

    async def prepare() -> None:
        connection = await asyncpg.connect(url)
        await directory.add_workspace(connection, "acme")
        await directory.add_agent(connection, "acme", "support", auto_reply=False)
        await connection.close()

    asyncio.run(prepare())
    yield server
    server.stop()
