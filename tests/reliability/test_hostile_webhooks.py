"""Hostile posts to the provider webhooks, over real HTTP to the running server.

Each defect of issue 16 item 8 gets a test: bodies read before anything is
checked, no cap on posts in flight, SNS certificates taken from anywhere and
never chained, no Timestamp window or MessageId memory, SendGrid replays
under a re-encoded signature, SES feedback suppressing strangers. The floods
are answered from their headers, and a provider's real post still lands.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (decode_dss_signature,
                                                              encode_dss_signature)

from smtpd_agent.config import HttpSettings
from smtpd_agent.http.sns import certificate_url_allowed
from smtpd_agent.outbound.queue import is_suppressed
from smtpd_agent.store import directory
from tests.http.test_api import deliver
from tests.http.test_webhooks import (POSTMARK_AUTH, POSTMARK_PASSWORD, POSTMARK_USER, RCPT,
                                      basic, count, first_thread, hooks, postmark_json,  # noqa: F401
                                      reply_mime, sendgrid_body, sendgrid_headers,
                                      sendgrid_key, ses_notification, sns)
from tests.outbound.test_ses_webhook import feedback, sent_via_ses
from tests.sns import CERT_PATH, TOPIC, Authority, now_stamp

# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(120)

# P-256 group order: (r, n - s) is a second valid signature for every (r, s).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ANSWER_WITHIN = 5.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


# --- raw HTTP, so a test controls how much of a body is ever sent ---------------------------

@dataclass
class Answer:
    status: int
    headers: dict[str, str]


async def _answer(reader: asyncio.StreamReader) -> Answer:
    status_line = await reader.readline()
    match = re.match(rb"HTTP/1\.[01] (\d{3})", status_line)
    assert match, status_line
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(match.group(1)), headers)


async def post_head(port: int, path: str, headers: dict[str, str], length: int,
                    sent: bytes = b"", within: float = ANSWER_WITHIN) -> Answer:
    """Declare a `length`-byte body, send only `sent` of it, and wait for the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                     f"Content-Length: {length}\r\n\r\n".encode() + sent)
        await writer.drain()
        # (a 100 Continue comes back as status 100: the server wanted the body)
        return await asyncio.wait_for(_answer(reader), within)
    finally:
        writer.close()


async def post_chunked(port: int, path: str, headers: dict[str, str], body: bytes,
                       within: float = ANSWER_WITHIN) -> Answer:
    """Send `body` with chunked encoding (no Content-Length to judge it by)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for start in range(0, len(body), 65536):
                chunk = body[start:start + 65536]
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # refused mid-body: the answer is already there
        return await asyncio.wait_for(_answer(reader), within)
    finally:
        writer.close()


async def post_full(port: int, path: str, headers: dict[str, str], body: bytes,
                    within: float = 60.0) -> Answer:
    """Send a whole body in 64 KiB writes (the client holds no copy), then read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        view = memoryview(body)
        try:
            for start in range(0, len(body), 65536):
                writer.write(view[start:start + 65536])
                await writer.drain()
        except ConnectionError:
            pass
        return await asyncio.wait_for(_answer(reader), within)
    finally:
        writer.close()


def sns_headers(topic: str = TOPIC, kind: str = "Notification") -> dict[str, str]:
    return {"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": kind,
            "x-amz-sns-message-id": str(uuid.uuid4()), "x-amz-sns-topic-arn": topic}


