"""Each loop-prevention rule over real SMTP: the job is skipped and says why; no API call."""

from __future__ import annotations

import pytest

from tests.agent.helpers import deliver, mail, wait_jobs

# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(60)

PDF_MAIL = (
    b"From: Alice <alice@example.org>\r\nTo: support@acme.agents.test\r\nSubject: scan\r\n"
    b"Message-ID: <scan@example.org>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
    b"see attached\r\n--b\r\nContent-Type: application/pdf\r\n"
    b"Content-Disposition: attachment; filename=\"a.pdf\"\r\n\r\n%PDF-1.4\r\n--b--\r\n")

RULES = [
    # (id, raw message, envelope sender, expected skip reason)
    ("auto-submitted", mail(extra="Auto-Submitted: auto-replied\r\n"), "alice@example.org",
     "Auto-Submitted: auto-replied"),
    ("auto-generated", mail(extra="Auto-Submitted: auto-generated\r\n"), "alice@example.org",
     "Auto-Submitted: auto-generated"),
    ("precedence-bulk", mail(extra="Precedence: bulk\r\n"), "alice@example.org",
     "Precedence: bulk"),
    ("precedence-list", mail(extra="Precedence: list\r\n"), "alice@example.org",
     "Precedence: list"),
    ("precedence-junk", mail(extra="Precedence: junk\r\n"), "alice@example.org",
     "Precedence: junk"),
    ("list-id", mail(extra="List-Id: <news.example.org>\r\n"), "alice@example.org",
     "mailing list (List-Id)"),
    ("list-unsubscribe", mail(extra="List-Unsubscribe: <mailto:u@example.org>\r\n"),
     "alice@example.org", "mailing list (List-Unsubscribe)"),
    ("null-sender", mail(), "", "null sender (bounce or DSN)"),
    ("mailer-daemon", mail(sender="MAILER-DAEMON@example.org"), "MAILER-DAEMON@example.org",
     "automated sender (MAILER-DAEMON@example.org)"),
    ("postmaster", mail(sender="postmaster@example.org"), "postmaster@example.org",
     "automated sender (postmaster@example.org)"),
    ("noreply", mail(sender="no-reply@shop.example"), "no-reply@shop.example",
     "automated sender (no-reply@shop.example)"),
    ("own-agent", mail(sender="sales@acme.agents.test"), "sales@acme.agents.test",
     "from our own agents (sales@acme.agents.test)"),
    ("unscanned", PDF_MAIL, "alice@example.org", "scan status unscanned"),
]


@pytest.mark.parametrize("raw, mail_from, reason", [r[1:] for r in RULES],
                         ids=[r[0] for r in RULES])
async def test_rule_skips_with_reason(agent_server, db, messages_api, raw, mail_from, reason):
    deliver(agent_server.port, raw, mail_from=mail_from)
    [job] = await wait_jobs(db)
    assert (job["status"], job["skip_reason"]) == ("skipped", reason)
    assert job["finished_at"] is not None and job["attempts"] == 1
    assert messages_api.requests == []
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'outbound'") == 0


async def test_dmarc_fail_is_not_answered(agent_server, db, dns_server, messages_api):
    dns_server.txt("_dmarc.bank.test", "v=DMARC1; p=none")
    dns_server.txt("bank.test", "v=spf1 ip4:192.0.2.1 -all")
    deliver(agent_server.port, mail(sender="alice@bank.test"), mail_from="alice@bank.test")
    [job] = await wait_jobs(db)
    assert (job["status"], job["skip_reason"]) == ("skipped", "sender not authenticated: DMARC fail")
    assert messages_api.requests == []


async def test_quarantined_is_not_answered(agent_server, db, dns_server, messages_api):
    dns_server.txt("_dmarc.shop.test", "v=DMARC1; p=quarantine")
    deliver(agent_server.port, mail(sender="alice@shop.test"), mail_from="alice@elsewhere.test")
    [job] = await wait_jobs(db)
    assert (job["status"], job["skip_reason"]) == ("skipped", "quarantined")
    assert messages_api.requests == []
