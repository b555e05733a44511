"""Provider webhooks over real HTTP: signed with each provider's documented scheme by the test.

Each accepts a correctly signed sample, which lands in the thread SMTP started;
a tampered one is refused and nothing is stored. The SNS signing certificate
and SubscribeURL are served by the test from loopback.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smtpd_agent.store import directory
from tests.http.test_api import deliver
from tests.sns import TOPIC, Sns, now_stamp, serve_sns

MAILGUN_KEY = "key-0123456789abcdef"
POSTMARK_USER, POSTMARK_PASSWORD = "postmark", "s3cret-inbound"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


POSTMARK_AUTH = basic(POSTMARK_USER, POSTMARK_PASSWORD)
RCPT = "support@acme.agents.test"


def reply_mime(subject: str, in_reply_to: str | None = None, tag: str | None = None) -> bytes:
    lines = ["From: Alice <alice@example.org>", f"To: {RCPT}", f"Subject: {subject}",
             f"Message-ID: <{tag or uuid.uuid4().hex}@example.org>",
             "Date: Sat, 21 Nov 2026 06:00:00 +0000"]
    if in_reply_to:
        lines += [f"In-Reply-To: {in_reply_to}", f"References: {in_reply_to}"]
    return ("\r\n".join(lines) + "\r\n\r\nthanks, that helps\r\n").encode()


@pytest.fixture
async def sns(tmp_path) -> AsyncIterator[Sns]:
    """SNS's side on loopback: a CA of ours, its certificate for sns.amazonaws.com."""
    async for stand_in in serve_sns(tmp_path):
        yield stand_in


@pytest.fixture
def sendgrid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def hooks(start_server, db, sns, sendgrid_key):
    """The server with every webhook configured, acme/support and globex/support."""
    public = sendgrid_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    running = start_server(**{
        "http.mailgun_signing_key": MAILGUN_KEY,
        "http.sendgrid_public_key": base64.b64encode(public).decode(),
        "http.postmark_username": POSTMARK_USER,
        "http.postmark_password": POSTMARK_PASSWORD,
        **sns.settings(),
    })
    await directory.add_workspace(db, "acme")
    await directory.add_workspace(db, "globex")
    await directory.add_agent(db, "acme", "support")
    await directory.add_agent(db, "globex", "support")
    return running


async def first_thread(hooks, db) -> tuple[int, str]:
    """A conversation SMTP started; the webhook replies must join it."""
    raw = reply_mime("order 1234", tag="first")
    assert await asyncio.to_thread(deliver, hooks.port, raw) == 250
    return await db.fetchval("SELECT thread_id FROM messages"), "<first@example.org>"


async def count(db) -> int:
    return await db.fetchval("SELECT count(*) FROM messages")


async def assert_lands_in(db, body: dict, thread_id: int) -> None:
    assert body["status"] == "accepted", body
    [stored] = body["stored"]
    assert stored["thread_id"] == thread_id and stored["workspace"] == "acme"
    row = await db.fetchrow("SELECT thread_id, subject, auth_results, messages.raw FROM messages "
                            "WHERE id = $1", stored["message_id"])
    assert row["thread_id"] == thread_id and row["subject"] == "Re: order 1234"
    assert bytes(row["raw"]).startswith(b"Authentication-Results: mx.test.local;")


# --- Mailgun -----------------------------------------------------------------------------

def mailgun_form(raw: bytes, timestamp: str | None = None, token: str | None = None,
                 key: str = MAILGUN_KEY) -> dict[str, str]:
    timestamp = timestamp or str(int(time.time()))
    token = token or uuid.uuid4().hex
    signature = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": timestamp, "token": token, "signature": signature,
            "recipient": RCPT, "sender": "alice@example.org", "body-mime": raw.decode()}


