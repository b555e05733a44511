"""The authoritative DNS server on loopback: dig and dnspython over UDP and TCP, REFUSED
outside our zones, truncation, rate limit, a fuzz run, changes served without a restart,
TCP slots per source, serve-stale while Postgres is down, pending zones kept bare.

The server runs in the test's event loop against a real Postgres; every query crosses a
real socket (dnspython's async client, or the `dig` binary from dnsutils).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from smtpd_agent.runtime import Runtime
from smtpd_agent.dnsserver.server import DnsServer
from smtpd_agent.domains import Domains
from smtpd_agent.domains.mta_sts import policy_for, sts_txt
from smtpd_agent.store import directory
from smtpd_agent.store import domains as domain_store
from tests.integration.test_postgres_outage import start_postgres, stop_postgres
from tests.support import REPO, EmbeddedCluster, make_settings, required, wait_for_ready

ZONE = "mail.acme.example"
LONG_NS = [f"ns-with-a-rather-long-name-{i:02d}.agents.test" for i in range(14)]


@dataclass
class Running:
    server: DnsServer
    runtime: Runtime
    domains: Domains

    @property
    def address(self) -> tuple[str, int]:
        assert self.server.port is not None
        return "127.0.0.1", self.server.port

    async def query(self, name: str, rdtype: str, tcp: bool = False,
                    **kwargs: Any) -> dns.message.Message:
        host, port = self.address
        query = dns.message.make_query(name, rdtype, **kwargs)
        query.flags &= ~dns.flags.RD
        ask = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
        return await ask(query, host, port=port, timeout=3)


async def start_dns(database_url: str, state: Path, **overrides: Any) -> Running:
    values = {"dns_server.listen": "127.0.0.1:0", "dns_server.cache_ttl": 0,
              "dns_server.rate_limit": 0, **overrides}
    settings = make_settings(database_url, state, **values)
    runtime = await Runtime.open(settings)
    server = DnsServer(runtime)
    await server.start()
    return Running(server, runtime, Domains.open(runtime.pool, settings, runtime.resolver))


async def verified(pool: asyncpg.Pool, name: str = ZONE) -> None:
    """What a passing `domain check` stores (the check itself is test_delegation's)."""
    await domain_store.record_check(pool, await domain_store.get_domain(pool, name), [])


@pytest.fixture
async def running(database_url: str, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_dns(database_url, tmp_path / "state")
    await directory.add_workspace(running.runtime.pool, "acme", "Acme")
    await running.domains.add(ZONE, "acme", delegate=True)
    await verified(running.runtime.pool)
    yield running
    await running.server.stop()
    await running.runtime.close()


def answers(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)




@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_dnspython_gets_soa_ns_mx_txt(running: Running, tcp: bool) -> None:
    soa = await running.query(ZONE, "SOA", tcp=tcp)
    assert soa.rcode() == dns.rcode.NOERROR and soa.flags & dns.flags.AA
    assert not soa.flags & dns.flags.RA
    [rdata] = soa.answer[0]
    assert (rdata.mname.to_text(), rdata.rname.to_text()) == ("ns1.agents.test.",
                                                              "hostmaster.agents.test.")
    assert answers(await running.query(ZONE, "NS", tcp=tcp)) == ["ns1.agents.test.",
                                                                 "ns2.agents.test."]
    assert answers(await running.query(ZONE, "MX", tcp=tcp)) == ["10 mx1.agents.test.",
                                                                 "20 mx2.agents.test."]
    assert answers(await running.query(ZONE, "TXT", tcp=tcp)) == [
        '"v=spf1 include:_spf.agents.test -all"']
    assert answers(await running.query(f"mail.{ZONE}", "MX", tcp=tcp)) == [
        "10 mx1.agents.test.", "20 mx2.agents.test."]
    assert answers(await running.query(f"_dmarc.{ZONE}", "TXT", tcp=tcp)) == [
        '"v=DMARC1; p=quarantine"']
    assert answers(await running.query(f"_mta-sts.{ZONE}", "TXT", tcp=tcp)) == [
        f'"{sts_txt(policy_for(running.runtime.settings))}"']
    assert answers(await running.query(f"_smtp._tls.{ZONE}", "TXT", tcp=tcp)) == [
        '"v=TLSRPTv1; rua=mailto:tls-reports@agents.test"']
    domain = await running.domains.keys.active_keys(
        await running.runtime.pool.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'"),
        ZONE)
    for key in domain:
        response = await running.query(key.name, "TXT", tcp=tcp)
        [rdata] = response.answer[0]
        assert b"".join(rdata.strings).decode() == key.txt
    missing = await running.query(f"nothing.{ZONE}", "A", tcp=tcp)
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.flags & dns.flags.AA
    assert missing.authority[0].rdtype == dns.rdatatype.SOA
    for name in ("example.com", "agents.test", "acme.example"):
        refused = await running.query(name, "SOA", tcp=tcp)
        assert refused.rcode() == dns.rcode.REFUSED and not refused.answer


def dig_binary() -> str:
    return required(shutil.which("dig"), "dig", "dnsutils")


async def dig(running: Running, *args: str) -> str:
    host, port = running.address
    process = await asyncio.create_subprocess_exec(
        dig_binary(), f"@{host}", "-p", str(port), "+norec", "+time=2", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err
    return out.decode()


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
async def test_dig_gets_soa_ns_mx_txt_and_refused(running: Running, transport: str) -> None:
    short = [transport, "+short"]
    soa = (await dig(running, *short, ZONE, "SOA")).split()
    assert soa[:2] == ["ns1.agents.test.", "hostmaster.agents.test."] and int(soa[2]) >= 1
    assert sorted((await dig(running, *short, ZONE, "NS")).split()) == [
        "ns1.agents.test.", "ns2.agents.test."]
    assert sorted((await dig(running, *short, ZONE, "MX")).splitlines()) == [
        "10 mx1.agents.test.", "20 mx2.agents.test."]
    assert (await dig(running, *short, ZONE, "TXT")).strip() == \
        '"v=spf1 include:_spf.agents.test -all"'
    full = await dig(running, transport, ZONE, "MX")
    assert "status: NOERROR" in full and " aa" in full.split("flags:")[1].split(";")[0]
    assert "status: REFUSED" in await dig(running, transport, "example.com", "A")
    missing = await dig(running, transport, f"nothing.{ZONE}", "A")
    assert "status: NXDOMAIN" in missing and "AUTHORITY SECTION" in missing


async def test_large_answer_is_truncated_over_udp_and_complete_over_tcp(
        database_url: str, tmp_path: Path) -> None:
    running = await start_dns(database_url, tmp_path / "s", **{"dns_server.nameservers": LONG_NS})
    try:
        await directory.add_workspace(running.runtime.pool, "acme", "Acme")
        await running.domains.add(ZONE, "acme", delegate=True)
        plain = await running.query(ZONE, "NS", use_edns=False)
        assert plain.flags & dns.flags.TC and not plain.answer
        edns = await running.query(ZONE, "NS", use_edns=0, payload=1232)
        assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 14
        assert edns.edns == 0 and edns.payload == 1232  # EDNS0 answered with our size
        over_tcp = await running.query(ZONE, "NS", tcp=True, use_edns=False)
        assert len(over_tcp.answer[0]) == 14
        # dig retries over TCP by itself on TC
        out = await dig(running, "+noedns", "+short", ZONE, "NS")
        assert len(out.split()) == 14
    finally:
        await running.server.stop()
        await running.runtime.close()


async def test_per_source_rate_limit_drops_udp_floods(database_url: str, tmp_path: Path) -> None:
    running = await start_dns(database_url, tmp_path / "s", **{
        "dns_server.rate_limit": 1, "dns_server.rate_burst": 5})
    try:
        await directory.add_workspace(running.runtime.pool, "acme", "Acme")
        await running.domains.add(ZONE, "acme", delegate=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        for i in range(50):
            query = dns.message.make_query(ZONE, "SOA", id=i)
            sock.sendto(query.to_wire(), running.address)
        got = 0
        try:
            while True:
                await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.5)
                got += 1
        except TimeoutError:
            pass
        sock.close()
        assert 5 <= got <= 7, got  # the burst (plus what refilled meanwhile), not 50
        assert running.server.dropped >= 43
        # TCP is not limited (no spoofed sources over a handshake)
        assert (await running.query(ZONE, "SOA", tcp=True)).rcode() == dns.rcode.NOERROR
    finally:
        await running.server.stop()
        await running.runtime.close()


async def test_survives_a_fuzz_run_of_random_and_truncated_packets(running: Running) -> None:
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "11")))
    valid = [dns.message.make_query(name, rdtype).to_wire() for name, rdtype in
             ((ZONE, "SOA"), (f"_dmarc.{ZONE}", "TXT"), ("example.com", "A"), (ZONE, "MX"))]
    packets: list[bytes] = []
    for _ in range(1500):
        kind = rng.randrange(4)
        base = rng.choice(valid)
        if kind == 0:
            packets.append(rng.randbytes(rng.randrange(0, 600)))
        elif kind == 1:
            packets.append(base[:rng.randrange(0, len(base))])
        elif kind == 2:
            flipped = bytearray(base)
            for _ in range(rng.randrange(1, 6)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            packets.append(bytes(flipped))
        else:  # a header claiming many records, then garbage
            packets.append(base[:4] + b"\xff\xff\xff\xff\xff\xff\xff\xff" + rng.randbytes(40))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    for i, packet in enumerate(packets):
        sock.sendto(packet, running.address)
        if i % 100 == 0:
            await asyncio.sleep(0)
    sock.close()
    # over TCP: truncated messages, bad lengths, garbage, then a hang-up mid-message
    for packet in packets[:100]:
        _, writer = await asyncio.open_connection(*running.address)
        writer.write(len(packet).to_bytes(2, "big") + packet + b"\x00\x30partial")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.2)
    for tcp in (False, True):  # still answering, correctly
        response = await running.query(ZONE, "MX", tcp=tcp)
        assert answers(response) == ["10 mx1.agents.test.", "20 mx2.agents.test."]
    assert running.server.dropped > 0


