"""Authentication wired into the listener: verdicts over real SMTP, DNS from the loopback server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smtpd_agent.smtp import replies
from smtpd_agent.store import directory
from tests.auth.keys import rsa_key, sign
from tests.support import enhanced, smtp_send

RCPT = "support@acme.agents.test"
REPO = Path(__file__).resolve().parents[2]


def mail(from_domain: str, subject: str, extra: str = "") -> bytes:
    return (f"{extra}From: Alice <alice@{from_domain}>\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
            f"Date: Sat, 21 Nov 2026 05:00:00 +0000\r\nMessage-ID: <{subject}@{from_domain}>\r\n"
            "\r\nHello.\r\n").encode()


async def deliver(port: int, raw: bytes, mail_from: str) -> tuple[int, bytes]:
    return await smtp_send(port, raw, mail_from, [RCPT])


@pytest.fixture
async def auth_server(start_server, db):
    running = start_server()
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    return running


async def test_dmarc_reject_policy_failure_is_refused(auth_server, db, dns_server):
    dns_server.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns_server.txt("bank.test", "v=spf1 ip4:192.0.2.1 -all")
    code, line = await deliver(auth_server.port, mail("bank.test", "phish"), "alice@bank.test")
    assert code == 550 and enhanced(line) == "5.7.1", line
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def test_dmarc_quarantine_is_stored_flagged(auth_server, db, dns_server):
    dns_server.txt("_dmarc.shop.test", "v=DMARC1; p=quarantine")
    code, _ = await deliver(auth_server.port, mail("shop.test", "dodgy"), "bounce@elsewhere.test")
    assert code == 250
    row = await db.fetchrow("SELECT dmarc, quarantined FROM messages")
    assert (row["dmarc"], row["quarantined"]) == ("fail", True)


async def test_aligned_dkim_and_spf_pass_are_stored_and_shown(auth_server, db, dns_server):
    key = rsa_key(2048)
    dns_server.txt("sel._domainkey.good.test", key.record)
    dns_server.txt("good.test", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.txt("_dmarc.good.test", "v=DMARC1; p=reject")
    raw = sign(mail("good.test", "signed"), key, "good.test")
    code, _ = await deliver(auth_server.port, raw, "alice@good.test")
    assert code == 250
    row = await db.fetchrow("SELECT spf, dkim, dmarc, arc, quarantined, auth_results, auth_detail, messages.raw "
                            "FROM messages")
    assert (row["spf"], row["dkim"], row["dmarc"], row["quarantined"]) == ("pass", "pass", "pass",
                                                                          False)
    assert json.loads(row["auth_detail"])["dkim_signatures"][0]["domain"] == "good.test"
    assert row["raw"].startswith(b"Authentication-Results: mx.test.local;")
    assert "dkim=pass" in row["auth_results"] and "spf=pass" in row["auth_results"]
    agent = await directory.get_agent(db, "acme", "support")
    from smtpd_agent.store.inbox import agent_inbox
    [thread] = await agent_inbox(db, agent)
    assert thread["messages"][0]["dmarc"] == "pass"


async def test_forged_results_for_our_authserv_id_are_removed(auth_server, db, dns_server):
    forged = "Authentication-Results: mx.test.local; spf=pass; dkim=pass; dmarc=pass\r\n"
    theirs = "Authentication-Results: mx.other.test; spf=fail\r\n"
    code, _ = await deliver(auth_server.port, mail("forger.test", "forged", forged + theirs),
                      "x@forger.test")
    assert code == 250
    raw = await db.fetchval("SELECT messages.raw FROM messages")
    assert raw.count(b"mx.test.local") == 2  # ours (A-R) and the Received "by"
    assert raw.startswith(b"Authentication-Results: mx.test.local;")
    assert b"dmarc=pass" not in raw
    assert theirs.encode() in raw


async def test_dns_temperror_tempfails_when_configured(start_server, db, dns_server):
    running = start_server(**{"auth.temperror": "tempfail"})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    dns_server.set_servfail("broken.test")
    code, line = await deliver(running.port, mail("broken.test", "temp"), "alice@broken.test")
    assert code == 451 and enhanced(line) == replies.TEMP_AUTH_FAILURE.enhanced, line
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def test_dns_temperror_is_accepted_and_marked_by_default(auth_server, db, dns_server):
    dns_server.set_servfail("broken.test")
    code, _ = await deliver(auth_server.port, mail("broken.test", "temp"), "alice@broken.test")
    assert code == 250
    assert await db.fetchval("SELECT spf FROM messages") == "temperror"


async def test_aligned_temperror_under_p_reject_is_stored_quarantined(auth_server, db,
                                                                     dns_server):
    """Issue 16 #2: the From domain publishes p=reject, its aligned DKIM key cannot be
    fetched, SPF is for another domain: DMARC temperror. With auth.temperror = "accept"
    (the default) this mail was stored unflagged; now it is quarantined."""
    key = rsa_key(2048)
    dns_server.set_timeout("sel._domainkey.bank.test")
    dns_server.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns_server.txt("elsewhere.test", "v=spf1 ip4:127.0.0.1 -all")
    raw = sign(mail("bank.test", "stalled"), key, "bank.test")
    code, _ = await deliver(auth_server.port, raw, "bounce@elsewhere.test")
    assert code == 250
    row = await db.fetchrow("SELECT dkim, dmarc, quarantined FROM messages")
    assert (row["dkim"], row["dmarc"], row["quarantined"]) == ("temperror", "temperror", True)


@pytest.mark.timeout(60)  # outer guard: before the fix the listener froze for minutes
async def test_nested_comment_results_header_does_not_stall_other_mail(auth_server, db):
    """Issue 16 #1 over SMTP: 254 KB of nested comments in an Authentication-Results field
    (under smtp.max_header_size) beside a well-behaved delivery; both are answered 250."""
    import asyncio

    n = 127_000
    hostile = ("Authentication-Results: " + "(" * n + ")" * n
               + " mx.test.local; dkim=pass\r\n")
    both = await asyncio.gather(
        deliver(auth_server.port, mail("forger.test", "nested", hostile), "x@forger.test"),
        deliver(auth_server.port, mail("fine.test", "fine"), "a@fine.test"))
    assert [code for code, _ in both] == [250, 250]
    raw = await db.fetchval("SELECT messages.raw FROM messages WHERE subject = 'nested'")
    assert b"((((" not in raw  # the field claimed our id (buried in comments): removed
