"""smtp.processes: several processes accept on one port and every message is stored once."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter

import asyncpg
import psutil

from smtpd_agent.store import directory
from tests.support import ServeProcess, smtp_send


def scrape(port: int, sample: str) -> float | None:
    """One sample's value from GET /metrics, as Prometheus would read it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
    return None


async def test_two_listener_processes_share_the_port(cluster, dns_server, tmp_path):
    url = await cluster.new_database()
    server = ServeProcess({"DATABASE_URL": url, "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": "agents.test",
                           "SMTPD_AGENT_DNS_NAMESERVERS": dns_server.nameserver,
                           "SMTPD_AGENT_SMTP_PROCESSES": "2", "SMTPD_AGENT_AGENT_WORKERS": "0",
                           "SMTPD_AGENT_SMTP_MAX_CONNECTIONS_PER_IP": "200"},
                          tmp_path / "state").start()
    try:
        connection = await asyncpg.connect(url)
        await directory.add_workspace(connection, "acme")
        await directory.add_agent(connection, "acme", "support", auto_reply=False)

        def listeners() -> set[int]:
            return {c.pid for c in psutil.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port and c.pid}

        for _ in range(100):
            if len(listeners()) == 2:
                break
            await asyncio.sleep(0.1)
        pids = listeners()
        assert len(pids) == 2 and server.process.pid in pids

        async def send(index: int) -> int:
            payload = (b"Subject: n%d\r\nMessage-ID: <n%d@example.org>\r\n\r\nhi\r\n" % (index, index))
            return (await smtp_send(server.port, payload, "a@example.org",
                                    ["support@acme.agents.test"]))[0]

        codes = await asyncio.gather(*(send(i) for i in range(60)))
        assert Counter(codes) == {250: 60}
        assert await connection.fetchval("SELECT count(DISTINCT message_id) FROM messages") == 60
        # The main process's /metrics counts the other process's messages too.
        for _ in range(50):
            accepted = scrape(server.http_port, 'smtpd_agent_messages_accepted_total'
                                                '{transport="smtp"}')
            if accepted == 60:
                break
            await asyncio.sleep(0.1)
        assert accepted == 60
        assert scrape(server.http_port, "smtpd_agent_smtp_sessions_total") >= 60
        await connection.close()
        # both processes take sessions: hold 30 connections open and see whose they are
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(30)]
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220")
        owners = Counter(c.pid for c in psutil.net_connections("tcp")
                         if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == server.port)
        for _, writer in held:
            writer.close()
        assert set(owners) == pids and sum(owners.values()) == 30, owners
        child = next(pid for pid in pids if pid != server.process.pid)
    finally:
        assert server.stop() == 0
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