async def test_changes_are_served_at_once_and_bump_the_serial(running: Running) -> None:
    first = (await running.query(ZONE, "SOA")).answer[0][0].serial
    assert (await running.query(ZONE, "SOA")).answer[0][0].serial == first  # no change, no bump
    step = await running.domains.rotate_dkim(ZONE)
    # the checker resolves through the loopback resolver, which knows nothing of this zone
    assert step.created and step.waiting == step.created
    for selector in step.created:
        response = await running.query(f"{selector}._domainkey.{ZONE}", "TXT")
        assert response.rcode() == dns.rcode.NOERROR and response.answer
    assert (await running.query(ZONE, "SOA")).answer[0][0].serial == first + 1
    await running.domains.remove(ZONE)
    assert (await running.query(ZONE, "SOA")).rcode() == dns.rcode.REFUSED


async def test_dns_serve_runs_the_dns_server_alone(database_url: str, tmp_path: Path,
                                                   db: Any) -> None:
    """`smtpd-agent dns-serve` as a real process: answers from Postgres, stops cleanly.
    It binds port 0 for UDP and TCP and names the port in its `server.ready` line."""
    env = {**os.environ, "DATABASE_URL": database_url, "SMTPD_AGENT_LOG_FORMAT": "json",
           "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": "agents.test",
           "SMTPD_AGENT_DNS_SERVER_CACHE_TTL": "0", "SMTPD_AGENT_DNS_NAMESERVERS": "127.0.0.1:9"}
    log_path = tmp_path / "dns-serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "smtpd_agent", "dns-serve", "--listen", "127.0.0.1:0",
             "--state-dir", str(tmp_path / "state")], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=log)
    try:
        ready = await asyncio.to_thread(wait_for_ready, process, log_path)
        assert set(ready) >= {"dns_port"} and "smtp_port" not in ready, ready
        port = ready["dns_port"]
        settings = make_settings(database_url, tmp_path / "cli")
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            await directory.add_workspace(pool, "acme", "Acme")
            await Domains.open(pool, settings).add(ZONE, "acme", delegate=True)
            await verified(pool)
        finally:
            await pool.close()
        query = dns.message.make_query(ZONE, "MX")
        for ask in (dns.asyncquery.udp, dns.asyncquery.tcp):
            response = await ask(query, "127.0.0.1", port=port, timeout=3)
            assert answers(response) == ["10 mx1.agents.test.", "20 mx2.agents.test."]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    assert code == 0, log_path.read_text()[-2000:]


