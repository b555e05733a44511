"""Hostile DKIM beside a well-behaved sender, over real SMTP (issue 16 #2).

Six messages at once, each a 1 MB body under 1,300 minimal DKIM signatures whose key
exists (so every one would hash the body): before the fix they filled the shared
executor and the GIL for minutes, a good sender's SPF check timed out, and its mail
from a p=reject domain passed as temperror. Now the good sender still gets its 250
within a few seconds, with SPF and DMARC passing.
"""

from __future__ import annotations

import asyncio
import base64

import pytest

from smtpd_agent.store import directory
from tests.auth.keys import rsa_key
from tests.support import smtp_send

RCPT = "support@acme.agents.test"


def hostile_message(signatures: int = 1300, body_bytes: int = 1_000_000) -> bytes:
    bogus = base64.b64encode(b"\0" * 32).decode()
    sig = (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=attacker.test; s=sel; "
           f"h=from; bh={bogus}; b={bogus}\r\n").encode()
    line = b"x" * 998 + b"\r\n"
    return (sig * signatures + f"From: a@attacker.test\r\nTo: {RCPT}\r\nSubject: hostile\r\n"
            "Message-ID: <h@attacker.test>\r\n\r\n".encode()
            + line * (body_bytes // len(line)))


GOOD = (f"From: Alice <alice@good.test>\r\nTo: {RCPT}\r\nSubject: good\r\n"
        "Message-ID: <good@good.test>\r\n\r\nHello.\r\n").encode()


@pytest.mark.timeout(180)
async def test_hostile_dkim_does_not_starve_a_good_sender(start_server, db, dns_server):
    running = start_server(**{"auth.timeout": 10})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support", auto_reply=False)
    dns_server.txt("sel._domainkey.attacker.test", rsa_key(2048).record)
    dns_server.txt("good.test", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.txt("_dmarc.good.test", "v=DMARC1; p=reject")

    raw = hostile_message()
    hostile = [asyncio.create_task(smtp_send(running.port, raw, "h@attacker.test", [RCPT],
                                             timeout=150)) for _ in range(6)]
    await asyncio.sleep(1.0)  # the hostile messages are being received and verified
    code, line = await asyncio.wait_for(
        smtp_send(running.port, GOOD, "alice@good.test", [RCPT]), 10)
    assert code == 250, line
    row = await db.fetchrow("SELECT spf, dmarc, quarantined FROM messages "
                            "WHERE subject = 'good'")
    assert (row["spf"], row["dmarc"], row["quarantined"]) == ("pass", "pass", False)

    answered = await asyncio.gather(*hostile)
    assert [code for code, _ in answered] == [250] * 6
    details = await db.fetch("SELECT dkim, auth_detail FROM messages WHERE subject = 'hostile'")
    assert details and all(d["dkim"] == "fail" for d in details)
