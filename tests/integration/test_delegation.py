"""Delegated domains end to end, over real sockets only: `domain add --delegate`, the
parent's NS on the loopback test DNS server (which follows the delegation to our DNS
server, as a recursive resolver would), `domain check`, mail over SMTP, a reply signed
with the key store's keys verified against our DNS, `domain rotate-dkim`, and MTA-STS.

The policy file comes from the server's own HTTP surface (aiohttp), which mounts
`mta_sts_route` at /.well-known/mta-sts.txt; the TLS-terminating proxy in front of it
is the operator's (see README), so the test speaks plain HTTP with the proxy's Host header.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import dkim
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import jsonschema
import pytest

from smtpd_agent.dnsserver.server import DnsServer
from smtpd_agent.domains import Domains
from smtpd_agent.domains.keys import SigningKey
from smtpd_agent.store import directory
from smtpd_agent.store.database import migrate
from tests.dnsserver import DnsTestServer
from tests.integration.test_domains import SCHEMA, Cli, publish, settings_for
from tests.support import ServerThread, smtp_send

ZONE = "mail.acme.example"
NAME_SERVERS = ("ns1.agents.test", "ns2.agents.test")
SIGNED = [b"from", b"to", b"subject", b"date", b"message-id", b"in-reply-to"]


def overrides(tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {"dns_server.listen": "127.0.0.1:0", "dns_server.cache_ttl": 0,
            "domains.key_file": str(tmp_path / "dkim.secret"),
            "domains.dkim_rotation_grace": 3600, **more}


def dns_port(server: ServerThread) -> int:
    port = server.app.service(DnsServer).port
    assert port is not None
    return port


def ask(port: int, name: str, rdtype: str) -> dns.message.Message:
    """Straight to our DNS server, not through the test resolver."""
    return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=3)


def dnsfunc(test_dns: DnsTestServer) -> Callable[..., bytes]:
    """dkimpy's key lookup through the loopback resolver (which follows the delegation)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [test_dns.host]
    resolver.port = test_dns.port
    resolver.lifetime = 3

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        return b"".join(b"".join(r.strings) for r in answer)
    return lookup


def reply_message(n: int) -> bytes:
    return (f"From: Acme Support <support@{ZONE}>\r\nTo: alice@example.org\r\n"
            f"Subject: Re: order {n}\r\nDate: Sat, 21 Nov 2026 06:00:00 +0000\r\n"
            f"Message-ID: <reply{n}@{ZONE}>\r\nIn-Reply-To: <q{n}@example.org>\r\n\r\n"
            "Your order ships today.\r\n").encode()


def sign(raw: bytes, keys: list[SigningKey]) -> bytes:
    """What outbound (issue 7) will do: one signature per active key, RSA and Ed25519."""
    for key in keys:
        raw = dkim.sign(raw, key.selector.encode(), key.domain.encode(),
                        key.dkimpy_private_key(), signature_algorithm=key.dkimpy_algorithm,
                        include_headers=SIGNED) + raw
    return raw


def verify_all(raw: bytes, test_dns: DnsTestServer, count: int) -> None:
    verifier = dkim.DKIM(raw)
    for index in range(count):
        assert verifier.verify(idx=index, dnsfunc=dnsfunc(test_dns)), index


def selectors_in(raw: bytes) -> set[str]:
    return {s.decode() for s in
            (dict(dkim.util.parse_tag_value(v.replace(b"\r\n", b"")))[b"s"]
             for k, v in dkim.DKIM(raw).headers if k.lower() == b"dkim-signature")}