async def test_database_changes_are_pushed_past_a_long_cache(database_url: str,
                                                             tmp_path: Path) -> None:
    """With an hour of cache, a rotation and a removal are still served at once (NOTIFY)."""
    running = await start_dns(database_url, tmp_path / "s", **{"dns_server.cache_ttl": 3600})
    try:
        await directory.add_workspace(running.runtime.pool, "acme", "Acme")
        await running.domains.add(ZONE, "acme", delegate=True)
        await verified(running.runtime.pool)
        await eventually(running, ZONE, "SOA", dns.rcode.NOERROR)
        serial = (await running.query(ZONE, "SOA")).answer[0][0].serial
        step = await running.domains.rotate_dkim(ZONE)
        for selector in step.created:
            await eventually(running, f"{selector}._domainkey.{ZONE}", "TXT", dns.rcode.NOERROR)
        assert (await running.query(ZONE, "SOA")).answer[0][0].serial == serial + 1
        await running.domains.remove(ZONE)
        await eventually(running, ZONE, "SOA", dns.rcode.REFUSED)
    finally:
        await running.server.stop()
        await running.runtime.close()


async def eventually(running: Running, name: str, rdtype: str, rcode: int) -> None:
    """NOTIFY is asynchronous: allow it a moment (far below the cache TTL)."""
    for _ in range(40):
        if (await running.query(name, rdtype)).rcode() == rcode:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} {rdtype}: never {dns.rcode.to_text(rcode)}")


