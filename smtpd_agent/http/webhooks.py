"""Provider inbound webhooks: another way into the pipeline, beside the SMTP listener.

Each provider's post is verified first (nothing is parsed into the pipeline
before the signature holds), then goes through the steps the SMTP listener
uses (ingress.py): each recipient through the recipient step on the runtime's
one `Router`, the bytes through the content step (line endings, header size,
trace header), into the same record; the raw message is authenticated where
the provider hands it over as sent (SES, SendGrid raw mode, Mailgun's MIME
route, Postmark with RawEmail), then scanned and stored by the same
`Pipeline`, and the verdict answered from the same table (smtp/replies.py).
The client IP of the remote MTA is the provider's to know, so SPF is "none"
and DMARC rests on DKIM.

Bounded before anything else (limits.py): a body over `http.webhook_max_body_size`
(SES: 1 MiB) is refused from its Content-Length, a slow one after
`http.webhook_read_timeout`, and at most `http.webhook_concurrency` posts are read
or processed at once. What needs no body is checked before a post takes a slot
or a byte is read: Postmark's credentials, SendGrid's signature headers and
timestamp, the SNS type and topic headers.

Verification (pure functions, tested on their own):
- SES: SNS message signature, certificate from Amazon's host and path only,
  chained to a trusted CA and naming sns.amazonaws.com, a signed Timestamp within
  `http.sns_max_age`, a MessageId seen once (sns.py); the topic must be in
  `http.ses_topic_arns`. SNS signs fields inside its JSON, so the JSON (at most
  1 MiB) is parsed first; the SES notification inside only after the signature.
- SendGrid (Inbound Parse security policy): ECDSA P-256/SHA-256 over
  timestamp + body, headers X-Twilio-Email-Event-Webhook-{Signature,Timestamp};
  the hash runs as the body arrives and the multipart is parsed only once the
  signature holds. A post is "seen" by that hash, not by the signature's text
  (ECDSA's (r, n-s) and other encodings of one signature are the same post).
- Mailgun: HMAC-SHA256(signing key, timestamp + token), a fresh timestamp,
  and a token used once (kept in Postgres so every host sees it). The form is
  streamed, fields we do not use are dropped, and the signature is checked as
  soon as its three fields have arrived.
- Postmark: HTTP basic auth (the credentials in the webhook URL), before the body.

Answers: bad credentials 401 (403 for SNS, whose signature names no caller),
malformed 400, too large 413, too slow 408, too many at once 503 with Retry-After,
accepted 200. A permanent refusal (virus, DMARC reject, no such mailbox) is
answered so that the provider stops retrying (200 with status "rejected";
Mailgun 406 and Postmark 403, their documented "do not retry"); a temporary
one is 503 so it retries (replies.http_answer). One recipient that could not
be routed for now (a database outage) makes the whole post a 503: a provider
cannot retry part of a post, and a message seen twice for one mailbox is
stored once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import email.parser
import email.policy
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import aiohttp
import asyncpg
import structlog
from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ..config import ConfigError, HttpSettings
from ..ingress import Recipients, RcptVerdict, accept_content, new_session_id, route_recipient
from ..metrics import Metrics
from ..outbound.bounces import BounceProcessor
from ..outbound.dsn import is_ses_feedback
from ..pipeline import Pipeline
from ..record import Envelope
from ..routing import Router
from ..smtp import replies
from ..store.database import CONNECTION_ERRORS
from . import sns
from .limits import CappedStream, Gate, LimitExceeded, check_length, read_body, within
from .responses import HttpError, error, json_response
from .sns import VerificationError

log = structlog.get_logger(__name__)

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
# SNS sends these with every post (AWS "HTTP/HTTPS headers"); checked before the body.
SNS_TYPE_HEADER = "x-amz-sns-message-type"
SNS_TOPIC_HEADER = "x-amz-sns-topic-arn"
# An SNS message is at most 256 KB; its envelope and JSON escaping stay well under this.
SNS_MAX_BODY = 1024 * 1024
# A signing certificate is small; anything bigger is not one.
MAX_CERT_SIZE = 64 * 1024
FETCH_TIMEOUT = 10.0
CERT_CACHE_TTL = 3600.0
MAX_CACHED_CERTS = 32
# Mailgun form: the small fields we keep, their size cap, and how many parts a post may have.
MAILGUN_FIELDS = ("timestamp", "token", "signature", "recipient", "sender")
MAILGUN_FIELD_SIZE = 64 * 1024
MAX_FORM_PARTS = 256
# Parsing a body larger than this (JSON, MIME) runs in a thread, off the event loop.
PARSE_IN_THREAD_ABOVE = 1024 * 1024
RETRY_AFTER = 10

T = TypeVar("T")


# --- pure verification ----------------------------------------------------------------------

def _bytes(text: str) -> bytes:
    # Form fields are attacker-chosen text, lone surrogates included.
    return text.encode("utf-8", "surrogatepass")


def mailgun_signature(signing_key: str, timestamp: str, token: str) -> str:
    return hmac.new(_bytes(signing_key), _bytes(timestamp + token), hashlib.sha256).hexdigest()


def verify_mailgun(signing_key: str, timestamp: str, token: str, signature: str, now: float,
                   max_age: float) -> None:
    expected = mailgun_signature(signing_key, timestamp, token)
    # compare_digest refuses non-ASCII str; bytes compare in constant time whatever they hold.
    if not hmac.compare_digest(expected.encode(), _bytes(signature.lower())):
        raise VerificationError("bad signature")
    check_fresh(timestamp, now, max_age)


def check_fresh(timestamp: str, now: float, max_age: float) -> None:
    try:
        stamp = float(timestamp)
    except ValueError:
        raise VerificationError("bad timestamp") from None
    if not abs(now - stamp) <= max_age:  # also false for NaN
        raise VerificationError("stale timestamp")


def basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """(user, password) of an RFC 7617 Basic Authorization header, as bytes."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """SendGrid shows the key as base64 DER; PEM is accepted too."""
    text = text.strip()
    key = (serialization.load_pem_public_key(text.encode()) if text.startswith("-----")
           else serialization.load_der_public_key(base64.b64decode(text)))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TypeError("not an ECDSA public key")
    return key


def sendgrid_hasher(timestamp: str) -> hashes.Hash:
    """SHA-256 over timestamp + body, fed the body as it arrives: what SendGrid signs."""
    hasher = hashes.Hash(hashes.SHA256())
    hasher.update(timestamp.encode())
    return hasher


def verify_sendgrid(key: ec.EllipticCurvePublicKey, digest: bytes, signature: bytes) -> None:
    """`digest`: SHA-256 of timestamp + body; `signature`: the decoded DER (r, s)."""
    try:
        key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError):
        raise VerificationError("bad signature") from None


def decode_signature(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError("bad signature") from None


def form_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    """multipart/form-data parsed from bytes we already hold (they were signed as bytes)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ValueError("expected multipart/form-data")
    document = (b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode("latin-1")
                + b"\r\n\r\n" + body)
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(document)
    if not parsed.is_multipart():
        raise ValueError("not a multipart body")
    fields: dict[str, bytes] = {}
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = payload if isinstance(payload, bytes) else b""
    return fields