async def test_mailgun_signed_post_joins_the_thread_and_replays_are_refused(hooks, db, http):
    thread_id, first = await first_thread(hooks, db)
    url = f"{hooks.http_url}/webhook/mailgun/mime"
    form = mailgun_form(reply_mime("Re: order 1234", first))
    async with http.post(url, data=form) as response:
        body = await response.json()
    assert response.status == 200, body
    await assert_lands_in(db, body, thread_id)
    before = await count(db)
    async with http.post(url, data=form) as response:  # the same signed post again
        assert response.status == 403 and "replay" in (await response.json())["error"]

    tampered = {**mailgun_form(reply_mime("Re: order 1234", first)), "recipient":
                "support@globex.agents.test"}
    tampered["signature"] = tampered["signature"][:-1] + ("0" if tampered["signature"][-1] != "0"
                                                          else "1")
    stale = mailgun_form(reply_mime("late"), timestamp=str(int(time.time()) - 3600))
    wrong_key = mailgun_form(reply_mime("forged"), key="key-attacker")
    for bad in (tampered, stale, wrong_key, {"body-mime": "x"}):
        async with http.post(url, data=bad) as response:
            assert response.status == 401, bad.get("timestamp")
    malformed = mailgun_form(b"")
    async with http.post(url, data=malformed) as response:
        assert response.status == 400
    assert await count(db) == before


def multipart(fields: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """multipart/form-data in the given field order (Mailgun's forward posts)."""
    boundary = "mg" + uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                    .encode() + value + b"\r\n" for name, value in fields)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def test_mailgun_multipart_post_is_streamed_and_joins_the_thread(hooks, db, http):
    thread_id, first = await first_thread(hooks, db)
    url = f"{hooks.http_url}/webhook/mailgun/mime"
    form = mailgun_form(reply_mime("Re: order 1234", first))
    # body-mime first, unknown fields dropped, the signature last
    order = ["body-mime", "recipient", "sender", "stripped-text", "timestamp", "token",
             "signature"]
    form["stripped-text"] = "thanks"
    body, content_type = multipart([(name, form[name].encode()) for name in order])
    async with http.post(url, data=body, headers={"Content-Type": content_type}) as response:
        result = await response.json()
    assert response.status == 200, result
    await assert_lands_in(db, result, thread_id)
    before = await count(db)
    forged = {**form, "signature": "0" * 64, "token": uuid.uuid4().hex}
    body, content_type = multipart([(name, forged[name].encode()) for name in order])
    async with http.post(url, data=body, headers={"Content-Type": content_type}) as response:
        assert response.status == 401
    async with http.post(url, data=b"--nope\r\n", headers={
            "Content-Type": "multipart/form-data; boundary=x"}) as response:
        assert response.status in (400, 401)
    assert await count(db) == before


# --- SendGrid ----------------------------------------------------------------------------

