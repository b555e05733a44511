"""Hostile clients of the DNS server (issue 16 item 10) while well-behaved ones keep working.

One source (127.0.0.1) holds more TCP connections than the server has slots and floods it
with UDP queries; another (127.0.0.2) must still get its answers over both transports,
and mail must still be accepted by the same process, within a few seconds each.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import dns.asyncquery
import dns.message
import dns.rcode

from smtpd_agent.dnsserver.server import DnsServer
from smtpd_agent.domains import Domains
from smtpd_agent.store import directory
from smtpd_agent.store import domains as domain_store
from tests.support import DEFAULT_DOMAIN, ServerThread, smtp_send

ZONE = "mail.acme.example"
MX = ["10 mx1.agents.test.", "20 mx2.agents.test."]


def answers(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


async def test_one_flooding_source_does_not_deny_dns_or_mail_to_others(
        start_server: Callable[..., ServerThread], db: asyncpg.Connection, database_url: str,
        tmp_path: Path) -> None:
    server = start_server(**{"dns_server.listen": "127.0.0.1:0",
                             "domains.key_file": str(tmp_path / "dkim.secret")})
    dns_server = server.app.service(DnsServer)
    assert dns_server.port is not None
    address = ("127.0.0.1", dns_server.port)
    await directory.add_workspace(db, "acme", "Acme")
    await directory.add_agent(db, "acme", "support", auto_reply=False)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await Domains.open(pool, server.settings).add(ZONE, "acme", delegate=True)
        await domain_store.record_check(pool, await domain_store.get_domain(pool, ZONE), [])
    finally:
        await pool.close()

    query = dns.message.make_query(ZONE, "MX")
    flood_tcp = [await asyncio.open_connection(*address) for _ in range(300)]
    flood_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood_udp.setblocking(False)
    stop = asyncio.Event()

    async def udp_flood() -> int:
        sent = 0
        wire = query.to_wire()
        while not stop.is_set():
            for _ in range(200):
                try:
                    flood_udp.sendto(wire, address)
                    sent += 1
                except BlockingIOError:
                    break
            await asyncio.sleep(0.01)
        return sent

    flooding = asyncio.create_task(udp_flood())
    try:
        await asyncio.sleep(0.5)
        for ask in (dns.asyncquery.udp, dns.asyncquery.tcp):
            started = time.monotonic()
            response = await ask(query, address[0], port=address[1], source="127.0.0.2",
                                 timeout=3)
            assert response.rcode() == dns.rcode.NOERROR and answers(response) == MX
            assert time.monotonic() - started < 2.0
        started = time.monotonic()
        code, line = await smtp_send(
            server.port, b"Subject: meanwhile\r\nMessage-ID: <m@example.org>\r\n\r\nhi\r\n",
            "alice@example.org", [f"support@acme.{DEFAULT_DOMAIN}"], timeout=10)
        assert code == 250, line
        assert time.monotonic() - started < 5.0
    finally:
        stop.set()
        sent = await flooding
        flood_udp.close()
        for _, writer in flood_tcp:
            writer.close()
    per_source = server.settings.dns_server.max_tcp_connections_per_source
    assert dns_server.tcp_refused >= 300 - per_source
    assert sent > 1000 and dns_server.dropped > sent // 2  # the flood's bucket ran dry
