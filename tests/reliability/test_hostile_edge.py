"""Reputation at the edge (issue 17) over real SMTP: DNSBLs, iprev, per-client rates and bans.

The server listens on 127.0.0.1; hostile clients connect from other 127/8 source
addresses (Linux routes all of 127/8 to loopback), so each is a client of its own
to the server, its DNSBL lookups and its rates. The DNSBL zone and the reverse
zone are served by the loopback DNS server (tests/dnsserver.py) and reached
through the server's real resolver. Each test uses client addresses of its own,
so nothing one test's lookups left in the resolver cache can answer another's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import asyncpg
import psutil
import pytest

from smtpd_agent.smtp import replies
from tests.reliability.test_hostile_smtp import alongside
from tests.ports import wait_for_listeners
from tests.support import (
    DEFAULT_DOMAIN, SESSION_LAYERS, enhanced, make_settings, ServeProcess, ServerThread,
    start_with_acme_support)

RCPT = f"support@acme.{DEFAULT_DOMAIN}"
ZONE = "bl.edge.test"
REFUSING_ZONE = "refused.edge.test"  # answers as Spamhaus does to a public resolver
FAILED_RCPT_RATE = 100
BAN_SECONDS = 4.0
DNSBL_TIMEOUT = 0.5


@pytest.fixture(scope="module", params=SESSION_LAYERS)
def smtp_session(request: pytest.FixtureRequest) -> str:
    """The edge checks hold on both session layers (smtp.session)."""
    return request.param


@pytest.fixture(scope="module")
def edge_server(cluster, dns_server_session, tmp_path_factory,
                smtp_session) -> Iterator[ServerThread]:
    url = asyncio.run(cluster.new_database())
    settings = make_settings(url, tmp_path_factory.mktemp("edge"), **{
        "smtp.session": smtp_session,
        "dns.nameservers": [dns_server_session.nameserver], "dns.timeout": 2.0,
        "smtp.command_timeout": 10, "smtp.max_connections_per_ip": 50,
        "edge.dnsbl": [ZONE, REFUSING_ZONE], "edge.dnsbl_timeout": DNSBL_TIMEOUT,
        "edge.failed_rcpt_rate": FAILED_RCPT_RATE, "edge.ban_seconds": BAN_SECONDS,
        "edge.connection_rate": 1000, "edge.message_rate": 1000})
    server = start_with_acme_support(url, settings)
    yield server
    server.stop()


class Client:
    """An SMTP client connecting from a source address of its own."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str) -> tuple[Client, bytes]:
        """Connect from `source`; the client and the server's first line (the greeting)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self, timeout: float = 10) -> bytes:
        async def read() -> bytes:
            while True:
                line = await self.reader.readline()
                if not line or line[3:4] != b"-":
                    return line.rstrip(b"\r\n")
        return await asyncio.wait_for(read(), timeout)

    async def command(self, line: str | bytes) -> bytes:
        self.writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 5) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except (ConnectionError, asyncio.TimeoutError):
            return True

    async def deliver(self, subject: str) -> bytes:
        """EHLO, one message to the agent; the reply to its final dot."""
        assert (await self.command("EHLO client.edge.test"))[:3] == b"250"
        assert (await self.command("MAIL FROM:<sender@example.org>"))[:3] == b"250"
        assert (await self.command(f"RCPT TO:<{RCPT}>"))[:3] == b"250"
        assert (await self.command("DATA"))[:3] == b"354"
        return await self.command(
            b"Subject: %s\r\nMessage-ID: <%d.%s@example.org>\r\n\r\nhello\r\n."
            % (subject.encode(), time.monotonic_ns(), subject.encode()))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def is_reply(line: bytes, reply: replies.Reply) -> bool:
    return int(line[:3]) == reply.code and enhanced(line) == reply.enhanced


async def metrics_text(server: ServerThread) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.http_url}/metrics") as response:
            return await response.text()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + ("{" if labels else " ")):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def stored(server: ServerThread, subject: str) -> asyncpg.Record:
    connection = await asyncpg.connect(server.settings.database.url)
    try:
        row = await connection.fetchrow(
            "SELECT iprev, auth_results, auth_detail FROM messages WHERE subject = $1", subject)
    finally:
        await connection.close()
    assert row is not None, f"no message {subject!r} stored"
    return row


# -- DNSBL ----------------------------------------------------------------------------------

async def test_a_client_listed_in_a_dnsbl_zone_is_refused_554(edge_server, dns_server):
    dns_server.add(f"2.0.0.127.{ZONE}", "A", "127.0.0.2")
    # The refusing zone's "you may not query" code is an error, never a listing.
    dns_server.add(f"3.0.0.127.{REFUSING_ZONE}", "A", "127.255.255.254")
    listed, greeting = await Client.open(edge_server.port, "127.0.0.2")
    assert is_reply(greeting, replies.client_listed("127.0.0.2", (ZONE,))), greeting
    assert ZONE.encode() in greeting and b"[127.0.0.2]" in greeting
    assert await listed.closed()
    await listed.close()

    refused_query, greeting = await Client.open(edge_server.port, "127.0.0.3")
    assert greeting[:3] == b"220", greeting
    assert (await refused_query.deliver("edge-refused-query"))[:3] == b"250"
    await refused_query.close()

    text = await metrics_text(edge_server)
    assert sample(text, "smtpd_agent_dnsbl_results_total", zone=ZONE, result="listed") >= 1
    assert sample(text, "smtpd_agent_dnsbl_results_total", zone=REFUSING_ZONE,
                  result="error") >= 1
    assert sample(text, "smtpd_agent_edge_refused_total", reason="dnsbl listed") >= 1


@pytest.mark.parametrize("source, trouble", [("127.0.0.4", "timeout"),
                                             ("127.0.0.5", "servfail")])
async def test_dnsbl_trouble_never_refuses(edge_server, dns_server, source, trouble):
    name = ".".join(reversed(source.split("."))) + "." + ZONE
    (dns_server.set_timeout if trouble == "timeout" else dns_server.set_servfail)(name)
    started = time.monotonic()
    client, greeting = await Client.open(edge_server.port, source)
    waited = time.monotonic() - started
    assert greeting[:3] == b"220", greeting
    assert waited < DNSBL_TIMEOUT + 1.5, f"greeting held {waited:.2f}s"
    assert (await client.deliver(f"edge-dnsbl-{trouble}"))[:3] == b"250"
    await client.close()


# -- iprev ----------------------------------------------------------------------------------

async def test_iprev_pass_and_fail_are_in_the_stored_authentication_results(
        edge_server, dns_server):
    dns_server.add("10.0.0.127.in-addr.arpa", "PTR", "mx.good.edge.test")
    dns_server.a("mx.good.edge.test", "127.0.0.10")
    dns_server.add("11.0.0.127.in-addr.arpa", "PTR", "forged.edge.test")
    dns_server.a("forged.edge.test", "192.0.2.1")  # the PTR name does not lead back
    # each client twice: first over the network, then from the resolver's cache alone
    for time_ in ("first", "again"):
        for source, subject in (("127.0.0.10", "edge-iprev-pass"),
                                ("127.0.0.11", "edge-iprev-fail"),
                                ("127.0.0.12", "edge-iprev-none")):
            client, greeting = await Client.open(edge_server.port, source)
            assert greeting[:3] == b"220"
            assert (await client.deliver(f"{subject}-{time_}"))[:3] == b"250"
            await client.close()
        if time_ == "first":
            asked = len(dns_server.queries)

    # the second round asked the DNS server nothing: every answer was cached
    reverse = [q for q in dns_server.queries[asked:] if q[1].endswith("in-addr.arpa")
               or q[1] in ("mx.good.edge.test", "forged.edge.test")]
    assert reverse == [], reverse
    for time_ in ("first", "again"):
        good = await stored(edge_server, f"edge-iprev-pass-{time_}")
        assert good["iprev"] == "pass"
        assert "iprev=pass (mx.good.edge.test) policy.iprev=127.0.0.10" in good["auth_results"]
        forged = await stored(edge_server, f"edge-iprev-fail-{time_}")
        assert forged["iprev"] == "fail"
        assert "iprev=fail (forged.edge.test) policy.iprev=127.0.0.11" in forged["auth_results"]
        missing = await stored(edge_server, f"edge-iprev-none-{time_}")  # no PTR record at all
        assert missing["iprev"] == "permerror"
        assert "iprev=permerror policy.iprev=127.0.0.12" in missing["auth_results"]


# -- per-client rates: a dictionary attack --------------------------------------------------

async def guess(client: Client, failed: int, limit: int) -> tuple[int, bytes]:
    """One RCPT to an unknown mailbox: (failures so far, the reply that ends the attack or
    b""). The RCPT that goes over `limit` gets its 550, then the 421 of the ban follows."""
    line = await client.command(f"RCPT TO:<guess{failed + 1}@acme.{DEFAULT_DOMAIN}>")
    if line[:3] != b"550":
        return failed, line
    failed += 1
    if failed > limit:
        return failed, await client.reply()
    return failed, b""


async def dictionary_attack(port: int, source: str, limit: int, attempts: int,
                            per_connection: int) -> tuple[int, bytes]:
    """Up to `attempts` RCPTs to unknown mailboxes, `per_connection` per connection, from
    `source`; the failures (550s) counted and the reply that ended it."""
    failed = 0
    while failed < attempts:
        client, greeting = await Client.open(port, source)
        if greeting[:3] != b"220":
            await client.close()
            return failed, greeting
        assert (await client.command("EHLO attacker.edge.test"))[:3] == b"250"
        assert (await client.command("MAIL FROM:<probe@attacker.example>"))[:3] == b"250"
        ended = b""
        for _ in range(per_connection):
            failed, ended = await guess(client, failed, limit)
            if ended:
                break
        if ended:
            assert await client.closed()
            await client.close()
            return failed, ended
        await client.close()
    return failed, b""


async def test_failed_rcpts_ban_one_client_while_another_keeps_delivering(edge_server):
    async with alongside(edge_server.port):
        failed, ended = await dictionary_attack(edge_server.port, "127.0.0.20",
                                                FAILED_RCPT_RATE, 200, 40)
        assert is_reply(ended, replies.RATE_EXCEEDED), ended
        assert failed == FAILED_RCPT_RATE + 1, failed
        banned_at = time.monotonic()
        # Banned: every connection of that client is turned away at once.
        again, greeting = await Client.open(edge_server.port, "127.0.0.20")
        assert is_reply(greeting, replies.CLIENT_BANNED), greeting
        assert await again.closed()
        await again.close()
        # Another client (a different source address) is untouched by the ban.
        other, greeting = await Client.open(edge_server.port, "127.0.0.21")
        assert greeting[:3] == b"220", greeting
        assert (await other.deliver("edge-other-client"))[:3] == b"250"
        await other.close()

    text = await metrics_text(edge_server)
    assert sample(text, "smtpd_agent_edge_rate_exceeded_total", kind="failed_rcpt") == 1
    assert sample(text, "smtpd_agent_edge_refused_total", reason="banned") >= 1

    # The ban expires.
    await asyncio.sleep(max(0.0, BAN_SECONDS + 1.0 - (time.monotonic() - banned_at)))
    after, greeting = await Client.open(edge_server.port, "127.0.0.20")
    assert greeting[:3] == b"220", greeting
    assert (await after.deliver("edge-after-ban"))[:3] == b"250"
    await after.close()


async def test_rates_and_bans_are_shared_by_every_accepting_process(cluster, dns_server, tmp_path,
                                                                    smtp_session):
    """smtp.processes = 2: failed RCPTs counted in both processes add up to one limit, and
    the ban holds in both."""
    url = await cluster.new_database()
    limit = 20
    server = ServeProcess({"DATABASE_URL": url,
                           "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DEFAULT_DOMAIN,
                           "SMTPD_AGENT_DNS_NAMESERVERS": dns_server.nameserver,
                           "SMTPD_AGENT_SMTP_PROCESSES": "2", "SMTPD_AGENT_AGENT_WORKERS": "0",
                           "SMTPD_AGENT_EDGE_FAILED_RCPT_RATE": str(limit),
                           "SMTPD_AGENT_SMTP_SESSION": smtp_session,
                           "SMTPD_AGENT_EDGE_BAN_SECONDS": "60"},
                          tmp_path / "state").start()
    try:
        pids = await wait_for_listeners(server.port, 2)
        assert len(pids) == 2, server.log_tail()

        owners: set[int] = set()
        failed = 0
        ended = b""
        # Two failed RCPTs per connection, each connection to whichever process the
        # kernel picks: both see some of them, neither sees the limit alone.
        for _ in range(limit):
            client, greeting = await Client.open(server.port, "127.0.0.30")
            if greeting[:3] != b"220":
                ended = greeting
                await client.close()
                break
            port = client.writer.get_extra_info("sockname")[1]
            owners.update(c.pid for c in psutil.net_connections("tcp")
                          if c.laddr.port == server.port and c.raddr
                          and c.raddr.port == port and c.pid)
            assert (await client.command("EHLO attacker.edge.test"))[:3] == b"250"
            assert (await client.command("MAIL FROM:<probe@attacker.example>"))[:3] == b"250"
            for _ in range(2):
                failed, ended = await guess(client, failed, limit)
                if ended:
                    break
            await client.close()
            if ended:
                break
        assert len(owners) == 2, "the kernel never gave a connection to the second process"
        assert is_reply(ended, replies.RATE_EXCEEDED), ended
        assert failed == limit + 1, failed
        # Every process now turns the client away; another client is still greeted.
        for _ in range(6):
            client, greeting = await Client.open(server.port, "127.0.0.30")
            assert is_reply(greeting, replies.CLIENT_BANNED), greeting
            await client.close()
        client, greeting = await Client.open(server.port, "127.0.0.31")
        assert greeting[:3] == b"220"
        await client.close()
    finally:
        server.stop()


# -- connection and message rates, and "mark" ----------------------------------------------

CONNECTION_RATE = 5
MESSAGE_RATE = 3


@pytest.fixture
def marking_server(cluster, dns_server, tmp_path) -> Iterator[ServerThread]:
    url = asyncio.run(cluster.new_database())
    settings = make_settings(url, tmp_path / "state", **{
        "dns.nameservers": [dns_server.nameserver], "smtp.command_timeout": 10,
        "edge.dnsbl": [ZONE], "edge.dnsbl_action": "mark",
        "edge.connection_rate": CONNECTION_RATE, "edge.message_rate": MESSAGE_RATE,
        "edge.ban_seconds": 60})
    server = start_with_acme_support(url, settings)
    yield server
    server.stop()


async def test_connection_rate_bans_a_client(marking_server):
    for _ in range(CONNECTION_RATE):
        client, greeting = await Client.open(marking_server.port, "127.0.0.40")
        assert greeting[:3] == b"220", greeting
        await client.close()
    client, greeting = await Client.open(marking_server.port, "127.0.0.40")
    assert is_reply(greeting, replies.RATE_EXCEEDED), greeting
    await client.close()
    client, greeting = await Client.open(marking_server.port, "127.0.0.40")
    assert is_reply(greeting, replies.CLIENT_BANNED), greeting
    await client.close()
    text = await metrics_text(marking_server)
    assert sample(text, "smtpd_agent_edge_rate_exceeded_total", kind="connection") == 1


async def test_message_rate_bans_a_client_mid_session(marking_server):
    client, greeting = await Client.open(marking_server.port, "127.0.0.41")
    assert greeting[:3] == b"220"
    for index in range(MESSAGE_RATE):
        assert (await client.deliver(f"edge-rate-{index}"))[:3] == b"250"
    line = await client.command("MAIL FROM:<sender@example.org>")
    assert is_reply(line, replies.RATE_EXCEEDED), line
    assert await client.closed()
    await client.close()


async def test_mark_only_logs_and_records_the_listing(marking_server, dns_server):
    dns_server.add(f"42.0.0.127.{ZONE}", "A", "127.0.0.2")
    client, greeting = await Client.open(marking_server.port, "127.0.0.42")
    assert greeting[:3] == b"220", greeting
    assert (await client.deliver("edge-marked"))[:3] == b"250"
    await client.close()
    row = await stored(marking_server, "edge-marked")
    detail = row["auth_detail"]
    assert '"dnsbl": ["bl.edge.test"]' in detail, detail


async def test_temporary_rcpt_refusals_are_not_failed_rcpts(marking_server):
    """452 4.5.3 past smtp.max_recipients is not a dictionary attack: 40 of them (over the
    default edge.failed_rcpt_rate of 30) ban nobody, and the message is delivered."""
    client, greeting = await Client.open(marking_server.port, "127.0.0.43")
    assert greeting[:3] == b"220"
    assert (await client.command("EHLO big.edge.test"))[:3] == b"250"
    assert (await client.command("MAIL FROM:<list@example.org>"))[:3] == b"250"
    limit = marking_server.settings.smtp.max_recipients
    for index in range(limit + 40):
        line = await client.command(f"RCPT TO:<support+r{index}@acme.{DEFAULT_DOMAIN}>")
        expected = replies.RCPT_OK if index < limit else replies.TOO_MANY_RECIPIENTS
        assert is_reply(line, expected), (index, line)
    assert (await client.command("DATA"))[:3] == b"354"
    line = await client.command(b"Subject: edge-many\r\nMessage-ID: <many@example.org>\r\n\r\nhi\r\n.")
    assert line[:3] == b"250", line
    await client.close()
