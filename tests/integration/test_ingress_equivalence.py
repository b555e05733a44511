"""Every way in decides alike: the same recipients over SMTP and over each provider webhook
get the same verdict, the same reply, and land in the same mailbox (or the bounce processor).

Recipients: postmaster (the operator's mailbox, routing.postmaster), a VERP bounce address,
a +tag, a verified custom domain, a disabled agent, a foreign domain. Then the content step:
a header over smtp.max_header_size and a bare LF under smtp.bare_lf = "reject" are refused
with the same reply whichever way they came.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization

from smtpd_agent.ingress import ContentVerdict, RcptVerdict
from smtpd_agent.smtp import replies
from smtpd_agent.store import directory
from smtpd_agent.store import domains as domain_store
from tests.http.test_webhooks import (  # noqa: F401 - sns and sendgrid_key are fixtures
    MAILGUN_KEY,
    POSTMARK_AUTH,
    POSTMARK_PASSWORD,
    POSTMARK_USER,
    mailgun_form,
    sendgrid_body,
    sendgrid_headers,
    sendgrid_key,
    ses_notification,
    sns,
)
from tests.support import Dialogue

CUSTOM = "mail.acme-corp.example"
TOKEN = "q7x2k9m4p1v8z3w6r5t0y2u4"
MAILBOX, BOUNCE = "mailbox", "bounce"
# address -> (verdict, where the message lands: (workspace, agent), "bounce", or None)
CASES: dict[str, tuple[RcptVerdict, Any]] = {
    "postmaster@acme.agents.test": (RcptVerdict.MAILBOX, ("hq", "ops")),
    f"b-{TOKEN}@bounce.agents.test": (RcptVerdict.BOUNCE, BOUNCE),
    "support+orders@acme.agents.test": (RcptVerdict.MAILBOX, ("acme", "support")),
    f"support@{CUSTOM}": (RcptVerdict.MAILBOX, ("acme", "support")),
    "sleepy@acme.agents.test": (RcptVerdict.UNKNOWN_MAILBOX, None),
    "someone@foreign.example": (RcptVerdict.RELAY_DENIED, None),
}
RCPT_REPLIES = {RcptVerdict.MAILBOX: replies.RCPT_OK, RcptVerdict.BOUNCE: replies.RCPT_OK,
                RcptVerdict.UNKNOWN_MAILBOX: replies.MAILBOX_UNKNOWN,
                RcptVerdict.RELAY_DENIED: replies.RELAY_DENIED}
PROVIDERS = ("mailgun", "sendgrid", "postmark", "ses")
MAX_HEADER = 2048


def message(rcpt: str, tag: str, extra_header: str = "", body: str = "hello\r\n") -> bytes:
    return (f"From: Alice <alice@example.org>\r\nTo: {rcpt}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@example.org>\r\nDate: Sat, 21 Nov 2026 06:00:00 +0000\r\n"
            f"{extra_header}\r\n{body}").encode()


@pytest.fixture
async def running(start_server, db, sns, sendgrid_key):  # noqa: F811
    public = sendgrid_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    server = start_server(**{
        "routing.postmaster": "ops@hq.agents.test",
        "smtp.max_header_size": MAX_HEADER,
        "smtp.bare_lf": "reject",
        "http.mailgun_signing_key": MAILGUN_KEY,
        "http.sendgrid_public_key": base64.b64encode(public).decode(),
        "http.postmark_username": POSTMARK_USER,
        "http.postmark_password": POSTMARK_PASSWORD,
        **sns.settings(),
    })
    for slug in ("acme", "hq"):
        await directory.add_workspace(db, slug)
    await directory.add_agent(db, "acme", "support")
    await directory.add_agent(db, "acme", "sleepy")
    await directory.set_agent_enabled(db, "acme", "sleepy", False)
    await directory.add_agent(db, "hq", "ops", auto_reply=False)
    custom = await domain_store.add_domain(db, "acme", CUSTOM, "token", f"mail.{CUSTOM}")
    await domain_store.record_check(db, custom, [])  # every record passed: verified
    return server


def smtp_transaction(port: int, rcpt: str, raw: bytes) -> tuple[str, str | None]:
    """The RCPT reply, and the reply to the message when RCPT was accepted."""
    dialogue = Dialogue.open(port)
    try:
        dialogue.reply()
        dialogue.command("EHLO mta.example.org")
        dialogue.command("MAIL FROM:<alice@example.org>")
        code, rcpt_line = dialogue.command(f"RCPT TO:<{rcpt}>")
        data_line = None
        if code == 250:
            assert dialogue.command("DATA")[0] == 354
            dialogue.send(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            data_line = dialogue.reply()[1][-1].decode()
        dialogue.command("QUIT")
        return rcpt_line.decode(), data_line
    finally:
        dialogue.close()


Post = Callable[[str, bytes], Awaitable[tuple[int, dict[str, Any]]]]


def poster(http: aiohttp.ClientSession, base: str, provider: str, sns: Any,  # noqa: F811
           sendgrid_key: Any) -> Post:  # noqa: F811
    async def post(rcpt: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        if provider == "mailgun":
            form = {**mailgun_form(raw), "recipient": rcpt}
            request = http.post(f"{base}/webhook/mailgun/mime", data=form)
        elif provider == "sendgrid":
            body, content_type = sendgrid_body(raw, to=rcpt)
            request = http.post(f"{base}/webhook/sendgrid", data=body,
                                headers=sendgrid_headers(sendgrid_key, body, content_type))
        elif provider == "postmark":
            payload = {"From": "alice@example.org", "OriginalRecipient": rcpt,
                       "FromFull": {"Email": "alice@example.org"}, "RawEmail": raw.decode()}
            request = http.post(f"{base}/webhook/postmark", json=payload, headers=POSTMARK_AUTH)
        else:
            signed = sns.sign(ses_notification(raw, [rcpt]))
            request = http.post(f"{base}/webhook/ses", data=json.dumps(signed),
                                headers=sns.headers(signed))
        async with request as response:
            body = await response.json()
            assert "status" in body, (provider, response.status, body)  # past verification
            return response.status, body
    return post


async def landed(db, tag: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        "SELECT w.slug, a.handle FROM messages m JOIN agents a ON a.id = m.agent_id "
        "JOIN workspaces w ON w.id = m.workspace_id WHERE m.subject = $1", tag)
    return [(r["slug"], r["handle"]) for r in rows]


async def test_recipients_get_the_same_verdict_over_smtp_and_every_webhook(
        running, db, sns, sendgrid_key):  # noqa: F811
    smtp: dict[str, tuple[str, str | None]] = {}
    for index, (rcpt, (verdict, where)) in enumerate(CASES.items()):
        tag = f"smtp-{index}"
        smtp[rcpt] = await asyncio.to_thread(smtp_transaction, running.port, rcpt,
                                             message(rcpt, tag))
        rcpt_line, data_line = smtp[rcpt]
        assert rcpt_line == str(RCPT_REPLIES[verdict]), rcpt
        if verdict.accepted:
            assert data_line is not None and data_line.startswith("250 2.0.0 "), data_line
        assert await landed(db, tag) == ([where] if isinstance(where, tuple) else []), rcpt

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for provider in PROVIDERS:
            post = poster(http, running.http_url, provider, sns, sendgrid_key)
            for index, (rcpt, (verdict, where)) in enumerate(CASES.items()):
                tag = f"{provider}-{index}"
                status, body = await post(rcpt, message(rcpt, tag))
                context = f"{provider} {rcpt}: {body}"
                [seen] = body["recipients"]
                assert (seen["address"], seen["verdict"]) == (rcpt, verdict.value), context
                assert seen["reply"] == smtp[rcpt][0], context  # the RCPT reply SMTP gave
                if where is None:
                    assert body["status"] == "rejected", context
                    assert body["reply"] == smtp[rcpt][0], context
                    assert status == replies.WEBHOOK_PERMANENT_STATUS[provider], context
                    assert await landed(db, tag) == [], context
                elif where == BOUNCE:
                    # handed to the bounce processor, as over SMTP; nothing in a mailbox
                    assert (status, body["status"], body["reason"]) == \
                        (200, "accepted", "bounce"), context
                    assert await landed(db, tag) == [], context
                else:
                    assert (status, body["status"]) == (200, "accepted"), context
                    assert [(s["workspace"], s["agent"]) for s in body["stored"]] == [where]
                    assert await landed(db, tag) == [where], context


async def test_the_content_step_refuses_alike_over_smtp_and_every_webhook(
        running, db, sns, sendgrid_key):  # noqa: F811
    rcpt = "support@acme.agents.test"
    oversized = message(rcpt, "big", extra_header=f"X-Filler: {'a' * MAX_HEADER}\r\n")
    bare_lf = message(rcpt, "bare", body="line one\nline two\r\n")
    expected = {ContentVerdict.HEADER_TOO_BIG: oversized, ContentVerdict.BARE_LF: bare_lf}
    named = {ContentVerdict.HEADER_TOO_BIG: replies.HEADER_TOO_BIG,
             ContentVerdict.BARE_LF: replies.BARE_LF}
    for verdict, raw in expected.items():
        _, data_line = await asyncio.to_thread(smtp_transaction, running.port, rcpt, raw)
        assert data_line == str(named[verdict]) == str(replies.reply_for(verdict))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for provider in PROVIDERS:
            post = poster(http, running.http_url, provider, sns, sendgrid_key)
            for verdict, raw in expected.items():
                status, body = await post(rcpt, raw)
                assert (body["status"], body["reason"], body["reply"]) == \
                    ("rejected", verdict.value, str(replies.reply_for(verdict))), provider
                assert status == replies.WEBHOOK_PERMANENT_STATUS[provider]
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
