"""From received bytes to a stored message: parse, authenticate, scan, score, store.

The listener hands over a `ReceivedContent`; this module freezes it into the
typed record, runs the stages in order and returns the one reply for the
client. 250 is returned only after the store's COMMIT; anything that fails
before is a 4xx so the sender keeps the message and retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol
from email.utils import format_datetime

import asyncpg
import structlog

from .auth import AuthResult, CheckRunner, authenticate, strip_our_results
from .auth import decide as decide_auth
from .config import Settings
from .dns import Resolver
from .message import parse_message
from .metrics import Metrics
from .record import Envelope, InboundMessage, ReceivedContent
from .scan import ScanResult, Scanner
from .scan import decide as decide_scan
from .smtp import replies
from .spam import Disposition, Reason, SpamDecision, SpamFilter, SpamResult
from .spam import decide as decide_spam
from .smtp.replies import Reply
from .store.database import CONNECTION_ERRORS, DatabaseUnavailable
from .store.messages import GroupCommit, StoredMessage, StoreTooLarge, Verdicts, stored_bytes

log = structlog.get_logger("smtpd_agent.pipeline")

# Above this size parsing takes long enough to stall other sessions; do it in a thread.
PARSE_IN_THREAD_ABOVE = 256 * 1024


def received_header(content: ReceivedContent, hostname: str) -> str:
    """RFC 5321 section 4.4 trace header, with the RFC 3848 protocol name."""
    if content.transport != "smtp":
        # Posted by a provider's webhook: the hop we saw was the provider, over HTTPS.
        recipient = (f"\r\n\tfor <{content.recipients[0].address}>"
                     if len(content.recipients) == 1 else "")
        return (f"from {content.transport} webhook\r\n"
                f"\tby {hostname} (smtpd-agent) with HTTP id {content.queue_id}{recipient};\r\n"
                f"\t{format_datetime(content.received_at)}")
    protocol = "UTF8SMTP" if content.smtputf8 else "ESMTP" if content.esmtp else "SMTP"
    if content.tls and protocol != "SMTP":
        protocol += "S"
    elif content.tls:
        protocol = "ESMTPS"
    helo = "".join(ch for ch in content.helo if ch.isprintable() and ch not in "()\\")[:255]
    recipient = (f"\r\n\tfor <{content.recipients[0].address}>"
                 if len(content.recipients) == 1 else "")
    tls = f" ({content.tls_version})" if content.tls_version else ""
    return (f"from {helo or 'unknown'} ([{content.client_ip}])\r\n"
            f"\tby {hostname} (smtpd-agent) with {protocol}{tls} id {content.queue_id}{recipient};\r\n"
            f"\t{format_datetime(content.received_at)}")


class Rejected(Exception):
    """A stage refused the message; carries the one reply for the client."""

    def __init__(self, reply: Reply, reason: str, **fields: object) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason
        self.fields = fields


@dataclass(frozen=True)
class Outcome:
    """What became of one message: the reply, why, and the rows stored (webhooks show them)."""

    reply: Reply
    reason: str = "accepted"
    stored: tuple[StoredMessage, ...] = field(default=())


class DsnReceiver(Protocol):
    """Takes a DSN that reached a VERP address (outbound/bounces.py's BounceProcessor; the
    runtime passes it in, so this stage never imports the outbound feature)."""

    async def receive_dsn(self, token: str, raw: bytes, queue_id: str = "") -> str: ...


class Pipeline:
    def __init__(self, db: asyncpg.Pool, settings: Settings, resolver: Resolver,
                 scanner: Scanner | None = None, metrics: Metrics | None = None, *,
                 bounces: DsnReceiver | None = None,
                 checks: CheckRunner | None = None,
                 spam_filter: SpamFilter | None = None) -> None:
        self.db = db
        self.settings = settings
        self.resolver = resolver
        self.checks = checks or CheckRunner(settings.auth.dns_workers,
                                            settings.auth.verify_workers)
        self.scanner = scanner
        self.spam_filter = spam_filter
        self.metrics = metrics or Metrics()
        self.authserv_id = settings.auth.authserv_id or settings.server.hostname
        self.bounces = bounces
        self.store = GroupCommit(db, settings.store.thread_window_days,
                                 settings.store.batch_max, settings.store.committers,
                                 settings.store.batch_max_bytes)

    def unauthenticated(self) -> AuthResult:
        """No checks possible (a provider gave parsed fields only): RFC 8601 'none'."""
        return AuthResult(spf="none", dkim="none", dmarc="none", arc="none", dmarc_policy="",
                          header_value=f"{self.authserv_id}; none",
                          authserv_id=self.authserv_id)

    async def authenticate(self, message: InboundMessage) -> tuple[AuthResult, bool]:
        """SPF, DKIM, ARC, DMARC; raise Rejected per policy, else say whether to quarantine."""
        result = await authenticate(message, self.resolver, self.settings.auth, self.authserv_id,
                                    self.checks)
        self.metrics.auth_result(result.spf, result.dkim, result.dmarc, result.arc)
        decision = decide_auth(result, self.settings.auth)
        if decision.action == "reject":
            reply = (replies.DMARC_REJECT if decision.reason.startswith("dmarc")
                     else replies.SPF_REJECT)
            raise Rejected(reply, decision.reason, spf=result.spf, dkim=result.dkim,
                           dmarc=result.dmarc)
        if decision.action == "tempfail":
            raise Rejected(replies.TEMP_AUTH_FAILURE, decision.reason, spf=result.spf,
                           dkim=result.dkim, dmarc=result.dmarc)
        return result, decision.action == "quarantine"

    async def scan(self, message: InboundMessage) -> ScanResult | None:
        """Run clamd over the message; raise Rejected for viruses, oversize and outages."""
        if self.scanner is None:
            return None
        result = await self.scanner.scan_message(message)
        self.metrics.scans.labels(result.status).inc()
        decision = decide_scan(result, self.settings.scan)
        if decision.action == "reject" and decision.reason == "virus":
            raise Rejected(replies.VIRUS_FOUND.with_text(
                f"Message rejected: virus found ({decision.signature})"), "virus",
                signature=decision.signature)
        if decision.action == "reject":
            raise Rejected(replies.TOO_BIG_TO_SCAN, "too large to scan")
        if decision.action == "tempfail":
            raise Rejected(replies.TEMP_SCAN_FAILURE, decision.reason, problem=result.problem)
        return result

    async def score(self, message: InboundMessage,
                    queue_id: str) -> tuple[SpamResult | None, SpamDecision]:
        """Ask rspamd about the message as it will be stored; raise Rejected for spam that is
        refused (550), deferred (451) or unscored while required (451)."""
        result = None
        if self.spam_filter is not None:
            result = await self.spam_filter.check(message, stored_bytes(message), queue_id)
        decision = decide_spam(result, self.settings.spam)
        if result is not None:
            self.metrics.spam_checks.labels(str(result.action or result.status)).inc()
        fields = dict(score=result.score if result else None,
                      action=str(result.action) if result and result.action else None)
        if decision.action == Disposition.REJECT:
            raise Rejected(replies.SPAM_REJECT, "spam", **fields)
        if decision.action == Disposition.TEMPFAIL:
            reply = (replies.TEMP_SPAM_FAILURE if decision.reason == Reason.FILTER_UNAVAILABLE
                     else replies.SPAM_DEFERRED)
            raise Rejected(reply, f"spam {decision.reason}",
                           problem=result.problem if result else None, **fields)
        return result, decision

    async def receive_bounces(self, content: ReceivedContent) -> Reply | None:
        """Hand a DSN to the bounce processor for each VERP recipient; a 4xx if that failed.

        No authentication or scan: the random VERP token is what makes a bounce ours,
        and nothing of it reaches an agent or its mailbox.
        """
        if self.bounces is None:  # a runtime wired without the bounce processor
            log.error("smtp.tempfail", reason="no bounce processor in this process",
                      queue_id=content.queue_id, mail_from=content.mail_from)
            return replies.TEMP_STORE_FAILURE.for_session(content.session_id)
        try:
            for token in content.bounce_tokens:
                await self.bounces.receive_dsn(token, content.data, content.queue_id,
                                               content.mail_from)
        except CONNECTION_ERRORS as error:
            log.error("smtp.tempfail", reason="bounce processing failed", error=str(error),
                      queue_id=content.queue_id, mail_from=content.mail_from)
            return replies.TEMP_STORE_FAILURE.for_session(content.session_id)
        return None

    async def receive(self, content: ReceivedContent) -> Reply:
        """The reply for one received message; 250 only once it is committed."""
        return (await self.process(content)).reply

    async def process(self, content: ReceivedContent) -> Outcome:
        """Every stage in order, counted; the listener and the webhooks both come here."""
        outcome = await self._process(content)
        if outcome.reply.code < 300:
            self.metrics.accepted.labels(content.transport).inc()
        else:
            self.metrics.rejected_reply(content.transport, "data", outcome.reason,
                                        outcome.reply.code)
        return outcome

    async def _process(self, content: ReceivedContent) -> Outcome:
        if content.bounce_tokens:
            failed = await self.receive_bounces(content)
            if failed is not None:
                return Outcome(failed, reason="bounce processing failed")
            if not content.recipients:
                return Outcome(replies.queued(content.queue_id), reason="bounce")
        envelope = Envelope(
            session_id=content.session_id, client_ip=content.client_ip, helo=content.helo,
            mail_from=content.mail_from, recipients=content.recipients, tls=content.tls,
            tls_version=content.tls_version, smtputf8=content.smtputf8,
            received_at=content.received_at)
        if len(content.data) > PARSE_IN_THREAD_ABOVE:
            parsed = await asyncio.to_thread(parse_message, content.data)
        else:
            parsed = parse_message(content.data)
        message = InboundMessage(envelope=envelope, raw=content.data, parsed=parsed)
        rcpt = [r.address for r in content.recipients]
        began = time.perf_counter()
        try:
            if content.authenticable:
                auth, quarantined = await self.authenticate(message)
            else:
                auth, quarantined = self.unauthenticated(), False
            authenticated = time.perf_counter()
            scan = await self.scan(message)
            scanned = time.perf_counter()
            # RFC 8601 section 5: results claiming our authserv-id can only be forged; ours
            # go first. rspamd scores the message as it will be stored, our results included.
            message = dataclasses.replace(
                message, raw=strip_our_results(content.data, self.authserv_id),
                trace_headers=(("Authentication-Results", auth.header_value),
                               ("Received", received_header(content,
                                                            self.settings.server.hostname))))
            spam, spam_decision = await self.score(message, content.queue_id)
            scored = time.perf_counter()
        except Rejected as rejected:
            log.info("smtp.rejected" if rejected.reply.code >= 500 else "smtp.tempfail",
                     reason=rejected.reason, reply=str(rejected.reply), queue_id=content.queue_id,
                     mail_from=content.mail_from, rcpt=rcpt, transport=content.transport,
                     **rejected.fields)
            return Outcome(rejected.reply, rejected.reason)
        verdicts = Verdicts(
            spf=auth.spf, dkim=auth.dkim, dmarc=auth.dmarc, arc=auth.arc,
            auth_results=auth.header_value, auth_detail=auth.to_dict(), quarantined=quarantined,
            **scan_columns(scan, message), **spam_columns(spam, spam_decision))
        try:
            stored = await self.store.store(message, verdicts, content.queue_id)
        except StoreTooLarge as error:
            # the same bytes fail the same way every time: permanent, for this message only
            log.warning("smtp.rejected", reason="too big to store", error=str(error),
                        queue_id=content.queue_id, mail_from=content.mail_from, rcpt=rcpt,
                        transport=content.transport)
            return Outcome(replies.TOO_BIG_TO_STORE, "too big to store")
        except DatabaseUnavailable as error:
            log.error("smtp.tempfail", reason="store failed", error=str(error),
                      queue_id=content.queue_id, mail_from=content.mail_from, rcpt=rcpt,
                      transport=content.transport)
            return Outcome(replies.TEMP_STORE_FAILURE.for_session(content.session_id),
                           "store failed")
        stored_at = time.perf_counter()
        self.metrics.store_latency.observe(stored_at - scored)
        log.info("smtp.accepted", queue_id=content.queue_id, message_id=parsed.message_id,
                 mail_from=content.mail_from, rcpt=rcpt, size=len(content.data),
                 attachments=len(parsed.attachments), spf=auth.spf, dkim=auth.dkim,
                 dmarc=auth.dmarc, arc=auth.arc, quarantined=quarantined,
                 scan=verdicts.scan_status, spam=verdicts.spam_action or verdicts.spam_status,
                 spam_score=verdicts.spam_score, held_as_spam=verdicts.spam,
                 stored=[s.id for s in stored if not s.duplicate],
                 duplicates=[s.id for s in stored if s.duplicate], transport=content.transport,
                 ms={"auth": round((authenticated - began) * 1000, 1),
                     "scan": round((scanned - authenticated) * 1000, 1),
                     "spam": round((scored - scanned) * 1000, 1),
                     "store": round((stored_at - scored) * 1000, 1)})
        return Outcome(replies.queued(content.queue_id), "accepted", tuple(stored))


def scan_columns(scan: ScanResult | None, message: InboundMessage) -> dict[str, object]:
    """Scan verdicts as stored: with no scanner configured, attachments are 'unscanned'."""
    if scan is None:
        status = "unscanned" if message.parsed.attachments else "skipped"
        return {"scan_status": status,
                "attachment_scans": tuple((status, None) for _ in message.parsed.attachments)}
    return {"scan_status": scan.status, "scan_signature": scan.signature,
            "attachment_scans": tuple((a.status, a.signature) for a in scan.attachments)}


def spam_columns(spam: SpamResult | None, decision: SpamDecision) -> dict[str, object]:
    """rspamd's verdict as stored; all None when no rspamd is configured."""
    if spam is None:
        return {}
    return {"spam": decision.labelled, "spam_status": spam.status,
            "spam_action": str(spam.action) if spam.action else None,
            "spam_score": spam.score, "spam_required": spam.required_score,
            "spam_symbols": spam.symbols_json()}
