"""Nothing lost under load and faults: kill -9, Postgres restart, clamd death, idle floods.

Each test drives a real server with concurrent senders that behave like MTAs:
a 4xx or a dropped connection means "try again shortly", a 250 means the
message is the server's responsibility. The verdict is read from Postgres:
every message that got a 250 is stored exactly once, and nothing was lost.
Bounded in time: a few thousand messages, deadlines on every wait.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections import Counter
from email.message import EmailMessage
from email.policy import SMTP

import asyncpg

from smtpd_agent.store import directory
from tests.clamd import EICAR
from tests.support import EmbeddedCluster, ServeProcess, add_acme_support, smtp_send

RCPT = "support@acme.agents.test"


def payload(index: int, attachment: bytes | None = None) -> bytes:
    message = EmailMessage()
    message["From"] = "load@example.org"
    message["To"] = RCPT
    message["Subject"] = f"load {index}"
    message["Message-ID"] = f"<load-{index}@example.org>"
    message.set_content(f"message number {index}\n" + "filler line\n" * 40)
    if attachment is not None:
        message.add_attachment(attachment, maintype="application", subtype="octet-stream",
                               filename=f"file{index}.bin")
    return message.as_bytes(policy=SMTP).replace(b"\r\n.", b"\r\n..")


class Senders:
    """Concurrent senders that retry 4xx and connection failures until 250, 5xx or deadline."""

    def __init__(self, port: int, payloads: dict[int, bytes], workers: int = 20,
                 seconds: float = 120) -> None:
        self.port = port
        self.payloads = payloads
        self.workers = workers
        self.deadline = time.monotonic() + seconds
        self.codes: dict[int, list[int]] = {index: [] for index in payloads}
        self.accepted = 0

    def final(self, index: int) -> int | None:
        codes = self.codes[index]
        return codes[-1] if codes else None

    async def run(self) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in self.payloads:
            queue.put_nowait(index)

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                while time.monotonic() < self.deadline:
                    code, _ = await smtp_send(self.port, self.payloads[index],
                                              "load@example.org", [RCPT], timeout=15)
                    self.codes[index].append(code)
                    if code == 250:
                        self.accepted += 1
                    if code == 250 or code >= 500:
                        break
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(worker() for _ in range(self.workers)))

    async def wait_for_accepted(self, count: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while self.accepted < count:
            assert time.monotonic() < deadline, f"only {self.accepted} accepted"
            await asyncio.sleep(0.02)


async def stored_counts(url: str) -> Counter[str]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT message_id FROM messages WHERE direction = 'inbound'")
    finally:
        await connection.close()
    return Counter(row["message_id"] for row in rows)


def server_env(url: str, dns_server, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": url, "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": "agents.test",
            "SMTPD_AGENT_DNS_NAMESERVERS": dns_server.nameserver, "SMTPD_AGENT_DNS_TIMEOUT": "0.5",
            "SMTPD_AGENT_ROUTING_CACHE_TTL": "60", "SMTPD_AGENT_SMTP_MAX_CONNECTIONS_PER_IP": "200",
            **extra}


def assert_every_250_stored_once(senders: Senders, stored: Counter[str]) -> None:
    accepted = {f"<load-{i}@example.org>" for i in senders.payloads if senders.final(i) == 250}
    assert accepted, "nothing was accepted"
    duplicates = {mid: n for mid, n in stored.items() if n != 1}
    assert duplicates == {}
    missing = accepted - set(stored)
    assert missing == set(), f"{len(missing)} messages got 250 but are not stored"


async def test_kill_9_under_load_loses_nothing(cluster, dns_server, tmp_path):
    url = await cluster.new_database()
    server = ServeProcess(server_env(url, dns_server), tmp_path / "state").start()
    try:
        await add_acme_support(url)
        senders = Senders(server.port, {i: payload(i) for i in range(2000)})
        load = asyncio.create_task(senders.run())
        await senders.wait_for_accepted(300)
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(load, 300)
        assert all(senders.final(i) == 250 for i in senders.payloads), Counter(
            senders.final(i) for i in senders.payloads)
        assert any(0 in codes for codes in senders.codes.values()), "the kill was not felt"
        stored = await stored_counts(url)
        assert_every_250_stored_once(senders, stored)
        assert len(stored) == 2000
    finally:
        server.stop()


async def test_postgres_restart_under_load_gives_only_250_or_4xx(dns_server, tmp_path):
    own = EmbeddedCluster(tmp_path / "pg")
    try:
        url = await own.new_database()
        server = ServeProcess(server_env(url, dns_server,
                                         SMTPD_AGENT_DATABASE_CONNECT_TIMEOUT="2"),
                              tmp_path / "state").start()
        try:
            await add_acme_support(url)
            senders = Senders(server.port, {i: payload(i) for i in range(800)})
            load = asyncio.create_task(senders.run())
            await senders.wait_for_accepted(150)
            from tests.integration.test_postgres_outage import start_postgres, stop_postgres
            await asyncio.to_thread(stop_postgres, own)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(start_postgres, own)
            await asyncio.wait_for(load, 300)
            every_code = Counter(code for codes in senders.codes.values() for code in codes)
            assert set(every_code) <= {250, 451}, every_code
            assert every_code[451] > 0, "the restart was not felt"
            assert all(senders.final(i) == 250 for i in senders.payloads)
            stored = await stored_counts(url)
            assert_every_250_stored_once(senders, stored)
            assert len(stored) == 800
        finally:
            server.stop()
    finally:
        own.stop()


async def test_clamd_killed_under_load_tempfails_and_stores_nothing_unscanned(
        cluster, dns_server, clamd, tmp_path):
    url = await cluster.new_database()
    server = ServeProcess(server_env(url, dns_server, SMTPD_AGENT_SCAN_CLAMD=clamd.unix_address,
                                     SMTPD_AGENT_SCAN_TIMEOUT="3"), tmp_path / "state").start()
    try:
        await add_acme_support(url)
        payloads = {i: payload(i, EICAR if i % 10 == 0 else b"%PDF-1.4 clean " + bytes([i % 256]))
                    for i in range(600)}
        senders = Senders(server.port, payloads)
        load = asyncio.create_task(senders.run())
        await senders.wait_for_accepted(100)
        clamd.kill()
        await asyncio.sleep(1.0)
        clamd.start()
        await asyncio.wait_for(load, 300)
        every_code = Counter(code for codes in senders.codes.values() for code in codes)
        assert every_code[451] > 0, "the clamd outage was not felt"
        assert all(senders.final(i) == 554 for i in payloads if i % 10 == 0)
        assert all(senders.final(i) == 250 for i in payloads if i % 10)
        connection = await asyncpg.connect(url)
        try:
            statuses = Counter(r["scan_status"] for r in
                               await connection.fetch("SELECT scan_status FROM messages"))
            infected = await connection.fetchval(
                "SELECT count(*) FROM blobs WHERE position($1 in content) > 0", EICAR)
        finally:
            await connection.close()
        assert statuses == {"clean": 540}
        assert infected == 0
    finally:
        server.stop()


async def test_idle_connections_are_freed_by_timeouts(start_server, db):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    running = start_server(**{"smtp.command_timeout": 1.5, "smtp.max_connections_per_ip": 1000,
                              "smtp.max_connections": 1000})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support", auto_reply=False)
    idle = []
    try:
        for _ in range(500):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            idle.append(sock)
        for sock in idle:
            assert sock.recv(1024).startswith(b"220")
        await asyncio.sleep(2.5)
        closed = 0
        for sock in idle:
            sock.settimeout(5)
            data = sock.recv(1024)
            while data:
                assert data.startswith(b"421") or b"421 4.4.2" in data
                data = sock.recv(1024)
            closed += 1
        assert closed == 500
        code, line = await smtp_send(running.port, payload(1), "load@example.org", [RCPT])
        assert code == 250, line
    finally:
        for sock in idle:
            sock.close()
