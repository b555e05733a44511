"""Outbound through an SMTP relay, end to end: the real server (every service), real Postgres,
an aiosmtpd relay sink and the DNS server on loopback. Replies are stored as the agent worker
stores them; the OutboundWorker inside the server sweeps, signs, sends and records."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import dkim
import dns.resolver
import pytest
from structlog.testing import capture_logs

from smtpd_agent.auth import authenticate
from smtpd_agent.config import AuthSettings, DnsSettings
from smtpd_agent.dns import Resolver
from smtpd_agent.domains import Domains
from smtpd_agent.message import parse_message
from smtpd_agent.outbound.queue import enqueue, is_suppressed
from smtpd_agent.record import Envelope, InboundMessage
from smtpd_agent.smtp import replies
from tests.support import DEFAULT_DOMAIN, Dialogue, enhanced, smtp_send

from .conftest import fast, make_agent, store_reply, wait_state


# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(60)


async def publish_default_domain(server, database_url, dns_server) -> None:
    """The operator's records (DKIM keys, DMARC, SPF) into the loopback DNS server."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        record_set = await Domains.open(pool, server.settings).default_record_set()
    finally:
        await pool.close()
    for record in record_set.records:
        value = (record.priority, record.value) if record.type == "MX" else record.value
        dns_server.add(record.name, record.type, value)


