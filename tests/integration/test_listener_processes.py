"""smtp.processes: several processes accept on one port and every message is stored once."""

from __future__ import annotations

import asyncio
import secrets
import signal
import urllib.request
from collections import Counter
from pathlib import Path

import asyncpg
import psutil

from smtpd_agent.store import directory
from tests.ports import wait_for_listeners
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

        pids = await wait_for_listeners(server.port, 2)
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


async def ehlo_size(port: int) -> tuple[int, int, asyncio.StreamWriter]:
    """(pid of the process that took the connection, its SIZE, the open writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"220")
    writer.write(b"EHLO client.example.org\r\n")
    size = None
    while True:
        line = await reader.readline()
        if line[4:].startswith(b"SIZE "):
            size = int(line[9:].strip())
        if line[3:4] == b" ":
            break
    local = writer.get_extra_info("sockname")[1]
    [pid] = {c.pid for c in psutil.net_connections("tcp")
             if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
             and c.raddr and c.raddr.port == local}
    assert size is not None
    return pid, size, writer


async def sizes_by_process(port: int, connections: int = 30) -> dict[int, set[int]]:
    seen: dict[int, set[int]] = {}
    held = [await ehlo_size(port) for _ in range(connections)]
    for pid, size, writer in held:
        seen.setdefault(pid, set()).add(size)
        writer.close()
    return seen


async def test_listener_processes_read_the_file_and_all_reload(cluster, dns_server, tmp_path):
    """issue 16 item 9: the extra process gets the config path and flags, no setting in its
    environment (the relay password stays out of /proc/<pid>/environ), and SIGHUP with a
    changed file reaches every process, not only the one that read it."""
    url = await cluster.new_database()
    secret = "pw-" + secrets.token_hex(8)
    config = tmp_path / "smtpd-agent.toml"

    def write(max_message_size: int) -> None:
        config.write_text(
            "[server]\ndefault_domain = \"agents.test\"\n"
            f"[dns]\nnameservers = [\"{dns_server.nameserver}\"]\n"
            "[smtp]\nprocesses = 2\nmax_connections_per_ip = 200\n"
            f"max_message_size = {max_message_size}\n"
            "[agent]\nworkers = 0\n"
            f"[outbound]\nrelay = \"smtp://user:{secret}@127.0.0.1:2525?tls=none\"\n")

    write(1_000_000)
    server = ServeProcess({"DATABASE_URL": url, "SMTPD_AGENT_CONFIG": str(config)},
                          tmp_path / "state").start()
    try:
        listening = await wait_for_listeners(server.port, 2)
        children = psutil.Process(server.process.pid).children()
        child = next((c for c in children if c.pid in listening), None)
        assert child is not None, server.log_tail()
        environ = Path(f"/proc/{child.pid}/environ").read_bytes()
        assert secret.encode() not in environ
        assert b"SMTPD_AGENT_SMTP_MAX_MESSAGE_SIZE" not in environ
        assert b"SMTPD_AGENT_OUTBOUND_RELAY" not in environ
        before = await sizes_by_process(server.port)
        assert set(before) == {server.process.pid, child.pid}
        assert all(sizes == {1_000_000} for sizes in before.values()), before

        write(2_000_000)
        offset = server.log_path.stat().st_size
        server.process.send_signal(signal.SIGHUP)
        # Both processes say when they have applied the file (each logs config.reloaded);
        # from then on every new session must see the new size. Waiting for the two lines,
        # not for a wall-clock window, keeps a loaded machine from failing the test.
        async with asyncio.timeout(120):
            while server.log_path.read_bytes()[offset:].count(b'"config.reloaded"') < 2:
                assert server.process.poll() is None, server.log_tail()
                await asyncio.sleep(0.1)
        after = await sizes_by_process(server.port)
        assert set(after) == {server.process.pid, child.pid}
        assert all(sizes == {2_000_000} for sizes in after.values()), after
    finally:
        assert server.stop() == 0