async def off_loop(size: int, function: Callable[..., T], *args: Any) -> T:
    """Run a parser in a thread when its input is big enough to stall the loop."""
    if size > PARSE_IN_THREAD_ABOVE:
        return await asyncio.to_thread(function, *args)
    return function(*args)


# --- turning posts into pipeline input ------------------------------------------------------

@dataclass(frozen=True)
class InboundPost:
    """What a verified provider post tells us about one message."""

    provider: str
    raw: bytes
    mail_from: str
    recipients: tuple[str, ...]
    authenticable: bool = True


def postmark_message(payload: dict[str, Any]) -> tuple[bytes, bool]:
    """Postmark's JSON as MIME: RawEmail when sent along, else rebuilt (unauthenticable)."""
    raw = payload.get("RawEmail")
    if isinstance(raw, str) and raw:
        return raw.encode("utf-8", "surrogateescape"), True
    message = EmailMessage()
    skip = {"content-type", "content-transfer-encoding", "mime-version", "from", "to", "cc",
            "subject", "date", "dkim-signature", "arc-seal", "arc-message-signature",
            "arc-authentication-results", "authentication-results"}
    for header in payload.get("Headers") or []:
        name, value = str(header.get("Name", "")), str(header.get("Value", ""))
        if name and name.lower() not in skip:
            message[name] = value
    for name, key in (("From", "From"), ("To", "To"), ("Cc", "Cc"), ("Subject", "Subject"),
                      ("Date", "Date")):
        if payload.get(key):
            message[name] = str(payload[key])
    message.set_content(str(payload.get("TextBody") or ""))
    if payload.get("HtmlBody"):
        message.add_alternative(str(payload["HtmlBody"]), subtype="html")
    for attachment in payload.get("Attachments") or []:
        maintype, _, subtype = str(attachment.get("ContentType") or
                                   "application/octet-stream").partition("/")
        message.add_attachment(base64.b64decode(str(attachment.get("Content", "")),
                                                validate=True),
                               maintype=maintype or "application",
                               subtype=subtype or "octet-stream",
                               filename=str(attachment.get("Name") or "attachment"))
    return message.as_bytes(policy=email.policy.SMTP), False


