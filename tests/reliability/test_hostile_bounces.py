"""Hostile "bounces" to our VERP addresses, over real SMTP: only a DSN (null sender) about a
recipient the delivery really had may bounce it and suppress that address."""

from __future__ import annotations

import pytest

from smtpd_agent.outbound.queue import enqueue, is_suppressed
from smtpd_agent.outbound.verp import verp_address
from smtpd_agent.store import directory
from tests.outbound.conftest import store_reply
from tests.support import DEFAULT_DOMAIN, smtp_send

pytestmark = pytest.mark.timeout(60)


async def sent(db, agent, to: str) -> tuple[int, str]:
    """A reply handed to the relay (state sent): its delivery id and VERP address."""
    async with db.transaction():
        message_id = await store_reply(db, agent, to)
        delivery_id = await enqueue(db, message_id)
    await db.execute("UPDATE deliveries SET status = 'sent' WHERE id = $1", delivery_id)
    await db.execute("UPDATE delivery_recipients SET state = 'sent' WHERE delivery_id = $1",
                     delivery_id)
    token = await db.fetchval("SELECT verp_token FROM deliveries WHERE id = $1", delivery_id)
    return delivery_id, verp_address("b", token, f"bounce.{DEFAULT_DOMAIN}")


def dsn(verp: str, final: str, original: str | None = None) -> bytes:
    block = f"Final-Recipient: rfc822; {final}\r\n"
    if original:
        block = f"Original-Recipient: rfc822;{original}\r\n" + block
    return (f"From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\nTo: {verp}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n"
            "\r\n--b1\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n"
            "--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.example.net\r\n\r\n"
            f"{block}Action: failed\r\nStatus: 5.1.1\r\n"
            "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n--b1--\r\n").encode()


async def states(db, delivery_id: int) -> dict[str, str]:
    rows = await db.fetch("SELECT address, state FROM delivery_recipients WHERE delivery_id = $1",
                          delivery_id)
    return {row["address"]: row["state"] for row in rows}


async def test_a_dsn_shaped_message_from_a_real_sender_is_not_a_bounce(server, db):
    agent = await directory.get_agent(db, "acme", "support")
    delivery_id, verp = await sent(db, agent, "alice@example.org")
    code, line = await smtp_send(server.port, dsn(verp, "alice@example.org"),
                                 "mallory@example.net", [verp])
    assert code == 250, line
    assert await states(db, delivery_id) == {"alice@example.org": "sent"}
    assert not await is_suppressed(db, agent.workspace_id, "alice@example.org")


async def test_a_dsn_about_someone_else_is_not_pinned_on_our_only_recipient(server, db):
    agent = await directory.get_agent(db, "acme", "support")
    delivery_id, verp = await sent(db, agent, "alice@example.org")
    code, line = await smtp_send(server.port, dsn(verp, "someone@elsewhere.example"), "", [verp])
    assert code == 250, line
    assert await states(db, delivery_id) == {"alice@example.org": "sent"}
    assert not await is_suppressed(db, agent.workspace_id, "alice@example.org")


async def test_a_forwarded_recipient_is_found_by_its_original_recipient(server, db):
    agent = await directory.get_agent(db, "acme", "support")
    delivery_id, verp = await sent(db, agent, "alice@example.org, bob@example.org")
    report = dsn(verp, "alice@forwarded.example", original="Alice@Example.org")
    code, line = await smtp_send(server.port, report, "", [verp])
    assert code == 250, line
    assert await states(db, delivery_id) == {"alice@example.org": "bounced",
                                             "bob@example.org": "sent"}
    assert await is_suppressed(db, agent.workspace_id, "alice@example.org")
    assert not await is_suppressed(db, agent.workspace_id, "bob@example.org")
    assert not await is_suppressed(db, agent.workspace_id, "alice@forwarded.example")
