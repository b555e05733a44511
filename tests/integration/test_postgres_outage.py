"""Postgres goes away mid-run: DATA answers 451, nothing is lost, delivery resumes by itself."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from smtpd_agent.store import directory
from tests.support import Dialogue, EmbeddedCluster, ServerThread, enhanced, make_settings


@pytest.fixture
def own_cluster(tmp_path):
    """A Postgres of this test's own, so stopping it disturbs no other test."""
    cluster = EmbeddedCluster(tmp_path / "pg")
    yield cluster
    cluster.stop()


def stop_postgres(cluster: EmbeddedCluster) -> None:
    from pgserver._commands import pg_ctl
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=cluster.pgdata, user=cluster.server.system_user)


def start_postgres(cluster: EmbeddedCluster) -> None:
    with cluster.server._lock:
        cluster.server.ensure_postgres_running()


def deliver(port: int, tag: str) -> tuple[int, bytes]:
    dialogue = Dialogue.open(port)
    dialogue.reply()
    dialogue.command("EHLO client.example.org")
    dialogue.command("MAIL FROM:<alice@example.org>")
    code, line = dialogue.command("RCPT TO:<support@acme.agents.test>")
    if code != 250:
        return code, line
    assert dialogue.command("DATA")[0] == 354
    dialogue.send(b"Subject: %s\r\nMessage-ID: <%s@example.org>\r\n\r\nhello\r\n.\r\n"
                  % (tag.encode(), tag.encode()))
    code, lines = dialogue.reply()
    dialogue.command("QUIT")
    return code, lines[-1]


async def test_store_failure_is_a_tempfail_and_recovers_without_restart(own_cluster, tmp_path,
                                                                        dns_server):
    url = await own_cluster.new_database()
    connection = await asyncpg.connect(url)
    running = ServerThread(make_settings(url, tmp_path / "state", **{
        "routing.cache_ttl": 60, "database.connect_timeout": 2,
        "dns.nameservers": [dns_server.nameserver]})).start()
    try:
        await directory.add_workspace(connection, "acme")
        await directory.add_agent(connection, "acme", "support")
        await connection.close()
        assert (await asyncio.to_thread(deliver, running.port, "before"))[0] == 250

        await asyncio.to_thread(stop_postgres, own_cluster)
        code, line = await asyncio.to_thread(deliver, running.port, "during")
        # the route is cached, so RCPT passes and the COMMIT is what fails
        assert code == 451 and enhanced(line) == "4.3.0", line
        assert b"session" in line

        await asyncio.to_thread(start_postgres, own_cluster)
        # the sender retries the same message; it is stored exactly once
        for _ in range(2):
            code, line = await asyncio.to_thread(deliver, running.port, "during")
            assert code == 250, line
        connection = await asyncpg.connect(url)
        subjects = [r["subject"] for r in
                    await connection.fetch("SELECT subject FROM messages ORDER BY id")]
        assert subjects == ["before", "during"]
        await connection.close()
    finally:
        running.stop()


async def test_routing_lookup_failure_is_a_tempfail(own_cluster, tmp_path, dns_server):
    url = await own_cluster.new_database()
    running = ServerThread(make_settings(url, tmp_path / "state", **{
        "routing.cache_ttl": 0, "database.connect_timeout": 2,
        "dns.nameservers": [dns_server.nameserver]})).start()
    try:
        await asyncio.to_thread(stop_postgres, own_cluster)
        code, line = await asyncio.to_thread(deliver, running.port, "unroutable")
        assert code == 451 and enhanced(line) == "4.3.0", line
        await asyncio.to_thread(start_postgres, own_cluster)
    finally:
        running.stop()