def postmark_post(payload: Any) -> InboundPost:
    if not isinstance(payload, dict):
        raise TypeError("expected a JSON object")
    raw, authenticable = postmark_message(payload)
    recipients: list[str] = []
    if payload.get("OriginalRecipient"):
        recipients.append(str(payload["OriginalRecipient"]))
    else:
        for key in ("ToFull", "CcFull", "BccFull"):
            recipients += [str(r["Email"]) for r in payload.get(key) or []
                           if isinstance(r, dict) and r.get("Email")]
    sender = payload.get("FromFull") or {}
    mail_from = str(sender.get("Email") if isinstance(sender, dict) else "") or \
        str(payload.get("From") or "")
    return InboundPost("postmark", raw, mail_from, tuple(recipients), authenticable)


def ses_post(message: dict[str, Any]) -> InboundPost:
    notification = json.loads(str(message.get("Message", "")))
    if not isinstance(notification, dict) or notification.get("notificationType") != "Received":
        raise ValueError("not an SES receipt notification")
    content = notification.get("content")
    if not isinstance(content, str):
        raise TypeError("no content: use the SNS receipt action, not S3")
    receipt = notification.get("receipt") or {}
    mail = notification.get("mail") or {}
    encoding = str(((receipt.get("action") or {}).get("encoding")) or "UTF8").upper()
    raw = (base64.b64decode(content, validate=True) if encoding == "BASE64"
           else content.encode("utf-8", "surrogateescape"))
    recipients = receipt.get("recipients") or mail.get("destination") or []
    if not isinstance(recipients, list):
        raise TypeError("receipt.recipients: expected a list")
    return InboundPost("ses", raw, str(mail.get("source") or ""),
                       tuple(str(r) for r in recipients))


# --- the handlers ---------------------------------------------------------------------------