@pytest.fixture
async def acme(db: asyncpg.Connection) -> int:
    await migrate(db)
    await directory.add_workspace(db, "acme", "Acme Inc")
    await directory.add_workspace(db, "globex", "Globex")
    await directory.add_agent(db, "acme", "support")
    await directory.add_agent(db, "globex", "support")
    return int(await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'"))


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def delegate(cli: Cli, test_dns: DnsTestServer, port: int) -> dict[str, Any]:
    """`domain add --delegate`, and the parent zone publishing what it printed."""
    added = await cli.json("domain", "add", ZONE, "--workspace", "acme", "--delegate")
    for host in NAME_SERVERS:  # the operator's zone: our name servers' addresses
        test_dns.name_server(host, "127.0.0.1", port)
    publish(test_dns, added)
    return added


async def test_delegated_domain_end_to_end(
        start_server: Callable[..., ServerThread], acme: int, db: asyncpg.Connection,
        pool: asyncpg.Pool, database_url: str, tmp_path: Path, dns_server: DnsTestServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    server = start_server(**overrides(tmp_path))
    port = dns_port(server)
    cli = Cli(settings_for(database_url, tmp_path / "cli", dns_server, **overrides(tmp_path)),
              capsys)

    code, out = await cli("domain", "add", ZONE, "--workspace", "acme", "--delegate")
    assert code == 0, out
    assert f"{ZONE}.\t3600\tIN\tNS\tns1.agents.test." in out and "parent zone" in out
    await cli("domain", "remove", ZONE)
    added = await cli.json("domain", "add", ZONE, "--workspace", "acme", "--delegate")
    jsonschema.validate(added, SCHEMA)
    assert added["delegated"] is True
    token = await db.fetchval("SELECT ownership_token FROM domains WHERE name = $1", ZONE)
    assert [(r["name"], r["type"], r["value"]) for r in added["records"]] == [
        (ZONE, "NS", "ns1.agents.test"), (ZONE, "NS", "ns2.agents.test"),
        ("_smtpd-agent.acme.example", "TXT", f"smtpd-agent-verification={token}")]

    # not delegated yet: check names the NS record and what the parent must publish
    code, out = await cli("domain", "check", ZONE)
    assert code == 1 and f"FAIL      NS    {ZONE}" in out, out
    assert f"fix: publish NS {ZONE} ns1.agents.test in the parent zone" in out

    for host in NAME_SERVERS:
        dns_server.name_server(host, "127.0.0.1", port)
    publish(dns_server, added)
    code, out = await cli("domain", "check", ZONE)
    assert code == 0 and out.strip().endswith(f"{ZONE}: verified (all required records pass)"), out

    # mail to the delegated domain is accepted and lands in acme (not globex's `support`)
    code, line = await smtp_send(
        server.port, b"From: alice@example.org\r\nTo: support@" + ZONE.encode() +
        b"\r\nSubject: order 1\r\nMessage-ID: <q1@example.org>\r\n\r\nWhere is it?\r\n",
        "alice@example.org", [f"support@{ZONE}"])
    assert code == 250, line
    row = await db.fetchrow(
        """SELECT w.slug, a.handle FROM messages m JOIN agents a ON a.id = m.agent_id
           JOIN workspaces w ON w.id = m.workspace_id WHERE m.subject = 'order 1'""")
    assert (row["slug"], row["handle"]) == ("acme", "support")

    # a reply signed with the key store's keys verifies against what our DNS serves
    domains = Domains.open(pool, cli.settings)
    keys = await domains.signing_keys_for(acme, ZONE)
    assert sorted(k.algorithm for k in keys) == ["ed25519", "rsa-2048"]
    first = sign(reply_message(1), keys)
    verify_all(first, dns_server, 2)
    old = {k.selector for k in keys}
    assert selectors_in(first) == old

    serial = ask(port, ZONE, "SOA").answer[0][0].serial
    code, out = await cli("domain", "rotate-dkim", ZONE)
    assert code == 0 and "signing with" in out, out
    rotated = await domains.signing_keys_for(acme, ZONE)
    new = {k.selector for k in rotated}
    assert new.isdisjoint(old) and len(new) == 2
    second = sign(reply_message(2), rotated)
    assert selectors_in(second) == new
    verify_all(second, dns_server, 2)
    verify_all(first, dns_server, 2)  # grace: mail signed before still verifies
    assert ask(port, ZONE, "SOA").answer[0][0].serial > serial

    # grace over: the old selectors are retired and no longer served
    await db.execute("""UPDATE dkim_keys SET retire_after = now() - interval '1 second'
                        WHERE domain = $1 AND retire_after IS NOT NULL""", ZONE)
    [step] = await domains.advance_rotations()
    assert set(step.retired) == old
    for selector in old:
        assert ask(port, f"{selector}._domainkey.{ZONE}", "TXT").rcode() == dns.rcode.NXDOMAIN
    verify_all(sign(reply_message(3), await domains.signing_keys_for(acme, ZONE)), dns_server, 2)
    assert await domains.advance_rotations() == []  # nothing left to do


def order(n: int) -> bytes:
    return (b"From: alice@example.org\r\nTo: support@" + ZONE.encode() +
            b"\r\nSubject: claim %d\r\nMessage-ID: <claim%d@example.org>\r\n\r\nhi\r\n"
            % (n, n))


async def test_a_stale_delegation_does_not_verify_whoever_claims_the_domain_next(
        start_server: Callable[..., ServerThread], acme: int, db: asyncpg.Connection,
        pool: asyncpg.Pool, database_url: str, tmp_path: Path, dns_server: DnsTestServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """acme delegates, verifies, then removes the domain; the parent zone still delegates
    to us. globex claiming the name gets a pending zone that serves SOA and NS only: no MX
    to take the mail, no DKIM key to sign as acme.example. It verifies only once the
    parent's owner publishes globex's own ownership record (in the parent zone, not ours)."""
    server = start_server(**overrides(tmp_path))
    port = dns_port(server)
    cli = Cli(settings_for(database_url, tmp_path / "cli", dns_server, **overrides(tmp_path)),
              capsys)
    await delegate(cli, dns_server, port)
    assert (await cli("domain", "check", ZONE))[0] == 0
    assert (await smtp_send(server.port, order(1), "alice@example.org",
                            [f"support@{ZONE}"]))[0] == 250
    await cli("domain", "remove", ZONE)  # the NS and acme's TXT stay in the parent zone

    claimed = await cli.json("domain", "add", ZONE, "--workspace", "globex", "--delegate")
    [ownership] = [r for r in claimed["records"] if r["purpose"] == "ownership"]
    assert ownership["name"] == "_smtpd-agent.acme.example"
    code, out = await cli("domain", "check", ZONE)
    assert code == 1 and out.strip().endswith(f"{ZONE}: pending (1 record(s) to fix)"), out
    assert f"PASS      NS    {ZONE}" in out and "FAIL      TXT   _smtpd-agent.acme.example" in out
    assert "in the parent zone" in out.split("TXT   _smtpd-agent.acme.example")[1]
    globex = int(await db.fetchval("SELECT id FROM workspaces WHERE slug = 'globex'"))
    keys = await Domains.open(pool, cli.settings).keys.active_keys(globex, ZONE)
    assert len(keys) == 2
    resolver = dnsfunc(dns_server)  # as the internet sees it: through the parent's delegation
    for key in keys:
        assert resolver(key.name.encode()) == b""
        assert ask(port, key.name, "TXT").rcode() == dns.rcode.NXDOMAIN
    assert not ask(port, ZONE, "MX").answer and not ask(port, f"_dmarc.{ZONE}", "TXT").answer
    assert await Domains.open(pool, cli.settings).signing_keys_for(globex, ZONE) == []
    code, line = await smtp_send(server.port, order(2), "alice@example.org",
                                 [f"support@{ZONE}"])
    assert code == 550 and line.startswith(b"550 5.7.1"), line

    publish(dns_server, {"records": [ownership]})  # the parent's owner agrees
    code, out = await cli("domain", "check", ZONE)
    assert code == 0 and out.strip().endswith(f"{ZONE}: verified (all required records pass)")
    assert ask(port, ZONE, "MX").answer
    for key in keys:
        assert resolver(key.name.encode()) != b""
    assert (await smtp_send(server.port, order(3), "alice@example.org",
                            [f"support@{ZONE}"]))[0] == 250
    owners = await db.fetch("""SELECT m.subject, w.slug FROM messages m
                               JOIN workspaces w ON w.id = m.workspace_id ORDER BY m.id""")
    assert [(r["subject"], r["slug"]) for r in owners] == [("claim 1", "acme"),
                                                          ("claim 3", "globex")]


async def test_self_managed_rotation_waits_until_the_key_is_published(
        acme: int, pool: asyncpg.Pool,
        database_url: str, tmp_path: Path, dns_server: DnsTestServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(settings_for(database_url, tmp_path / "cli", dns_server, **overrides(tmp_path)),
              capsys)
    added = await cli.json("domain", "add", "self.acme.example", "--workspace", "acme")
    kinds = {r["purpose"] for r in added["records"]}
    assert {"mta-sts", "mta-sts-host", "tls-rpt"} <= kinds  # self-managed: printed to publish
    domains = Domains.open(pool, cli.settings)
    before = {k.selector for k in await domains.keys.signing_keys(acme, "self.acme.example")}
    code, out = await cli("domain", "rotate-dkim", "self.acme.example")
    assert code == 0 and "not yet served by DNS" in out
    assert out.count("._domainkey.self.acme.example.\t3600\tIN\tTXT\t") == 2, out
    assert {k.selector for k in await domains.keys.signing_keys(acme, "self.acme.example")
            } == before  # the unpublished key does not sign
    for key in await domains.keys.active_keys(acme, "self.acme.example"):
        if key.activated_at is None:
            dns_server.txt(key.name, key.txt)
    [step] = await Domains.open(pool, cli.settings).advance_rotations()
    assert len(step.activated) == 2
    after = {k.selector for k in await domains.keys.signing_keys(acme, "self.acme.example")}
    assert after.isdisjoint(before)


async def test_no_tenant_nests_a_domain_in_another_tenants_delegated_zone(
        acme: int, database_url: str, tmp_path: Path, dns_server: DnsTestServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Our DNS server answers for a delegated zone's whole subtree: another workspace must not
    get `evil.mail.acme.example` served (and verified) from inside acme's zone."""
    cli = Cli(settings_for(database_url, tmp_path / "cli", dns_server), capsys)
    await cli("domain", "add", ZONE, "--workspace", "acme", "--delegate")
    for name, delegate in ((f"evil.{ZONE}", True), (f"evil.{ZONE}", False),
                           ("acme.example", True)):
        argv = ["domain", "add", name, "--workspace", "globex"] + (["--delegate"] * delegate)
        with pytest.raises(directory.DirectoryError, match="another workspace's"):
            await cli(*argv)
    # acme itself may; globex may delegate an unrelated zone
    assert (await cli("domain", "add", f"eu.{ZONE}", "--workspace", "acme"))[0] == 0
    assert (await cli("domain", "add", "mail.globex.example", "--workspace", "globex",
                      "--delegate"))[0] == 0


async def test_default_domain_rotation(acme: int, pool: asyncpg.Pool, database_url: str,
                                       tmp_path: Path, dns_server: DnsTestServer,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The operator's own domain rotates too; its keys stay in the operator workspace."""
    cli = Cli(settings_for(database_url, tmp_path / "cli", dns_server, **overrides(tmp_path)),
              capsys)
    publish(dns_server, await cli.json("dns-records"))
    domains = Domains.open(pool, cli.settings)
    before = {k.selector for k in await domains.signing_keys_for(acme, "acme.agents.test")}
    rotated = await cli.json("domain", "rotate-dkim", "agents.test")
    assert len(rotated["created"]) == 2 and rotated["waiting"] == rotated["created"]
    assert {r["name"].split(".")[0] for r in rotated["records"]} == set(rotated["created"])
    publish(dns_server, rotated)
    [step] = await domains.advance_rotations()
    assert step.domain == "agents.test" and len(step.activated) == 2
    after = {k.selector for k in await domains.signing_keys_for(acme, "acme.agents.test")}
    assert after == set(step.activated) and after.isdisjoint(before)


async def http_get(port: int, host: str, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def policy_from_dns(port: int) -> tuple[str, list[str], str]:
    """(_mta-sts id, MX hosts, _smtp._tls) as our DNS serves them."""
    sts = b"".join(ask(port, f"_mta-sts.{ZONE}", "TXT").answer[0][0].strings).decode()
    mx = sorted(r.exchange.to_text(omit_final_dot=True) for r in ask(port, ZONE, "MX").answer[0])
    rpt = b"".join(ask(port, f"_smtp._tls.{ZONE}", "TXT").answer[0][0].strings).decode()
    return sts.removeprefix("v=STSv1; id="), mx, rpt


async def test_mta_sts_policy_and_records_are_consistent(
        start_server: Callable[..., ServerThread], acme: int, pool: asyncpg.Pool,
        database_url: str, tmp_path: Path, dns_server: DnsTestServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = overrides(tmp_path, **{"mta_sts.mode": "enforce",
                                      "mta_sts.tlsrpt_rua": "mailto:tls@agents.test"})
    server = start_server(**settings)
    cli = Cli(settings_for(database_url, tmp_path / "cli", dns_server, **settings), capsys)
    await delegate(cli, dns_server, dns_port(server))
    assert (await cli("domain", "check", ZONE))[0] == 0

    http_port = server.http_port
    status, policy = await http_get(http_port, f"mta-sts.{ZONE}", "/.well-known/mta-sts.txt")
    assert status == 200
    lines = policy.split("\r\n")
    assert lines[:2] == ["version: STSv1", "mode: enforce"]
    sts_id, mx, rpt = policy_from_dns(dns_port(server))
    assert sorted(line.removeprefix("mx: ") for line in lines if line.startswith("mx: ")) == mx
    assert sts_id == hashlib.sha256(policy.encode()).hexdigest()[:20]
    assert rpt == "v=TLSRPTv1; rua=mailto:tls@agents.test"
    assert ask(dns_port(server), f"mta-sts.{ZONE}", "A").answer[0][0].target.to_text() == \
        "mta-sts.agents.test."
    assert (await http_get(http_port, "mta-sts.unknown.example",
                           "/.well-known/mta-sts.txt"))[0] == 404
    assert (await http_get(http_port, f"mta-sts.{ZONE}", "/.well-known/other.txt"))[0] == 404

    # the operator moves the backup MX: after the restart the policy, its id, the MX records
    # and the SOA serial all change together
    serial = ask(dns_port(server), ZONE, "SOA").answer[0][0].serial
    server.stop()
    moved = start_server(**{**settings, "domains.mx_backup": "mx3.agents.test"})
    status, policy2 = await http_get(moved.http_port, f"mta-sts.{ZONE}",
                                     "/.well-known/mta-sts.txt")
    assert status == 200
    sts_id2, mx2, _ = policy_from_dns(dns_port(moved))
    assert mx2 == ["mx1.agents.test", "mx3.agents.test"] and "mx: mx3.agents.test" in policy2
    assert sts_id2 != sts_id and sts_id2 == hashlib.sha256(policy2.encode()).hexdigest()[:20]
    assert ask(dns_port(moved), ZONE, "SOA").answer[0][0].serial > serial
