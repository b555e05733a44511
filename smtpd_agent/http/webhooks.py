"""Provider inbound webhooks: another way into the pipeline, beside the SMTP listener.

Each provider's post is verified first (nothing is parsed into the pipeline
before the signature holds), then turned into the same `ReceivedContent` the
listener builds: recipients routed by the same `Router`, the raw message
authenticated where the provider hands it over as sent (SES, SendGrid raw
mode, Mailgun's MIME route, Postmark with RawEmail), then scanned and stored
by the same `Pipeline`. The client IP of the remote MTA is the provider's to
know, so SPF is "none" and DMARC rests on DKIM.

Verification (pure functions, tested on their own):
- SES: SNS message signature (SignatureVersion 1 = SHA1, 2 = SHA256, RSA
  PKCS#1 v1.5) over the documented canonical string, with the certificate
  fetched only from a URL matching `http.sns_url_pattern`; the topic must be
  in `http.ses_topic_arns`. SubscriptionConfirmation fetches SubscribeURL
  only when it matches the same pattern.
- SendGrid (Inbound Parse security policy): ECDSA P-256/SHA-256 over
  timestamp + body, headers X-Twilio-Email-Event-Webhook-{Signature,Timestamp}.
- Mailgun: HMAC-SHA256(signing key, timestamp + token), a fresh timestamp,
  and a token used once (kept in Postgres so every host sees it).
- Postmark: HTTP basic auth (the credentials in the webhook URL).

Answers: bad credentials 401 (403 for SNS, whose signature names no caller),
malformed 400, accepted 200. A permanent refusal by the pipeline (virus,
DMARC reject, no such mailbox) is answered so that the provider stops
retrying (200 with status "rejected"; Mailgun 406 and Postmark 403, their
documented "do not retry"); a temporary one is 503 so it retries.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import aiohttp
import asyncpg
import structlog
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..config import ConfigError, HttpSettings
from ..metrics import Metrics
from ..pipeline import Pipeline
from ..record import ReceivedContent, Recipient
from ..routing import RouteKind, Router
from ..smtp import replies
from ..outbound.bounces import BounceProcessor
from ..outbound.dsn import is_ses_feedback
from ..smtp.server import new_session_id
from ..store.database import CONNECTION_ERRORS
from .responses import HttpError, json_response

log = structlog.get_logger(__name__)

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
# SNS canonical strings (AWS "Verifying the signatures of Amazon SNS messages").
SNS_NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
SNS_SUBSCRIPTION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                         "TopicArn", "Type")
SNS_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
# A signing certificate is small; anything bigger is not one.
MAX_CERT_SIZE = 64 * 1024
FETCH_TIMEOUT = 10.0
CERT_CACHE_TTL = 3600.0
# What the provider should do after a permanent refusal: stop retrying.
PERMANENT_STATUS = {"ses": 200, "sendgrid": 200, "mailgun": 406, "postmark": 403}


class VerificationError(ValueError):
    """The request is not provably from the provider."""


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


def verify_sendgrid(key: ec.EllipticCurvePublicKey, timestamp: str, body: bytes,
                    signature: str, now: float, max_age: float) -> None:
    try:
        key.verify(base64.b64decode(signature, validate=True), timestamp.encode() + body,
                   ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        raise VerificationError("bad signature") from None
    check_fresh(timestamp, now, max_age)


def sns_string_to_sign(message: dict[str, Any]) -> bytes:
    keys = SNS_NOTIFICATION_KEYS if message.get("Type") == "Notification" \
        else SNS_SUBSCRIPTION_KEYS
    parts = []
    for key in keys:
        if key in message and message[key] is not None:
            parts.append(f"{key}\n{message[key]}\n")
    return "".join(parts).encode()


def verify_sns(message: dict[str, Any], certificate_pem: bytes) -> None:
    version = message.get("SignatureVersion")
    algorithm = {"1": hashes.SHA1(), "2": hashes.SHA256()}.get(str(version))
    if algorithm is None:
        raise VerificationError("unsupported SignatureVersion")
    try:
        public_key = x509.load_pem_x509_certificate(certificate_pem).public_key()
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
    except (ValueError, binascii.Error):
        raise VerificationError("bad certificate or signature encoding") from None
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise VerificationError("signing certificate is not RSA")
    try:
        public_key.verify(signature, sns_string_to_sign(message), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
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
        # A cache only (per process, short-lived): certificates by URL.
        self._certs: dict[str, tuple[float, bytes]] = {}
        self._sns_url = re.compile(settings.sns_url_pattern)
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

    # -- Mailgun ------------------------------------------------------------------------

    async def mailgun(self, request: web.Request) -> web.Response:
        if not self.settings.mailgun_signing_key:
            raise self._refuse("mailgun", 403, "webhook not configured")
        try:
            form = await request.post()
        except ValueError:
            raise self._refuse("mailgun", 400, "malformed form body") from None
        fields = {k: form.get(k) for k in ("timestamp", "token", "signature")}
        if not all(isinstance(v, str) and v for v in fields.values()):
            raise self._refuse("mailgun", 401, "missing signature")
        timestamp, token, signature = (str(fields[k]) for k in ("timestamp", "token",
                                                                 "signature"))
        try:
            verify_mailgun(self.settings.mailgun_signing_key, timestamp, token, signature,
                           time.time(), self.settings.webhook_max_age)
        except VerificationError as error:
            raise self._refuse("mailgun", 401, str(error)) from None
        body = form.get("body-mime")
        raw = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else \
            body.file.read() if body is not None and hasattr(body, "file") else None
        recipients = [r.strip() for r in str(form.get("recipient") or "").split(",")
                      if r.strip()]
        if not raw or not recipients:
            raise self._refuse("mailgun", 400, "body-mime and recipient are required "
                               "(forward to a URL ending in 'mime')")
        await self._once("mailgun", token)
        post = InboundPost("mailgun", raw, str(form.get("sender") or ""), tuple(recipients))
        return await self._deliver(post, replay_token=token)

    # -- SendGrid -----------------------------------------------------------------------

    async def sendgrid(self, request: web.Request) -> web.Response:
        if self._sendgrid_key is None:
            raise self._refuse("sendgrid", 403, "webhook not configured")
        signature = request.headers.get(SENDGRID_SIGNATURE, "")
        timestamp = request.headers.get(SENDGRID_TIMESTAMP, "")
        if not signature or not timestamp:
            raise self._refuse("sendgrid", 401, "missing signature")
        body = await request.read()
        try:
            verify_sendgrid(self._sendgrid_key, timestamp, body, signature, time.time(),
                            self.settings.webhook_max_age)
        except VerificationError as error:
            raise self._refuse("sendgrid", 401, str(error)) from None
        try:
            fields = form_fields(request.headers.get("Content-Type", ""), body)
            envelope = json.loads(fields["envelope"])
            raw = fields["email"]
            recipients = envelope["to"]
            if not raw or not isinstance(recipients, list):
                raise ValueError("email and envelope.to are required")
        # Untrusted multipart through the stdlib parser: any failure is a 400.
        except Exception:  # noqa: BLE001
            raise self._refuse("sendgrid", 400, "malformed body (raw MIME mode needs the "
                               "'email' and 'envelope' fields)") from None
        await self._once("sendgrid", signature)
        post = InboundPost("sendgrid", raw, str(envelope.get("from") or ""),
                           tuple(str(r) for r in recipients))
        return await self._deliver(post, replay_token=signature)

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
        try:
            post = postmark_post(json.loads(await request.read()))
        # Untrusted JSON through the stdlib's MIME builder: any failure is a 400.
        except Exception:  # noqa: BLE001
            raise self._refuse("postmark", 400, "malformed Postmark inbound JSON") from None
        if not post.recipients:
            raise self._refuse("postmark", 400, "no recipient")
        return await self._deliver(post)

    # -- SES through SNS ----------------------------------------------------------------

    async def ses(self, request: web.Request) -> web.Response:
        if not self.settings.ses_topic_arns:
            raise self._refuse("ses", 403, "webhook not configured")
        try:
            message = json.loads(await request.read())
            if not isinstance(message, dict) or message.get("Type") not in SNS_TYPES:
                raise ValueError("not an SNS message")
        except ValueError:
            raise self._refuse("ses", 400, "malformed SNS message") from None
        if message.get("TopicArn") not in self.settings.ses_topic_arns:
            raise self._refuse("ses", 403, "topic not allowed")
        cert_url = str(message.get("SigningCertURL", ""))
        if not self._sns_url.match(cert_url):
            raise self._refuse("ses", 403, "signing certificate URL not allowed")
        try:
            verify_sns(message, await self._certificate(cert_url))
        except VerificationError as error:
            raise self._refuse("ses", 403, str(error)) from None
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
        return await self._deliver(post)

    async def _certificate(self, url: str) -> bytes:
        cached = self._certs.get(url)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        assert self.client is not None
        try:
            async with self.client.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise VerificationError(f"certificate fetch answered {response.status}")
                pem = await response.content.read(MAX_CERT_SIZE + 1)
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("webhook.sns_cert_unreachable", url=url, error=type(error).__name__)
            raise HttpError(503, "signing certificate unreachable") from None
        if len(pem) > MAX_CERT_SIZE:
            raise VerificationError("certificate too large")
        self._certs[url] = (time.monotonic() + CERT_CACHE_TTL, pem)
        return pem

    async def _confirm_subscription(self, message: dict[str, Any]) -> web.Response:
        url = str(message.get("SubscribeURL", ""))
        if not self._sns_url.match(url):
            raise self._refuse("ses", 403, "SubscribeURL not allowed")
        assert self.client is not None
        try:
            async with self.client.get(url, allow_redirects=False) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("webhook.sns_subscribe_failed", error=type(error).__name__)
            raise HttpError(503, "SubscribeURL unreachable") from None
        if status != 200:
            raise HttpError(503, f"SubscribeURL answered {status}")
        log.info("webhook.sns_subscribed", topic=message.get("TopicArn"))
        self.metrics.webhooks.labels("ses", "subscribed").inc()
        return json_response({"status": "subscribed"})

    # -- shared ---------------------------------------------------------------------------

    async def _once(self, provider: str, token: str) -> None:
        """Refuse a token seen before (replay); forget tokens past the freshness window."""
        try:
            async with self.db.acquire() as connection:
                await connection.execute(
                    """DELETE FROM webhook_replays
                       WHERE provider = $1 AND seen_at < now() - make_interval(secs => $2)""",
                    provider, self.settings.webhook_max_age * 2)
                inserted = await connection.fetchval(
                    """INSERT INTO webhook_replays (provider, token) VALUES ($1, $2)
                       ON CONFLICT DO NOTHING RETURNING true""", provider, token[:512])
        except CONNECTION_ERRORS:
            raise HttpError(503, "database unavailable") from None
        if not inserted:
            raise self._refuse(provider, 403, "replayed request")

    async def _forget(self, provider: str, token: str) -> None:
        """A tempfailed post will be retried with the same token: let it through then."""
        try:
            await self.db.execute("DELETE FROM webhook_replays WHERE provider = $1 "
                                  "AND token = $2", provider, token[:512])
        except CONNECTION_ERRORS:
            pass

    async def _deliver(self, post: InboundPost, replay_token: str | None = None) -> web.Response:
        session_id = new_session_id()
        queue_id = f"{post.provider}-{session_id}"
        recipients = []
        try:
            for address in post.recipients:
                route = await self.router.route(address)
                if route.kind is RouteKind.MAILBOX and route.mailbox is not None:
                    recipients.append(Recipient(address, route.mailbox, route.tag))
                else:
                    log.info("webhook.rcpt_rejected", provider=post.provider, rcpt=address,
                             reason=route.kind.value)
        # DatabaseUnavailable and friends: a 503, and the provider retries.
        except Exception as error:  # noqa: BLE001
            log.error("webhook.tempfail", provider=post.provider, reason="routing failed",
                      error=type(error).__name__)
            if replay_token:
                await self._forget(post.provider, replay_token)
            raise HttpError(503, "temporary failure, retry later") from None
        if not recipients:
            self.metrics.rejected_reply(post.provider, "rcpt", "unknown mailbox",
                                        replies.MAILBOX_UNKNOWN.code)
            return self._answer(post, replies.MAILBOX_UNKNOWN, "no such mailbox", queue_id)
        content = ReceivedContent(
            data=post.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
            session_id=session_id, queue_id=queue_id, client_ip="", helo="",
            mail_from=post.mail_from, recipients=tuple(recipients), tls=False, tls_version=None,
            smtputf8=False, esmtp=True, transport=post.provider,
            authenticable=post.authenticable)
        outcome = await self.pipeline.process(content)
        if outcome.reply.temporary and replay_token:
            await self._forget(post.provider, replay_token)
        return self._answer(post, outcome.reply, outcome.reason, queue_id, [
            {"message_id": s.id, "thread_id": s.thread_id, "agent": s.mailbox.handle,
             "workspace": s.mailbox.workspace_slug, "duplicate": s.duplicate}
            for s in outcome.stored])

    def _answer(self, post: InboundPost, reply: replies.Reply, reason: str, queue_id: str,
                stored: list[dict[str, Any]] | None = None) -> web.Response:
        if reply.code < 300:
            outcome, status = "accepted", 200
        elif reply.temporary:
            outcome, status = "tempfail", 503
        else:
            outcome, status = "rejected", PERMANENT_STATUS[post.provider]
        self.metrics.webhooks.labels(post.provider, outcome).inc()
        log.info("webhook.delivered", provider=post.provider, outcome=outcome, reason=reason,
                 queue_id=queue_id, reply=str(reply))
        return json_response({"status": outcome, "reason": reason, "reply": str(reply),
                              "queue_id": queue_id, "stored": stored or []}, status=status)