class Webhooks:
    def __init__(self, settings: HttpSettings, pipeline: Pipeline, router: Router,
                 db: asyncpg.Pool, metrics: Metrics) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.router = router
        self.db = db
        self.metrics = metrics
        self.client: aiohttp.ClientSession | None = None
        self.gate = Gate(settings.webhook_concurrency, RETRY_AFTER)
        # A cache only (per process, short-lived): verified signing keys by URL.
        self._certs: dict[str, tuple[float, rsa.RSAPublicKey]] = {}
        self._sns_url = re.compile(settings.sns_url_pattern)
        self._trust = None
        if settings.ses_topic_arns:
            try:
                self._trust = sns.load_trust_store(settings.sns_ca_file)
            except (OSError, ValueError) as error:
                raise ConfigError(f"http.sns_ca_file: cannot load the CAs that SNS signing "
                                  f"certificates must chain to: {error}") from None
        try:
            self._sendgrid_key = (load_public_key(settings.sendgrid_public_key)
                                  if settings.sendgrid_public_key else None)
        except (ValueError, TypeError, binascii.Error) as error:
            raise ConfigError(f"http.sendgrid_public_key: not an ECDSA public key in base64 "
                              f"DER or PEM ({type(error).__name__})") from None

    async def start(self) -> None:
        self.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT))

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

    def _refuse(self, provider: str, status: int, reason: str,
                headers: dict[str, str] | None = None) -> HttpError:
        self.metrics.webhooks.labels(provider, reason).inc()
        log.info("webhook.refused", provider=provider, status=status, reason=reason)
        return HttpError(status, reason, headers)

    @contextmanager
    def _bounded(self, provider: str) -> Iterator[None]:
        """Count and log the posts refused for size, pace or load like any other refusal."""
        try:
            yield
        except LimitExceeded as refused:
            self.metrics.webhooks.labels(provider, refused.reason).inc()
            log.info("webhook.refused", provider=provider, status=refused.status,
                     reason=refused.reason, in_flight=self.gate.in_flight)
            raise

    def body_limit(self, path: str) -> int:
        limit = self.settings.webhook_max_body_size
        return min(limit, SNS_MAX_BODY) if path.rstrip("/").endswith("/ses") else limit

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """Expect: 100-continue: a body over the limit is refused before it is sent."""
        limit = self.body_limit(request.path)
        if request.content_length is not None and request.content_length > limit:
            provider = request.path.split("/")[2]  # /webhook/<provider>[/...]
            self.metrics.webhooks.labels(provider, "too large").inc()
            log.info("webhook.refused", provider=provider, status=413, reason="too large")
            return error(413, f"request body larger than {limit} bytes")
        if request.version == aiohttp.HttpVersion11:
            if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
                raise web.HTTPExpectationFailed(text="Unknown Expect")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    # -- Mailgun ------------------------------------------------------------------------

    async def mailgun(self, request: web.Request) -> web.Response:
        if not self.settings.mailgun_signing_key:
            raise self._refuse("mailgun", 403, "webhook not configured")
        with self._bounded("mailgun"):
            check_length(request, self.settings.webhook_max_body_size)
            with self.gate.slot():
                fields, raw = await self._mailgun_form(request)
                recipients = [r.strip() for r in fields.get("recipient", "").split(",")
                              if r.strip()]
                if not raw or not recipients:
                    raise self._refuse("mailgun", 400, "body-mime and recipient are required "
                                       "(forward to a URL ending in 'mime')")
                token = fields["token"]
                await self._once("mailgun", token)
                post = InboundPost("mailgun", raw, fields.get("sender", ""), tuple(recipients))
                return await self._deliver(post, replay_token=token)

    def _verify_mailgun(self, fields: dict[str, str]) -> None:
        if not all(fields.get(k) for k in ("timestamp", "token", "signature")):
            raise self._refuse("mailgun", 401, "missing signature")
        try:
            verify_mailgun(self.settings.mailgun_signing_key, fields["timestamp"],
                           fields["token"], fields["signature"], time.time(),
                           self.settings.webhook_max_age)
        except VerificationError as refused:
            raise self._refuse("mailgun", 401, str(refused)) from None

    async def _mailgun_form(self, request: web.Request) -> tuple[dict[str, str], bytes | None]:
        """The fields we use and body-mime; the signature is checked as soon as it is in."""
        limit, timeout = self.settings.webhook_max_body_size, self.settings.webhook_read_timeout
        fields: dict[str, str] = {}
        raw: bytes | None = None
        if request.content_type != "multipart/form-data":
            body = await read_body(request, limit, timeout)
            try:
                pairs = await off_loop(len(body), lambda: parse_qsl(
                    body.decode("latin-1"), keep_blank_values=True, encoding="utf-8",
                    errors="surrogateescape", max_num_fields=MAX_FORM_PARTS))
            except ValueError:
                raise self._refuse("mailgun", 400, "malformed form body") from None
            for name, value in pairs:
                if name in MAILGUN_FIELDS:
                    fields.setdefault(name, value)
                elif name == "body-mime" and raw is None:
                    raw = value.encode("utf-8", "surrogateescape")
            self._verify_mailgun(fields)
            return fields, raw
        verified = False
        async with within(timeout):
            try:
                reader = MultipartReader(request.headers, CappedStream(request.content, limit))
                for _ in range(MAX_FORM_PARTS):
                    part = await reader.next()
                    if part is None:
                        break
                    if not isinstance(part, BodyPartReader):
                        raise ValueError("nested multipart")
                    if part.name in MAILGUN_FIELDS and part.name not in fields:
                        value = await _read_part(part, MAILGUN_FIELD_SIZE)
                        fields[part.name] = value.decode("utf-8", "surrogateescape")
                    elif part.name == "body-mime" and raw is None:
                        raw = await _read_part(part, limit)
                    else:
                        await part.release()
                    if not verified and all(fields.get(k) for k in ("timestamp", "token",
                                                                    "signature")):
                        self._verify_mailgun(fields)
                        verified = True
                else:
                    raise ValueError("too many parts")
            except (ValueError, AssertionError, HttpProcessingError):
                raise self._refuse("mailgun", 400, "malformed form body") from None
        if not verified:
            self._verify_mailgun(fields)
        return fields, raw

    # -- SendGrid -----------------------------------------------------------------------

    async def sendgrid(self, request: web.Request) -> web.Response:
        if self._sendgrid_key is None:
            raise self._refuse("sendgrid", 403, "webhook not configured")
        encoded = request.headers.get(SENDGRID_SIGNATURE, "")
        timestamp = request.headers.get(SENDGRID_TIMESTAMP, "")
        if not encoded or not timestamp:
            raise self._refuse("sendgrid", 401, "missing signature")
        try:
            check_fresh(timestamp, time.time(), self.settings.webhook_max_age)
            signature = decode_signature(encoded)
        except VerificationError as refused:
            raise self._refuse("sendgrid", 401, str(refused)) from None
        with self._bounded("sendgrid"):
            limit = self.settings.webhook_max_body_size
            check_length(request, limit)
            with self.gate.slot():
                hasher = sendgrid_hasher(timestamp)
                body = await read_body(request, limit, self.settings.webhook_read_timeout,
                                       hasher.update)
                digest = hasher.finalize()
                try:
                    verify_sendgrid(self._sendgrid_key, digest, signature)
                except VerificationError as refused:
                    raise self._refuse("sendgrid", 401, str(refused)) from None
                # The signed bytes, not the signature's text: one post, one key.
                replay_token = digest.hex()
                await self._once("sendgrid", replay_token)
                try:
                    fields = await off_loop(len(body), form_fields,
                                            request.headers.get("Content-Type", ""), body)
                    envelope = json.loads(fields["envelope"])
                    raw = fields["email"]
                    recipients = envelope["to"]
                    if not raw or not isinstance(recipients, list):
                        raise ValueError("email and envelope.to are required")
                # Untrusted multipart through the stdlib parser: any failure is a 400.
                except Exception:  # noqa: BLE001
                    raise self._refuse("sendgrid", 400, "malformed body (raw MIME mode needs "
                                       "the 'email' and 'envelope' fields)") from None
                post = InboundPost("sendgrid", raw, str(envelope.get("from") or ""),
                                   tuple(str(r) for r in recipients))
                return await self._deliver(post, replay_token=replay_token)

    # -- Postmark -----------------------------------------------------------------------

    async def postmark(self, request: web.Request) -> web.Response:
        settings = self.settings
        if not settings.postmark_username or not settings.postmark_password:
            raise self._refuse("postmark", 403, "webhook not configured")
        challenge = {"WWW-Authenticate": 'Basic realm="smtpd-agent webhook"'}
        credentials = basic_credentials(request.headers.get("Authorization", ""))
        if credentials is None:
            raise self._refuse("postmark", 401, "missing credentials", challenge)
        user, password = credentials
        good_user = hmac.compare_digest(user, settings.postmark_username.encode())
        good_password = hmac.compare_digest(password, settings.postmark_password.encode())
        if not (good_user and good_password):
            raise self._refuse("postmark", 401, "bad credentials", challenge)
        with self._bounded("postmark"):
            check_length(request, settings.webhook_max_body_size)
            with self.gate.slot():
                body = await read_body(request, settings.webhook_max_body_size,
                                       settings.webhook_read_timeout)
                try:
                    post = await off_loop(len(body), lambda: postmark_post(json.loads(body)))
                # Untrusted JSON through the stdlib's MIME builder: any failure is a 400.
                except Exception:  # noqa: BLE001
                    raise self._refuse("postmark", 400,
                                       "malformed Postmark inbound JSON") from None
                if not post.recipients:
                    raise self._refuse("postmark", 400, "no recipient")
                return await self._deliver(post)

    # -- SES through SNS ----------------------------------------------------------------

    async def ses(self, request: web.Request) -> web.Response:
        if not self.settings.ses_topic_arns:
            raise self._refuse("ses", 403, "webhook not configured")
        kind = request.headers.get(SNS_TYPE_HEADER, "")
        topic = request.headers.get(SNS_TOPIC_HEADER, "")
        if kind not in sns.TYPES:
            raise self._refuse("ses", 400, "malformed SNS message")
        if topic not in self.settings.ses_topic_arns:
            raise self._refuse("ses", 403, "topic not allowed")
        with self._bounded("ses"):
            limit = self.body_limit(request.path)
            check_length(request, limit)
            with self.gate.slot():
                body = await read_body(request, limit, self.settings.webhook_read_timeout)
                return await self._sns_message(body, kind, topic)

    async def _sns_message(self, body: bytes, kind: str, topic: str) -> web.Response:
        try:
            message = json.loads(body)
            if not isinstance(message, dict) or message.get("Type") not in sns.TYPES:
                raise ValueError("not an SNS message")
        except ValueError:
            raise self._refuse("ses", 400, "malformed SNS message") from None
        if message.get("TopicArn") not in self.settings.ses_topic_arns:
            raise self._refuse("ses", 403, "topic not allowed")
        if (message["Type"], message["TopicArn"]) != (kind, topic):
            raise self._refuse("ses", 400, "SNS headers disagree with the message")
        cert_url = str(message.get("SigningCertURL", ""))
        if not sns.certificate_url_allowed(cert_url, self._sns_url):
            raise self._refuse("ses", 403, "signing certificate URL not allowed")
        try:
            sns.check_timestamp(message, datetime.datetime.now(datetime.UTC),
                                self.settings.sns_max_age)
            sns.verify_signature(message, await self._signing_key(cert_url))
        except VerificationError as refused:
            raise self._refuse("ses", 403, str(refused)) from None
        # Signed, so TopicArn and MessageId are SNS's: a second post of them is a copy.
        replay_token = f"{message['TopicArn']} {message.get('MessageId', '')}"
        if not await self._first("ses", replay_token, 2 * self.settings.sns_max_age):
            self.metrics.webhooks.labels("ses", "duplicate").inc()
            log.info("webhook.duplicate", provider="ses", message_id=message.get("MessageId"))
            return json_response({"status": "duplicate"})
        try:
            return await self._sns_verified(message, replay_token)
        except Exception as failure:
            # A retry of this message must get through after an outage or a tempfail.
            if not isinstance(failure, HttpError) or failure.status >= 500:
                await self._forget("ses", replay_token)
            raise

    async def _sns_verified(self, message: dict[str, Any], replay_token: str) -> web.Response:
        kind = message["Type"]
        if kind == "SubscriptionConfirmation":
            return await self._confirm_subscription(message)
        if kind == "UnsubscribeConfirmation":
            log.warning("webhook.sns_unsubscribed", topic=message.get("TopicArn"))
            self.metrics.webhooks.labels("ses", "unsubscribed").inc()
            return json_response({"status": "ok"})
        if is_ses_feedback(str(message.get("Message", ""))):
            # bounces and complaints about mail we sent, on the same verified topic
            event = await BounceProcessor(self.db).receive_ses(str(message["Message"]))
            self.metrics.webhooks.labels("ses", f"feedback_{event.kind}").inc()
            return json_response({"status": "ok", "feedback": event.kind})
        try:
            post = ses_post(message)
        # A signed but unusable notification: 400, nothing stored.
        except Exception:  # noqa: BLE001
            raise self._refuse("ses", 400, "malformed SES notification") from None
        return await self._deliver(post, replay_token=replay_token)

    async def _signing_key(self, url: str) -> rsa.RSAPublicKey:
        """The key of the certificate at `url`, once it is shown to be SNS's."""
        now = time.monotonic()
        cached = self._certs.get(url)
        if cached and cached[0] > now:
            return cached[1]
        assert self.client is not None and self._trust is not None
        try:
            async with self.client.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise VerificationError(f"certificate fetch answered {response.status}")
                pem = await response.content.read(MAX_CERT_SIZE + 1)
        except (aiohttp.ClientError, TimeoutError) as failure:
            log.warning("webhook.sns_cert_unreachable", url=url, error=type(failure).__name__)
            raise HttpError(503, "signing certificate unreachable") from None
        if len(pem) > MAX_CERT_SIZE:
            raise VerificationError("certificate too large")
        wall = datetime.datetime.now(datetime.UTC)
        key, not_after = sns.verify_certificate(pem, self._trust,
                                                self.settings.sns_certificate_name, wall)
        for stale in [u for u, (expires, _) in self._certs.items() if expires <= now]:
            del self._certs[stale]
        if len(self._certs) >= MAX_CACHED_CERTS:
            del self._certs[next(iter(self._certs))]
        self._certs[url] = (now + min(CERT_CACHE_TTL, (not_after - wall).total_seconds()), key)
        return key

    async def _confirm_subscription(self, message: dict[str, Any]) -> web.Response:
        url = str(message.get("SubscribeURL", ""))
        if not sns.subscribe_url_allowed(url, self._sns_url):
            raise self._refuse("ses", 403, "SubscribeURL not allowed")
        assert self.client is not None
        try:
            async with self.client.get(url, allow_redirects=False) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as failure:
            log.warning("webhook.sns_subscribe_failed", error=type(failure).__name__)
            raise HttpError(503, "SubscribeURL unreachable") from None
        if status != 200:
            raise HttpError(503, f"SubscribeURL answered {status}")
        log.info("webhook.sns_subscribed", topic=message.get("TopicArn"))
        self.metrics.webhooks.labels("ses", "subscribed").inc()
        return json_response({"status": "subscribed"})

    # -- shared ---------------------------------------------------------------------------

    async def _first(self, provider: str, token: str, keep: float) -> bool:
        """True the first time `token` is seen; tokens older than `keep` seconds are forgotten."""
        try:
            async with self.db.acquire() as connection:
                await connection.execute(
                    """DELETE FROM webhook_replays
                       WHERE provider = $1 AND seen_at < now() - make_interval(secs => $2)""",
                    provider, keep)
                inserted = await connection.fetchval(
                    """INSERT INTO webhook_replays (provider, token) VALUES ($1, $2)
                       ON CONFLICT DO NOTHING RETURNING true""", provider, token[:512])
        except CONNECTION_ERRORS:
            raise HttpError(503, "database unavailable") from None
        return bool(inserted)

    async def _once(self, provider: str, token: str) -> None:
        """Refuse a token seen before (replay); forget tokens past the freshness window."""
        if not await self._first(provider, token, self.settings.webhook_max_age * 2):
            raise self._refuse(provider, 403, "replayed request")

    async def _forget(self, provider: str, token: str) -> None:
        """A tempfailed post will be retried with the same token: let it through then."""
        try:
            await self.db.execute("DELETE FROM webhook_replays WHERE provider = $1 "
                                  "AND token = $2", provider, token[:512])
        except CONNECTION_ERRORS:
            pass

    async def _deliver(self, post: InboundPost, replay_token: str | None = None) -> web.Response:
        try:
            return await self._ingest(post, replay_token)
        except BaseException:
            # 500 (or cancelled): the provider retries, and the retry must not look replayed
            if replay_token:
                await self._forget(post.provider, replay_token)
            raise

    async def _ingest(self, post: InboundPost, replay_token: str | None) -> web.Response:
        """The recipient and content steps the listener uses, then the pipeline."""
        session_id = new_session_id()
        queue_id = f"{post.provider}-{session_id}"
        settings = self.pipeline.settings
        accepted = Recipients.empty()
        verdicts: list[dict[str, str]] = []
        refusals: list[RcptVerdict] = []
        for address in post.recipients:
            decision = await route_recipient(self.router, address, accepted=len(accepted),
                                             max_recipients=settings.smtp.max_recipients,
                                             mail_from=post.mail_from, transport=post.provider,
                                             acl=self.pipeline.acl)
            reply = replies.answer(decision.verdict, post.provider, self.metrics)
            verdicts.append({"address": address, "verdict": decision.verdict.value,
                             "reply": str(reply)})
            accepted.add(decision)
            if not decision.verdict.accepted:
                refusals.append(decision.verdict)
        if RcptVerdict.TEMPFAIL in refusals:
            return await self._answer(post, replies.reply_for(RcptVerdict.TEMPFAIL),
                                      RcptVerdict.TEMPFAIL.value, queue_id, replay_token,
                                      recipients=verdicts)
        if not len(accepted):
            # as SMTP's DATA would be refused after every RCPT was: the first refusal answers
            return await self._answer(post, replies.reply_for(refusals[0]), refusals[0].value,
                                      queue_id, replay_token, recipients=verdicts)
        envelope = Envelope(
            session_id=session_id, queue_id=queue_id, client_ip="", helo="",
            mail_from=post.mail_from, recipients=tuple(accepted.mailboxes),
            bounce_tokens=tuple(accepted.bounce_tokens), transport=post.provider,
            authenticable=post.authenticable)
        content = accept_content(envelope, post.raw, settings.smtp, settings.server.hostname)
        if content.content is None:
            reply = replies.answer(content.verdict, post.provider, self.metrics)
            return await self._answer(post, reply, content.verdict.value, queue_id,
                                      replay_token, recipients=verdicts)
        outcome = await self.pipeline.process(content.content)
        reply = replies.answer(outcome.verdict, post.provider, self.metrics, queue_id=queue_id,
                               session_id=session_id, signature=outcome.signature)
        return await self._answer(post, reply, outcome.reason, queue_id, replay_token, [
            {"message_id": s.id, "thread_id": s.thread_id, "agent": s.mailbox.handle,
             "workspace": s.mailbox.workspace_slug, "duplicate": s.duplicate}
            for s in outcome.stored], recipients=verdicts)

    async def _answer(self, post: InboundPost, reply: replies.Reply, reason: str, queue_id: str,
                      replay_token: str | None, stored: list[dict[str, Any]] | None = None, *,
                      recipients: list[dict[str, str]]) -> web.Response:
        outcome, status = replies.http_answer(reply, post.provider)
        if reply.temporary and replay_token:
            await self._forget(post.provider, replay_token)
        self.metrics.webhooks.labels(post.provider, outcome).inc()
        log.info("webhook.delivered", provider=post.provider, outcome=outcome, reason=reason,
                 queue_id=queue_id, reply=str(reply))
        return json_response({"status": outcome, "reason": reason, "reply": str(reply),
                              "queue_id": queue_id, "stored": stored or [],
                              "recipients": recipients}, status=status)


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise ValueError("form field too large")
        chunks.append(chunk)
    return b"".join(chunks)