async def test_a_tcp_flood_from_one_source_does_not_block_another(running: Running) -> None:
    """300 idle connections from 127.0.0.1 (more than all 256 slots): a query from 127.0.0.2
    is still answered at once; the flood keeps its per-source share and no more."""
    host, port = running.address
    flood = [await asyncio.open_connection(host, port) for _ in range(300)]
    try:
        await asyncio.sleep(0.3)  # every connection accepted (and most closed) by the server
        query = dns.message.make_query(ZONE, "MX")
        response = await dns.asyncquery.tcp(query, host, port=port, source="127.0.0.2",
                                            timeout=3)
        assert answers(response) == ["10 mx1.agents.test.", "20 mx2.agents.test."]
        config = running.runtime.settings.dns_server
        per_source = config.max_tcp_connections_per_source
        assert 0 < per_source < config.max_tcp_connections < 300
        closed = 0
        for reader, _ in flood:
            try:
                closed += await asyncio.wait_for(reader.read(1), 0.05) == b""
            except TimeoutError:
                pass  # still open: one of the flood's own slots
        assert closed == 300 - per_source
        # the flooding source itself gets nothing more over TCP (UDP is rate-limited apart)
        with pytest.raises((ConnectionError, EOFError)):
            await dns.asyncquery.tcp(query, host, port=port, source="127.0.0.1", timeout=3)
    finally:
        for _, writer in flood:
            writer.close()
    assert running.server.tcp_refused >= 300 - per_source