def dkim_verify(raw: bytes, nameserver: str) -> list[tuple[bytes, bytes, bool]]:
    """(algorithm, d=, verified) of every signature, dkimpy fetching keys from the test DNS."""
    host, _, port = nameserver.rpartition(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [host], int(port)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT", lifetime=2)
        return b"".join(b"".join(r.strings) for r in answer)

    verifier = dkim.DKIM(raw)
    results = []
    for index, (name, value) in enumerate(h for h in verifier.headers
                                           if h[0].lower() == b"dkim-signature"):
        tags = dict(part.strip().split(b"=", 1) for part in value.split(b";") if b"=" in part)
        results.append((tags[b"a"], tags[b"d"], bool(dkim.DKIM(raw).verify(idx=index,
                                                                            dnsfunc=dnsfunc))))
    return results


async def test_reply_leaves_signed_and_verifies_with_published_keys(
        start_server, db, database_url, dns_server, relay):
    sink, url = relay
    server = start_server(**fast(url, **{"outbound.concurrency": 1}))
    agent = await make_agent(db)
    await publish_default_domain(server, database_url, dns_server)
    first = await store_reply(db, agent, "Bob <bob@example.org>")
    second = await store_reply(db, agent, "carol@example.org")
    got = await asyncio.to_thread(sink.wait_for, 2)
    row = await wait_state(db, first, {"sent"})
    by_rcpt = {r.rcpt_tos[0]: r for r in got}
    message = by_rcpt["bob@example.org"]
    # Return-Path: VERP on the default domain's bounce subdomain, naming this message
    assert message.mail_from == f"b-{row['verp_token']}@bounce.{DEFAULT_DOMAIN}"
    assert row["provider_message_id"].startswith("SINK")
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", first) == "sent"
    assert await db.fetchval("SELECT state FROM delivery_recipients WHERE delivery_id = $1",
                             row["id"]) == "sent"
    # both signatures verify with dkimpy against the keys the DNS server publishes
    verdicts = await asyncio.to_thread(dkim_verify, message.data, dns_server.nameserver)
    assert sorted(verdicts) == [(b"ed25519-sha256", DEFAULT_DOMAIN.encode(), True),
                                (b"rsa-sha256", DEFAULT_DOMAIN.encode(), True)]
    # a receiver's DMARC (ours): d=agents.test aligns with From acme.agents.test (relaxed)
    resolver = Resolver(DnsSettings(nameservers=[dns_server.nameserver], timeout=1))
    inbound = InboundMessage(
        Envelope(session_id="t", client_ip="192.0.2.10", helo="relay.example.net",
                 mail_from=message.mail_from, recipients=()),
        message.data, parse_message(message.data))
    result = await authenticate(inbound, resolver, AuthSettings(timeout=5), "mx.example.org")
    assert (result.dkim, result.dmarc) == ("pass", "pass"), result.header_value
    # one relay connection carried both messages (reused, RSET between them)
    await wait_state(db, second, {"sent"})
    assert sink.connections == 1


async def test_451_twice_then_250_three_attempts_growing_delays_one_delivery(
        start_server, db, relay):
    sink, url = relay
    sink.script = ["451 4.3.0 try later", "451 4.3.0 try later"]
    start_server(**fast(url))
    agent = await make_agent(db)
    message_id = await store_reply(db, agent, "bob@example.org")
    row = await wait_state(db, message_id, {"sent"})
    attempts = await db.fetch(
        """SELECT attempt, outcome, code, retry_in, started_at, finished_at FROM delivery_attempts
           WHERE delivery_id = $1 ORDER BY attempt""", row["id"])
    assert [(a["attempt"], a["outcome"], a["code"]) for a in attempts] == [
        (1, "deferred", 451), (2, "deferred", 451), (3, "sent", 250)]
    assert [a["retry_in"] for a in attempts] == [0.3, 0.6, None]
    # The schedule the queue stored: each retry started no earlier than the time the
    # previous attempt set (its finish plus retry_in). A busy machine only delays attempts.
    for before, after in zip(attempts, attempts[1:]):
        scheduled = before["finished_at"] + timedelta(seconds=before["retry_in"])
        assert after["started_at"] >= scheduled, (before, after)
    assert len(sink.rcpt_times) == 3
    await asyncio.sleep(0.5)
    assert len(sink.received) == 1 and row["attempts"] == 3


async def test_550_bounces_suppresses_and_the_next_reply_is_skipped(start_server, db, relay):
    sink, url = relay
    sink.script = ["550 5.1.1 <gone@example.org>: Recipient address rejected"]
    start_server(**fast(url))
    agent = await make_agent(db)
    first = await store_reply(db, agent, "Gone <gone@example.org>")
    row = await wait_state(db, first, {"bounced"})
    assert row["attempts"] == 1 and "550" in row["last_error"]
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", first) == "bounced"
    assert await is_suppressed(db, agent.workspace_id, "GONE@example.org")
    suppression = await db.fetchrow("SELECT * FROM suppressions WHERE address = $1",
                                    "gone@example.org")
    assert (suppression["reason"], suppression["delivery_id"]) == ("hard_bounce", row["id"])
    # tenant isolation: another workspace may still write to the address
    other = await make_agent(db, "globex")
    assert not await is_suppressed(db, other.workspace_id, "gone@example.org")
    # the next reply to it is skipped, recorded, and never reaches the relay
    async with db.transaction():
        second = await store_reply(db, agent, "gone@example.org")
        delivery_id = await enqueue(db, second)
    skipped = await db.fetchrow(
        "SELECT state, detail FROM delivery_recipients WHERE delivery_id = $1", delivery_id)
    assert skipped["state"] == "suppressed"
    assert (await wait_state(db, second, {"failed"}))["last_error"] == \
        "every recipient is suppressed"
    await asyncio.sleep(0.3)
    assert sink.received == [] and len(sink.rcpt_times) == 1


def dsn_for(verp: str, recipient: str, status: str = "5.1.1") -> bytes:
    return (f"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\nTo: {verp}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\r\n"
            "--b1\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
            "--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.example.org\r\n\r\n"
            f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: {status}\r\n"
            f"Diagnostic-Code: smtp; 550 {status} user unknown\r\n\r\n"
            "--b1--\r\n").encode()


async def test_dsn_over_smtp_to_the_verp_address_bounces_the_right_message(
        start_server, db, relay):
    sink, url = relay
    server = start_server(**fast(url))
    agent = await make_agent(db)
    kept = await store_reply(db, agent, "alice@example.org")
    lost = await store_reply(db, agent, "later-gone@example.org")
    got = await asyncio.to_thread(sink.wait_for, 2)
    lost_row = await wait_state(db, lost, {"sent"})
    verp = next(r.mail_from for r in got if r.rcpt_tos == ["later-gone@example.org"])
    assert lost_row["verp_token"] in verp
    with capture_logs() as logs:
        code, line = await smtp_send(server.port, dsn_for(verp, "later-gone@example.org"), "",
                                     [verp])
    assert code == 250, line
    assert (await db.fetchrow("SELECT status FROM deliveries WHERE message_id = $1",
                              lost))["status"] == "bounced"
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", lost) == "bounced"
    assert (await db.fetchrow("SELECT status FROM deliveries WHERE message_id = $1",
                              kept))["status"] == "sent"
    assert await is_suppressed(db, agent.workspace_id, "later-gone@example.org")
    assert not await is_suppressed(db, agent.workspace_id, "alice@example.org")
    # nothing of the DSN reached a mailbox
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'inbound'") == 0
    assert any(e["event"] == "bounce.recorded" for e in logs)


async def test_bounce_domain_routing(start_server, db, relay):
    _, url = relay
    server = start_server(**fast(url))
    await make_agent(db)
    dialogue = Dialogue.open(server.port)
    dialogue.reply()
    dialogue.command("EHLO mx.example.org")
    dialogue.command("MAIL FROM:<>")
    # a well-formed token we never issued: accepted, then ignored (no backscatter, no leak)
    code, _ = dialogue.command(f"RCPT TO:<b-{'x' * 24}@bounce.{DEFAULT_DOMAIN}>")
    assert code == 250
    code, line = dialogue.command(f"RCPT TO:<postmaster-x@bounce.{DEFAULT_DOMAIN}>")
    assert (code, enhanced(line)) == (replies.MAILBOX_UNKNOWN.code,
                                      replies.MAILBOX_UNKNOWN.enhanced)
    code, line = dialogue.command(f"RCPT TO:<b-{'x' * 24}@bounce.elsewhere.example>")
    assert code == replies.RELAY_DENIED.code


async def test_signing_failure_never_sends_unsigned(start_server, db, relay):
    sink, url = relay
    start_server(**fast(url))
    agent = await make_agent(db)
    # From a domain the workspace has no keys for (not registered): must not leave
    message_id = await store_reply(db, agent, "bob@example.org",
                                   sender="support@unregistered.example")
    row = await wait_state(db, message_id, {"failed"})
    assert row["last_error"].startswith("DKIM signing failed")
    assert row["signed"] is None
    await asyncio.sleep(0.3)
    assert sink.received == [] and sink.rcpt_times == []


async def test_gives_up_after_the_configured_age_with_a_failure_record(start_server, db, relay):
    sink, url = relay
    sink.script = ["421 4.4.2 busy"] * 50
    start_server(**fast(url, **{"outbound.give_up_after": 1.0, "outbound.retry_base": 0.2}))
    agent = await make_agent(db)
    message_id = await store_reply(db, agent, "bob@example.org")
    row = await wait_state(db, message_id, {"failed"})
    assert row["last_error"].startswith("gave up after")
    assert await db.fetchval("SELECT state FROM delivery_recipients WHERE delivery_id = $1",
                             row["id"]) == "failed"
    # The schedule the queue recorded, not how many attempts this machine managed in a second.
    # The rule: after attempt n a 4xx is retried in 0.2 * 2**(n-1) s unless the message would
    # then be older than give_up_after (1 s); the age is taken between the attempt's start
    # and the moment its row is written.
    attempts = await db.fetch("""SELECT attempt, outcome, started_at, finished_at, retry_in
                                   FROM delivery_attempts WHERE delivery_id = $1
                                  ORDER BY attempt""", row["id"])
    assert [a["attempt"] for a in attempts] == list(range(1, row["attempts"] + 1))
    *retried, last = attempts
    created = row["created_at"]
    for attempt in retried:
        assert attempt["outcome"] == "deferred"
        assert attempt["retry_in"] == pytest.approx(0.2 * 2 ** (attempt["attempt"] - 1))
        assert (attempt["started_at"] - created).total_seconds() + attempt["retry_in"] <= 1.0
    assert last["outcome"] == "failed"
    assert (last["finished_at"] - created).total_seconds() + 0.2 * 2 ** (last["attempt"] - 1) > 1.0
    assert not await is_suppressed(db, agent.workspace_id, "bob@example.org")


# aiosmtpd warns about AUTH without its own notion of TLS (implicit TLS, see the fixture)
IMPLICIT_AUTH = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@IMPLICIT_AUTH
async def test_relay_over_tls_with_auth(start_server, db, secure_relay):
    relay = secure_relay
    start_server(**fast(relay.url, **{"outbound.relay_ca_file": str(relay.ca_file),
                                      "outbound.concurrency": 1}))
    agent = await make_agent(db)
    first = await store_reply(db, agent, "bob@example.org")
    second = await store_reply(db, agent, "carol@example.org")
    await asyncio.to_thread(relay.sink.wait_for, 2)
    for message_id in (first, second):
        await wait_state(db, message_id, {"sent"})
    # one TLS session, authenticated once, carried both (EHLO again after STARTTLS)
    assert len(relay.logins) == 1 and relay.logins[0].endswith("agent@relay True")
    assert relay.sink.connections == (2 if "starttls" in relay.url else 1)


@IMPLICIT_AUTH
async def test_relay_certificate_is_verified(start_server, db, secure_relay):
    relay = secure_relay
    start_server(**fast(relay.url))  # no relay_ca_file: the self-signed relay is not trusted
    agent = await make_agent(db)
    message_id = await store_reply(db, agent, "bob@example.org")
    row = await wait_state(db, message_id, {"deferred", "sending"})
    deadline = asyncio.get_running_loop().time() + 60
    while not row["last_error"] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        row = await db.fetchrow("SELECT * FROM deliveries WHERE id = $1", row["id"])
    assert "CERTIFICATE_VERIFY_FAILED" in row["last_error"], row["last_error"]
    assert relay.sink.received == [] and relay.logins == []