def forged_sendgrid_headers(timestamp: str | None = None) -> dict[str, str]:
    """Fresh-looking headers anyone can write: a timestamp and base64 of no signature."""
    return {"Content-Type": "multipart/form-data; boundary=x",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(os.urandom(71)).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": timestamp or str(int(time.time()))}


# --- bodies: capped, and refused before they are read ---------------------------------------

async def test_oversized_bodies_are_refused_from_their_headers(hooks, sendgrid_key):
    """413 before a byte of the body: from Content-Length, and before 100 Continue."""
    port, limit = hooks.http_port, HttpSettings().webhook_max_body_size
    cases = [
        # an SNS message is at most 256 KB: 2 MiB of "SNS" is not SNS (the old cap was 51 MB)
        ("/webhook/ses", sns_headers(), 2 * 1024 * 1024),
        ("/webhook/sendgrid", forged_sendgrid_headers(), limit + 1),
        ("/webhook/mailgun/mime", {"Content-Type": "multipart/form-data; boundary=x"},
         limit + 1),
        ("/webhook/postmark", {**POSTMARK_AUTH, "Content-Type": "application/json"}, limit + 1),
    ]
    for path, headers, length in cases:
        answer = await post_head(port, path, headers, length)
        assert answer.status == 413, (path, answer)
        expecting = await post_head(port, path, {**headers, "Expect": "100-continue"}, length)
        assert expecting.status == 413, (path, expecting)


async def test_chunked_body_over_the_cap_is_refused(hooks):
    """No Content-Length to go by: counted as it arrives, 413 at the cap (SES: 1 MiB)."""
    body = b"{" + b" " * (1024 * 1024 + 10) + b"}"
    answer = await post_chunked(hooks.http_port, "/webhook/ses", sns_headers(), body)
    assert answer.status == 413


async def test_unauthenticated_posts_are_refused_before_their_body(hooks, db):
    """What needs no body is checked first: the answer comes while the body is unsent."""
    port, length = hooks.http_port, 10 * 1024 * 1024
    cases = [
        ("/webhook/sendgrid", forged_sendgrid_headers(str(int(time.time()) - 3600)), 401),
        ("/webhook/sendgrid", {"Content-Type": "multipart/form-data; boundary=x"}, 401),
        ("/webhook/ses", sns_headers(topic="arn:aws:sns:eu-west-1:666:evil"), 403),
        ("/webhook/ses", {"Content-Type": "text/plain"}, 400),
        ("/webhook/postmark", {**basic(POSTMARK_USER, "guess"),
                               "Content-Type": "application/json"}, 401),
    ]
    for path, headers, status in cases:
        answer = await post_head(port, path, headers, length, sent=b"x" * 1024)
        assert answer.status == status, (path, answer)
    assert await count(db) == 0


async def test_mailgun_signature_is_checked_before_the_rest_of_the_form_arrives(hooks, db):
    """Signature fields first, then 64 KiB of a 10 MiB body: 401 without the rest.

    (aiohttp's multipart reader looks ahead a chunk or two past a field, so some of the
    next field must be there for the signature field to end.)"""
    first = (b"--x\r\nContent-Disposition: form-data; name=\"timestamp\"\r\n\r\n"
             + str(int(time.time())).encode() + b"\r\n"
             b"--x\r\nContent-Disposition: form-data; name=\"token\"\r\n\r\n"
             + uuid.uuid4().hex.encode() + b"\r\n"
             b"--x\r\nContent-Disposition: form-data; name=\"signature\"\r\n\r\n"
             + b"0" * 64 + b"\r\n"
             b"--x\r\nContent-Disposition: form-data; name=\"body-mime\"\r\n\r\n")
    answer = await post_head(hooks.http_port, "/webhook/mailgun/mime",
                             {"Content-Type": "multipart/form-data; boundary=x"},
                             10 * 1024 * 1024, sent=first + b"x" * 65536)
    assert answer.status == 401
    assert await count(db) == 0


# --- posts in flight --------------------------------------------------------------------------

async def test_posts_in_flight_are_capped_and_slow_bodies_time_out(start_server, db, sns,
                                                                    sendgrid_key, http):
    server = start_server(**{"http.postmark_username": POSTMARK_USER,
                             "http.postmark_password": POSTMARK_PASSWORD,
                             "http.sendgrid_public_key": _public(sendgrid_key),
                             "http.webhook_concurrency": 2, "http.webhook_read_timeout": 3})
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    url = f"{server.http_url}/webhook/postmark"
    # two posts that look signed and then send their body at a trickle: they hold both slots
    holders = [asyncio.create_task(post_head(server.http_port, "/webhook/sendgrid",
                                             forged_sendgrid_headers(), 1024 * 1024,
                                             sent=b"--x\r\n", within=15))
               for _ in range(2)]
    await asyncio.sleep(0.5)
    started = time.monotonic()
    async with http.post(url, json=postmark_json("<first@example.org>", True),
                         headers=POSTMARK_AUTH) as response:
        assert response.status == 503, await response.text()
        assert int(response.headers["Retry-After"]) > 0
    assert time.monotonic() - started < ANSWER_WITHIN
    # the trickle ends at the read timeout (408), which frees the slots
    assert [answer.status for answer in await asyncio.gather(*holders)] == [408, 408]
    async with http.post(url, json=postmark_json("<first@example.org>", True),
                         headers=POSTMARK_AUTH) as response:
        assert response.status == 200, await response.text()


def _public(key: ec.EllipticCurvePrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


class PeakRss:
    """Peak resident memory of this process (the server runs in it) while in the block."""

    def __init__(self) -> None:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 1e6


async def test_forged_full_bodies_cost_bounded_memory(hooks, sendgrid_key, http):
    """24 forged 8 MB SendGrid posts at once: a few are read (and fail), the rest get 503."""
    body = os.urandom(8 * 1024 * 1024)
    with PeakRss() as memory:
        answers = await asyncio.gather(*(
            post_full(hooks.http_port, "/webhook/sendgrid", forged_sendgrid_headers(), body)
            for _ in range(24)))
    statuses = sorted(answer.status for answer in answers)
    print(f"forged 8 MB x 24: peak RSS +{memory.growth_mb:.0f} MB, statuses {statuses}")
    assert set(statuses) <= {401, 503}, statuses
    assert statuses.count(503) >= 12, statuses
    # 24 bodies read at once would be 24 x 8 MB x 2 (chunks, then joined) ~ 400 MB
    assert memory.growth_mb < 150, memory.growth_mb
    # afterwards a real post is read and lands
    raw_body, content_type = sendgrid_body(reply_mime("after the flood"))
    async with http.post(f"{hooks.http_url}/webhook/sendgrid", data=raw_body,
                         headers=sendgrid_headers(sendgrid_key, raw_body,
                                                  content_type)) as response:
        assert response.status == 200, await response.text()


async def test_real_posts_land_while_a_flood_is_refused_cheaply(hooks, db, http, sns,
                                                                sendgrid_key):
    thread_id, first = await first_thread(hooks, db)
    port, limit = hooks.http_port, HttpSettings().webhook_max_body_size
    stale = str(int(time.time()) - 3600)
    flood_kinds = [
        ("/webhook/sendgrid", forged_sendgrid_headers(), limit + 1),
        ("/webhook/sendgrid", forged_sendgrid_headers(stale), 5_000_000),
        ("/webhook/ses", sns_headers(topic="arn:aws:sns:eu-west-1:666:evil"), 200_000),
        ("/webhook/postmark", {**basic(POSTMARK_USER, "guess")}, 5_000_000),
        ("/webhook/mailgun", {"Content-Type": "multipart/form-data; boundary=x"}, limit + 1),
    ]
    refused: list[int] = []
    stop = asyncio.Event()

    async def flood() -> None:
        n = 0
        while not stop.is_set():
            path, headers, length = flood_kinds[n % len(flood_kinds)]
            n += 1
            answer = await post_head(port, path, headers, length, sent=b"x" * 512)
            refused.append(answer.status)

    flooders = [asyncio.create_task(flood()) for _ in range(16)]
    latencies = []
    try:
        await asyncio.sleep(0.5)
        for n in range(3):
            started = time.monotonic()
            signed = sns.sign(ses_notification(reply_mime("Re: order 1234", first), [RCPT]))
            async with http.post(f"{hooks.http_url}/webhook/ses", data=json.dumps(signed),
                                 headers=sns.headers(signed)) as response:
                assert response.status == 200, await response.text()
            raw_body, content_type = sendgrid_body(reply_mime("Re: order 1234", first))
            async with http.post(f"{hooks.http_url}/webhook/sendgrid", data=raw_body,
                                 headers=sendgrid_headers(sendgrid_key, raw_body,
                                                          content_type)) as response:
                assert response.status == 200, await response.text()
            async with http.post(f"{hooks.http_url}/webhook/postmark",
                                 json=postmark_json(first, True),
                                 headers=POSTMARK_AUTH) as response:
                assert response.status == 200, await response.text()
            # and SMTP beside it
            code = await asyncio.to_thread(deliver, hooks.port, reply_mime(f"smtp {n}"))
            assert code == 250
            latencies.append(time.monotonic() - started)
    finally:
        stop.set()
        await asyncio.gather(*flooders)
    assert max(latencies) < ANSWER_WITHIN, latencies
    assert len(refused) > 50 and set(refused) <= {401, 403, 413}, sorted(set(refused))
    print(f"flood: {len(refused)} refused posts; real posts (3 webhooks + SMTP) "
          f"per round: max {max(latencies):.2f} s")
    assert await db.fetchval("SELECT count(*) FROM messages WHERE thread_id = $1",
                             thread_id) == 1 + 3 * 3


# --- SNS: where the certificate comes from, whose it is, when it was signed --------------------

def test_default_certificate_url_pattern_is_amazons_sns_host_and_path_only():
    origin = re.compile(HttpSettings().sns_url_pattern)
    good = "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem"
    assert certificate_url_allowed(good, origin)
    assert certificate_url_allowed(good.replace("us-west-2", "cn-north-1").replace(
        ".com/", ".com.cn/"), origin)
    assert certificate_url_allowed(good.replace("us-west-2", "us-gov-west-1"), origin)
    for bad in (
        # the S3 bucket named "sns" (anyone can create it and serve a file there)
        "https://sns.s3.amazonaws.com/SimpleNotificationService-f3ecfb72.pem",
        "https://sns.s3-external-1.amazonaws.com/SimpleNotificationService-f3ecfb72.pem",
        "https://sns.us-west-2.amazonaws.com.evil.example/SimpleNotificationService-ab.pem",
        "http://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb72.pem",
        "https://sns.us-west-2.amazonaws.com/evil.pem",
        "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb72.pem?x=1",
        "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb72.pem#x",
        "https://sns.us-west-2.amazonaws.com/x/../SimpleNotificationService-ab.pem",
        "https://sns.us-west-2.amazonaws.com:8443/SimpleNotificationService-f3ecfb72.pem",
    ):
        assert not certificate_url_allowed(bad, origin), bad
    # the pattern alone already refuses the bucket, whatever the path
    assert not origin.match("https://sns.s3.amazonaws.com/SimpleNotificationService-ab.pem")


async def _post_sns(http, hooks, signed: dict) -> tuple[int, dict]:
    async with http.post(f"{hooks.http_url}/webhook/ses", data=json.dumps(signed),
                         headers={"Content-Type": "text/plain; charset=UTF-8",
                                  "x-amz-sns-message-type": signed["Type"],
                                  "x-amz-sns-message-id": signed["MessageId"],
                                  "x-amz-sns-topic-arn": signed["TopicArn"]}) as response:
        return response.status, await response.json()


async def test_sns_certificate_must_chain_to_the_trusted_ca_and_name_sns(hooks, db, http, sns):
    """Certificates served from an allowed URL but not SNS's are not trusted."""
    message = ses_notification(reply_mime("forged"), [RCPT])
    impostors = {
        # self-signed, for the right name
        "/SimpleNotificationService-aaaaaaaaaaaaaaaa.pem": Authority.create().issue(),
        # from the trusted CA, for another name
        "/SimpleNotificationService-bbbbbbbbbbbbbbbb.pem": sns.authority.issue("evil.example"),
    }
    for path, (key, pem) in impostors.items():
        sns.files[path] = pem
        signed = sns.sign({**message, "MessageId": str(uuid.uuid4())}, key=key,
                          cert_url=f"{sns.base}{path}")
        status, body = await _post_sns(http, hooks, signed)
        assert (status, body.get("error")) == (403, "signing certificate not trusted"), path
    # a certificate at a path that is not SNS's: refused and never fetched
    key, pem = sns.authority.issue()
    sns.files["/evil.pem"] = pem
    signed = sns.sign({**message, "MessageId": str(uuid.uuid4())}, key=key,
                      cert_url=f"{sns.base}/evil.pem")
    status, body = await _post_sns(http, hooks, signed)
    assert (status, body.get("error")) == (403, "signing certificate URL not allowed")
    assert "/evil.pem" not in sns.hits
    assert await count(db) == 0
    # the real one still works
    status, body = await _post_sns(http, hooks, sns.sign(message))
    assert status == 200 and body["status"] == "accepted", body


async def test_sns_timestamp_outside_the_window_is_refused(hooks, db, http, sns):
    for offset in (-2 * 3600, 2 * 3600, -3601):
        message = {**ses_notification(reply_mime("old"), [RCPT]),
                   "Timestamp": now_stamp(offset)}
        status, body = await _post_sns(http, hooks, sns.sign(message))
        assert (status, body.get("error")) == (403, "stale Timestamp"), offset
    message = {**ses_notification(reply_mime("recent"), [RCPT]), "Timestamp": now_stamp(-3000)}
    status, body = await _post_sns(http, hooks, sns.sign(message))
    assert status == 200, body
    assert await count(db) == 1


async def test_sns_message_id_is_processed_once(hooks, db, http, sns):
    """A signed message posted again (within its window) is answered, not processed again."""
    agent = await directory.get_agent(db, "acme", "support")
    await sent_via_ses(db, agent, "angry@example.org", "ses-0100")
    complaint = sns.sign(feedback("ses-0100", "Complaint", "angry@example.org"))
    status, body = await _post_sns(http, hooks, complaint)
    assert (status, body.get("feedback")) == (200, "complaint")
    assert await is_suppressed(db, agent.workspace_id, "angry@example.org")
    # the operator lifts the suppression; a replay of the old complaint must not restore it
    await db.execute("DELETE FROM suppressions WHERE address = 'angry@example.org'")
    status, body = await _post_sns(http, hooks, complaint)
    assert (status, body.get("status")) == (200, "duplicate")
    assert not await is_suppressed(db, agent.workspace_id, "angry@example.org")

    received = sns.sign(ses_notification(reply_mime("once"), [RCPT]))
    assert (await _post_sns(http, hooks, received))[1]["status"] == "accepted"
    assert (await _post_sns(http, hooks, received))[1]["status"] == "duplicate"
    assert await db.fetchval("SELECT count(*) FROM webhook_replays WHERE provider = 'ses'") == 2


# --- SendGrid: one post, whatever its signature looks like -------------------------------------

def _variants(signature_b64: str) -> list[str]:
    """Other encodings of the same post's signature: (r, n - s), and base64 with slack bits set."""
    r, s = decode_dss_signature(base64.b64decode(signature_b64))
    variants = [base64.b64encode(encode_dss_signature(r, P256_ORDER - s)).decode()]
    if signature_b64.endswith("=") and not signature_b64.endswith("=="):
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        last = alphabet.index(signature_b64[-2])
        variants.append(signature_b64[:-2] + alphabet[last | 0b11] + "=")
    return variants


async def test_sendgrid_replay_under_another_signature_encoding_is_refused(hooks, db, http,
                                                                           sendgrid_key):
    url = f"{hooks.http_url}/webhook/sendgrid"
    for attempt in range(20):  # until a signature whose base64 has slack bits (1 in 3)
        body, content_type = sendgrid_body(reply_mime(f"pay invoice {attempt}"))
        headers = sendgrid_headers(sendgrid_key, body, content_type)
        signature = headers["X-Twilio-Email-Event-Webhook-Signature"]
        if len(_variants(signature)) == 2:
            break
    async with http.post(url, data=body, headers=headers) as response:
        assert response.status == 200, await response.text()
    for variant in _variants(signature):
        assert variant != signature
        replay = {**headers, "X-Twilio-Email-Event-Webhook-Signature": variant}
        async with http.post(url, data=body, headers=replay) as response:
            result = await response.json()
            assert (response.status, result.get("error")) == (403, "replayed request"), result
    assert await count(db) == 1


# --- SES feedback: only about the delivery's own recipients ------------------------------------

async def test_ses_feedback_suppresses_only_recipients_of_that_delivery(hooks, db, http, sns):
    agent = await directory.get_agent(db, "acme", "support")
    bounced = await sent_via_ses(db, agent, "nobody@example.org", "ses-0200")
    await sent_via_ses(db, agent, "customer@example.org", "ses-0201")
    bounce = feedback("ses-0200", "Bounce", "nobody@example.org")
    document = json.loads(bounce["Message"])
    document["bounce"]["bouncedRecipients"].append({"emailAddress": "ceo@bigcorp.example"})
    document["bounce"]["bouncedRecipients"].append({"emailAddress": "customer@example.org"})
    bounce["Message"] = json.dumps(document)
    status, body = await _post_sns(http, hooks, sns.sign(bounce))
    assert status == 200, body
    assert await is_suppressed(db, agent.workspace_id, "nobody@example.org")
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", bounced) == "bounced"
    for stranger in ("ceo@bigcorp.example", "customer@example.org"):
        assert not await is_suppressed(db, agent.workspace_id, stranger), stranger
    complaint = feedback("ses-0200", "Complaint", "customer@example.org")
    status, body = await _post_sns(http, hooks, sns.sign(complaint))
    assert status == 200, body
    assert not await is_suppressed(db, agent.workspace_id, "customer@example.org")
    assert await db.fetchval("SELECT state FROM delivery_recipients WHERE address = $1",
                             "customer@example.org") == "sent"