async def test_a_pending_delegated_zone_serves_its_delegation_only(database_url: str,
                                                                   tmp_path: Path) -> None:
    """Until `domain check` verified it (ownership proven in the parent zone), a zone
    serves SOA and NS: no MX that would take its mail, no DKIM key that would sign as it.
    Verification shows the rest at once, past an hour of cache (NOTIFY)."""
    running = await start_dns(database_url, tmp_path / "s", **{"dns_server.cache_ttl": 3600})
    try:
        await directory.add_workspace(running.runtime.pool, "acme", "Acme")
        await running.domains.add(ZONE, "acme", delegate=True)
        await eventually(running, ZONE, "SOA", dns.rcode.NOERROR)
        assert answers(await running.query(ZONE, "NS")) == ["ns1.agents.test.",
                                                            "ns2.agents.test."]
        acme = await running.runtime.pool.fetchval("SELECT id FROM workspaces WHERE slug='acme'")
        keys = await running.domains.keys.active_keys(acme, ZONE)
        hidden = [(ZONE, "MX"), (ZONE, "TXT"), (f"mail.{ZONE}", "MX"), (f"_dmarc.{ZONE}", "TXT"),
                  (f"_mta-sts.{ZONE}", "TXT"), (f"_smtpd-agent.{ZONE}", "TXT"),
                  *[(key.name, "TXT") for key in keys]]
        for name, rdtype in hidden:
            response = await running.query(name, rdtype)
            assert response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
            assert not response.answer, (name, rdtype, response.answer)

        await verified(running.runtime.pool)
        for _ in range(40):
            if (await running.query(ZONE, "MX")).answer:
                break
            await asyncio.sleep(0.05)
        assert answers(await running.query(ZONE, "MX")) == ["10 mx1.agents.test.",
                                                            "20 mx2.agents.test."]
        for key in keys:
            [rdata] = (await running.query(key.name, "TXT")).answer[0]
            assert b"".join(rdata.strings).decode() == key.txt
        assert not (await running.query(f"_smtpd-agent.{ZONE}", "TXT")).answer
    finally:
        await running.server.stop()
        await running.runtime.close()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    """A Postgres of this test's own, so stopping it disturbs no other test."""
    cluster = EmbeddedCluster(tmp_path / "pg")
    yield cluster
    cluster.stop()


async def test_the_last_good_zone_is_served_while_postgres_is_down(
        own_cluster: EmbeddedCluster, tmp_path: Path) -> None:
    """cache_ttl 0 (every query reads Postgres): with Postgres stopped, the zone's records
    are still answered, at the stale TTL, over UDP and TCP; a zone never loaded is SERVFAIL;
    once Postgres is back, fresh answers return by themselves."""
    url = await own_cluster.new_database()
    running = await start_dns(url, tmp_path / "s", **{"database.connect_timeout": 2})
    try:
        await directory.add_workspace(running.runtime.pool, "acme", "Acme")
        await directory.add_workspace(running.runtime.pool, "globex", "Globex")
        await running.domains.add(ZONE, "acme", delegate=True)
        await running.domains.add("mail.globex.example", "globex", delegate=True)
        await verified(running.runtime.pool)
        good = await running.query(ZONE, "MX")
        assert answers(good) == ["10 mx1.agents.test.", "20 mx2.agents.test."]
        assert good.answer[0].ttl == 300

        await asyncio.to_thread(stop_postgres, own_cluster)
        for tcp in (False, True, False):
            stale = await running.query(ZONE, "MX", tcp=tcp)
            assert stale.rcode() == dns.rcode.NOERROR and stale.flags & dns.flags.AA
            assert answers(stale) == answers(good) and stale.answer[0].ttl == 30
        assert (await running.query(ZONE, "SOA")).answer[0][0].serial == \
            (await running.query(ZONE, "SOA")).answer[0][0].serial
        never_loaded = await running.query("mail.globex.example", "MX")
        assert never_loaded.rcode() == dns.rcode.SERVFAIL
        assert (await running.query("example.com", "A")).rcode() == dns.rcode.REFUSED
        assert running.server.catalog.stale_answers >= 3

        await asyncio.to_thread(start_postgres, own_cluster)
        for _ in range(100):
            fresh = await running.query(ZONE, "MX")
            if fresh.answer and fresh.answer[0].ttl == 300:
                break
            await asyncio.sleep(0.2)
        assert fresh.answer[0].ttl == 300, fresh
        assert (await running.query("mail.globex.example", "SOA")).rcode() == dns.rcode.NOERROR
    finally:
        await running.server.stop()
        await running.runtime.close()