def sendgrid_body(raw: bytes, to: str = RCPT) -> tuple[bytes, str]:
    boundary = "xYzZY" + uuid.uuid4().hex
    fields = [("envelope", json.dumps({"to": [to], "from": "alice@example.org"}).encode()),
              ("email", raw), ("from", b"Alice <alice@example.org>"), ("to", to.encode()),
              ("subject", b"Re: order 1234"), ("charsets", b'{"to":"UTF-8"}')]
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                    .encode() + value + b"\r\n" for name, value in fields)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def sendgrid_headers(key: ec.EllipticCurvePrivateKey, body: bytes, content_type: str,
                     timestamp: str | None = None) -> dict[str, str]:
    timestamp = timestamp or str(int(time.time()))
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {"Content-Type": content_type,
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": timestamp}


async def test_sendgrid_signed_raw_post_joins_the_thread(hooks, db, http, sendgrid_key):
    thread_id, first = await first_thread(hooks, db)
    url = f"{hooks.http_url}/webhook/sendgrid"
    body, content_type = sendgrid_body(reply_mime("Re: order 1234", first))
    async with http.post(url, data=body,
                         headers=sendgrid_headers(sendgrid_key, body, content_type)) as response:
        result = await response.json()
    assert response.status == 200, result
    await assert_lands_in(db, result, thread_id)
    before = await count(db)

    headers = sendgrid_headers(sendgrid_key, body, content_type)
    tampered = body.replace(b"thanks, that helps", b"send the money!!!")
    other_key = ec.generate_private_key(ec.SECP256R1())
    cases = [(tampered, headers),
             (body, sendgrid_headers(other_key, body, content_type)),
             (body, sendgrid_headers(sendgrid_key, body, content_type,
                                     timestamp=str(int(time.time()) - 3600))),
             (body, {"Content-Type": content_type})]
    for data, bad_headers in cases:
        async with http.post(url, data=data, headers=bad_headers) as response:
            assert response.status == 401
    junk = b"not multipart at all"
    async with http.post(url, data=junk,
                         headers=sendgrid_headers(sendgrid_key, junk, "text/plain")) as response:
        assert response.status == 400
    assert await count(db) == before


# --- Postmark ----------------------------------------------------------------------------

def postmark_json(first: str, raw: bool) -> dict:
    payload = {
        "From": "alice@example.org", "FromFull": {"Email": "alice@example.org", "Name": "Alice"},
        "To": RCPT, "ToFull": [{"Email": RCPT, "Name": "", "MailboxHash": ""}],
        "OriginalRecipient": RCPT, "Subject": "Re: order 1234",
        "MessageID": str(uuid.uuid4()), "Date": "Sat, 21 Nov 2026 06:00:00 +0000",
        "TextBody": "thanks, that helps", "HtmlBody": "<p>thanks, that helps</p>",
        "Headers": [{"Name": "Message-ID", "Value": f"<{uuid.uuid4().hex}@example.org>"},
                    {"Name": "In-Reply-To", "Value": first}],
        "Attachments": [{"Name": "note.txt", "Content": base64.b64encode(b"hi").decode(),
                         "ContentType": "text/plain", "ContentLength": 2}],
    }
    if raw:
        payload["RawEmail"] = reply_mime("Re: order 1234", first).decode()
    return payload


async def test_postmark_basic_auth_post_joins_the_thread(hooks, db, http):
    thread_id, first = await first_thread(hooks, db)
    url = f"{hooks.http_url}/webhook/postmark"
    for raw in (True, False):
        async with http.post(url, json=postmark_json(first, raw), headers=POSTMARK_AUTH) as response:
            result = await response.json()
        assert response.status == 200, result
        await assert_lands_in(db, result, thread_id)
    rebuilt = await db.fetchrow("SELECT auth_results, dkim, text_body FROM messages "
                                "ORDER BY id DESC LIMIT 1")
    # no message as sent: nothing to verify, so "none", not a failure
    assert rebuilt["auth_results"] == "mx.test.local; none" and rebuilt["dkim"] == "none"
    assert await db.fetchval("SELECT count(*) FROM attachments WHERE filename = 'note.txt'") == 1
    before = await count(db)
    wrong = basic(POSTMARK_USER, "guess")
    async with http.post(url, json=postmark_json(first, True), headers=wrong) as response:
        assert response.status == 401
    async with http.post(url, json=postmark_json(first, True)) as response:
        assert response.status == 401
    async with http.post(url, data=b"{not json", headers=POSTMARK_AUTH) as response:
        assert response.status == 400
    broken = {**postmark_json(first, False), "Attachments": [{"Content": "***"}]}
    async with http.post(url, json=broken, headers=POSTMARK_AUTH) as response:
        assert response.status == 400
    assert await count(db) == before


# --- SES through SNS ---------------------------------------------------------------------

def ses_notification(raw: bytes, recipients: list[str]) -> dict[str, str]:
    notification = {
        "notificationType": "Received",
        "mail": {"source": "alice@example.org", "destination": recipients,
                 "messageId": uuid.uuid4().hex},
        "receipt": {"recipients": recipients, "spfVerdict": {"status": "PASS"},
                    "action": {"type": "SNS", "topicArn": TOPIC, "encoding": "BASE64"}},
        "content": base64.b64encode(raw).decode(),
    }
    return {"Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": TOPIC,
            "Subject": "Amazon SES Email Receipt Notification",
            "Message": json.dumps(notification), "Timestamp": now_stamp()}


async def test_ses_signed_notification_joins_the_thread(hooks, db, http, sns):
    thread_id, first = await first_thread(hooks, db)
    url = f"{hooks.http_url}/webhook/ses"
    for version in ("1", "2"):
        signed = sns.sign(ses_notification(reply_mime("Re: order 1234", first), [RCPT]), version)
        async with http.post(url, data=json.dumps(signed),
                             headers=sns.headers(signed)) as response:
            result = await response.json()
        assert response.status == 200, result
        await assert_lands_in(db, result, thread_id)
    assert sns.hits.count(sns.cert_url.removeprefix(sns.base)) == 1  # cached
    before = await count(db)

    good = sns.sign(ses_notification(reply_mime("Re: order 1234", first), [RCPT]))
    tampered = {**good, "Message": good["Message"].replace("alice@", "mallory@")}
    other_topic = sns.sign({**ses_notification(b"x", [RCPT]),
                            "TopicArn": "arn:aws:sns:eu-west-1:666:evil"})
    foreign_cert = {**good, "SigningCertURL": "https://evil.example/cert.pem"}
    for bad in (tampered, other_topic, foreign_cert):
        async with http.post(url, data=json.dumps(bad), headers=sns.headers(bad)) as response:
            assert response.status == 403
    # headers that say another topic than the signed message: refused before any fetch
    lying = {**sns.headers(good), "x-amz-sns-topic-arn": "arn:aws:sns:eu-west-1:666:evil"}
    async with http.post(url, data=json.dumps(good), headers=lying) as response:
        assert response.status == 403
    for malformed in (b"{", b"[]", json.dumps({"Type": "Nonsense"}).encode()):
        async with http.post(url, data=malformed, headers=sns.headers(good)) as response:
            assert response.status == 400
    async with http.post(url, data=json.dumps(good)) as response:  # no SNS headers at all
        assert response.status == 400
    assert await count(db) == before
    assert "/evil" not in " ".join(sns.hits)


async def test_ses_subscription_is_confirmed_only_from_an_allowed_url(hooks, http, sns):
    url = f"{hooks.http_url}/webhook/ses"
    message = {"Type": "SubscriptionConfirmation", "MessageId": str(uuid.uuid4()),
               "Token": "tok123", "TopicArn": TOPIC, "Message": "You have chosen to subscribe",
               "SubscribeURL": f"{sns.base}/?Action=ConfirmSubscription&Token=tok123",
               "Timestamp": now_stamp()}
    signed = sns.sign(message)
    async with http.post(url, data=json.dumps(signed), headers=sns.headers(signed)) as response:
        assert response.status == 200 and (await response.json())["status"] == "subscribed"
    assert "/?Action=ConfirmSubscription&Token=tok123" in sns.hits
    for subscribe_url in ("https://attacker.example/?Action=ConfirmSubscription",
                          f"{sns.base}/confirm?Action=ConfirmSubscription&Token=tok123",
                          f"{sns.base}/?Action=Unsubscribe&Token=tok123"):
        elsewhere = sns.sign({**message, "MessageId": str(uuid.uuid4()),
                              "SubscribeURL": subscribe_url})
        async with http.post(url, data=json.dumps(elsewhere),
                             headers=sns.headers(elsewhere)) as response:
            assert response.status == 403, subscribe_url
    assert sum("Action=" in hit for hit in sns.hits) == 1


async def test_unknown_recipient_is_rejected_without_retry_and_nothing_stored(hooks, db, http):
    form = mailgun_form(reply_mime("hello"))
    form["recipient"] = "nobody@acme.agents.test"
    async with http.post(f"{hooks.http_url}/webhook/mailgun", data=form) as response:
        body = await response.json()
    assert response.status == 406 and body["status"] == "rejected"
    assert body["reply"].startswith("550 5.1.1")
    assert await count(db) == 0


async def test_unconfigured_webhooks_refuse_everything(server, http, db):
    for provider in ("ses", "sendgrid", "mailgun", "postmark"):
        async with http.post(f"{server.http_url}/webhook/{provider}", data=b"{}") as response:
            assert response.status == 403, provider
    assert await count(db) == 0
