"""From received bytes to a stored message: parse, authenticate, scan, score, store.

Every way in (the SMTP listener, each provider webhook) hands over the same
`ReceivedContent`, built by the shared steps of ingress.py; this module runs
the stages in order and returns an `Outcome` whose verdict is a typed value.
smtp/replies.py turns it into the reply (and the HTTP status) and counts it.
The verdict is ACCEPTED only after the store's COMMIT; anything that fails
before is a temporary verdict so the sender keeps the message and retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Protocol

import asyncpg
import structlog

from .auth import AuthAction, AuthReason, AuthResult, CheckRunner, authenticate, strip_our_results
from .auth import decide as decide_auth
from .config import ContentSettings, Settings
from .dns import Resolver
from .extract.html_text import strip_tags
from .extract.reply import Body, ReplyText, message_text
from .message import ParsedMessage, parse_message
from .metrics import Metrics
from .record import InboundMessage, ReceivedContent
from .scan import ScanAction, Scanner, ScanReason, ScanResult
from .scan import decide as decide_scan
from .spam import Disposition, SpamDecision, SpamFilter, SpamReason, SpamResult
from .spam import decide as decide_spam
from .store.acl import AclCache
from .store.database import CONNECTION_ERRORS, DatabaseUnavailable
from .store.messages import GroupCommit, StoredMessage, StoreTooLarge, Verdicts, stored_bytes

log = structlog.get_logger("smtpd_agent.pipeline")

# Above this size parsing takes long enough to stall other sessions; do it in a thread.
PARSE_IN_THREAD_ABOVE = 256 * 1024
# Bodies above this many characters get their new text found in a thread, under a deadline,
# unless it is plain text that gives quotequail (~50 us a line) at most EXTRACT_INLINE_LINES
# lines: then the thread hop costs more than the work.
EXTRACT_IN_THREAD_ABOVE = 2 * 1024
EXTRACT_INLINE_LINES = 16


class MessageVerdict(Enum):
    """How the pipeline ended for a message that no check refused."""

    ACCEPTED = "accepted"  # committed
    BOUNCE = "bounce"  # DSNs for VERP recipients only, handed to the bounce processor
    STORE_TEMPFAIL = "store failed"
    TOO_BIG_TO_STORE = "too big to store"  # the store's own bounds: the same every time
    BOUNCE_TEMPFAIL = "bounce processing failed"
    SENDER_REFUSED = "sender refused by acl"  # every mailbox's allow/block list refused it
    ACL_TEMPFAIL = "acl lookup failed"


# A message's verdict: its own, or the reason the stage that refused it gave.
Verdict = MessageVerdict | AuthReason | ScanReason | SpamReason


class Rejected(Exception):
    """A stage refused the message; carries its typed reason."""

    def __init__(self, verdict: AuthReason | ScanReason | SpamReason | MessageVerdict,
                 temporary: bool,
                 **fields: object) -> None:
        super().__init__(verdict.value)
        self.verdict = verdict
        self.temporary = temporary
        self.fields = fields


@dataclass(frozen=True)
class Outcome:
    """What became of one message: the verdict, and the rows stored (webhooks show them)."""

    verdict: Verdict
    stored: tuple[StoredMessage, ...] = field(default=())
    signature: str | None = None  # of the virus found, for the reply

    @property
    def reason(self) -> str:
        return self.verdict.value


class DsnReceiver(Protocol):
    """Takes a DSN that reached a VERP address (outbound/bounces.py's BounceProcessor; the
    runtime passes it in, so this stage never imports the outbound feature)."""

    async def receive_dsn(self, token: str, raw: bytes, queue_id: str = "",
                          mail_from: str = "") -> str: ...


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
        # allow/block lists for receiving; the SMTP handler shares it for RCPT
        self.acl = AclCache(db, settings.routing.cache_ttl)
        self.store = GroupCommit(db, settings.store.thread_window_days,
                                 settings.store.batch_max, settings.store.committers,
                                 settings.store.batch_max_bytes,
                                 settings.store.commit_overlap)

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
        if decision.action in (AuthAction.REJECT, AuthAction.TEMPFAIL):
            raise Rejected(decision.reason, decision.action is AuthAction.TEMPFAIL,
                           spf=result.spf, dkim=result.dkim, dmarc=result.dmarc)
        return result, decision.action is AuthAction.QUARANTINE

    async def apply_acl(self, message: InboundMessage) -> InboundMessage:
        """Refuse a sender (MAIL FROM or From) the mailboxes' allow/block lists refuse.

        Every recipient refusing it: Rejected (550 5.7.1). Only some: the message goes
        on to the others, and the refusing mailboxes' share is dropped with a log line.
        """
        senders = [a for a in (message.envelope.mail_from, message.parsed.from_address)
                   if a and a != "<>"]
        kept, refused = [], []
        for recipient in message.envelope.recipients:
            mailbox = recipient.mailbox
            try:
                decisions = [await self.acl.receiving(mailbox.workspace_id, mailbox.agent_id,
                                                      sender) for sender in senders]
            except DatabaseUnavailable as error:
                raise Rejected(MessageVerdict.ACL_TEMPFAIL, True, error=str(error)) from None
            reasons = [d.reason for d in decisions if d.refused]
            (refused if reasons else kept).append((recipient, reasons))
        if not refused:
            return message
        if not kept:
            raise Rejected(MessageVerdict.SENDER_REFUSED, False,
                           acl=[r for _, reasons in refused for r in reasons])
        log.info("smtp.acl_dropped", session=message.envelope.session_id,
                 dropped=[r.address for r, _ in refused],
                 acl=[r for _, reasons in refused for r in reasons])
        return dataclasses.replace(message, envelope=dataclasses.replace(
            message.envelope, recipients=tuple(r for r, _ in kept)))

    async def scan(self, message: InboundMessage) -> ScanResult | None:
        """Run clamd over the message; raise Rejected for viruses, oversize and outages."""
        if self.scanner is None:
            return None
        result = await self.scanner.scan_message(message)
        self.metrics.scans.labels(result.status).inc()
        decision = decide_scan(result, self.settings.scan)
        if decision.action is ScanAction.REJECT:
            raise Rejected(decision.reason, False, signature=decision.signature)
        if decision.action is ScanAction.TEMPFAIL:
            raise Rejected(decision.reason, True, problem=result.problem)
        return result

    async def score(self, message: InboundMessage,
                    queue_id: str) -> tuple[SpamResult | None, SpamDecision]:
        """Ask rspamd about the message as it will be stored; raise Rejected for spam that is
        refused, deferred (soft reject, greylist as configured) or unscored while required."""
        result = None
        if self.spam_filter is not None:
            result = await self.spam_filter.check(message, stored_bytes(message), queue_id)
            self.metrics.spam_checks.labels(str(result.action or result.status)).inc()
        decision = decide_spam(result, self.settings.spam)
        fields = dict(score=result.score if result else None,
                      action=str(result.action) if result and result.action else None)
        if decision.action is Disposition.REJECT:
            raise Rejected(decision.reason, False, **fields)
        if decision.action is Disposition.TEMPFAIL:
            raise Rejected(decision.reason, True, problem=result.problem if result else None,
                           **fields)
        return result, decision

    async def extract_text(self, message: InboundMessage) -> str:
        """The message's new text (extract/reply.py), for the extracted_text column.

        Never fails a delivery: past content.extract_timeout, or on any error, the plain
        body text (bounded) is stored instead and a log line says so. A large body is
        worked on in a thread; one that times out runs on to its end there, which the
        input bounds keep short.
        """
        content = self.settings.content
        parsed = message.parsed
        size = len(parsed.text_body or "") or len(parsed.html_body or "")
        try:
            extract, in_thread = text_extraction(parsed, content)
            if in_thread:
                async with asyncio.timeout(content.extract_timeout):
                    result = await asyncio.to_thread(extract)
            else:
                result = extract()
        except Exception as error:  # noqa: BLE001 - any failure: the body is stored as it is
            reason = "timeout" if isinstance(error, TimeoutError) else type(error).__name__
            log.warning("content.extract_failed", reason=reason,
                        queue_id=message.envelope.queue_id, size=size)
            if parsed.text_body and not parsed.text_body.isspace():
                return parsed.text_body[:content.extract_max_chars]
            return strip_tags((parsed.html_body or "")[:content.html_max_input])[
                :content.extract_max_chars]
        return result.text

    async def receive_bounces(self, content: ReceivedContent) -> bool:
        """Hand a DSN to the bounce processor for each VERP recipient; False if that failed.

        No authentication or scan: the random VERP token is what makes a bounce ours,
        and nothing of it reaches an agent or its mailbox.
        """
        envelope = content.envelope
        if self.bounces is None:  # a runtime wired without the bounce processor
            log.error("smtp.tempfail", reason="no bounce processor in this process",
                      queue_id=envelope.queue_id, mail_from=envelope.mail_from)
            return False
        try:
            for token in envelope.bounce_tokens:
                await self.bounces.receive_dsn(token, content.data, envelope.queue_id,
                                               envelope.mail_from)
        except CONNECTION_ERRORS as error:
            log.error("smtp.tempfail", reason="bounce processing failed", error=str(error),
                      queue_id=envelope.queue_id, mail_from=envelope.mail_from)
            return False
        return True

    async def process(self, content: ReceivedContent) -> Outcome:
        """Every stage in order; the listener and the webhooks both come here."""
        envelope = content.envelope
        if envelope.bounce_tokens:
            if not await self.receive_bounces(content):
                return Outcome(MessageVerdict.BOUNCE_TEMPFAIL)
            if not envelope.recipients:
                return Outcome(MessageVerdict.BOUNCE)
        if len(content.data) > PARSE_IN_THREAD_ABOVE:
            parsed = await asyncio.to_thread(parse_message, content.data)
        else:
            parsed = parse_message(content.data)
        message = InboundMessage(envelope=envelope, raw=content.data, parsed=parsed)
        rcpt = [r.address for r in envelope.recipients]
        try:
            message = await self.apply_acl(message)
        except Rejected as rejected:
            log.info("smtp.tempfail" if rejected.temporary else "smtp.rejected",
                     reason=rejected.verdict.value, queue_id=envelope.queue_id,
                     mail_from=envelope.mail_from, rcpt=rcpt, transport=envelope.transport,
                     **rejected.fields)
            return Outcome(rejected.verdict)
        began = time.perf_counter()
        try:
            if envelope.authenticable:
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
                               *content.trace_headers))
            spam, spam_decision = await self.score(message, envelope.queue_id)
            scored = time.perf_counter()
        except Rejected as rejected:
            log.info("smtp.tempfail" if rejected.temporary else "smtp.rejected",
                     reason=rejected.verdict.value, queue_id=envelope.queue_id,
                     mail_from=envelope.mail_from, rcpt=rcpt, transport=envelope.transport,
                     **rejected.fields)
            signature = rejected.fields.get("signature")
            return Outcome(rejected.verdict,
                           signature=signature if isinstance(signature, str) else None)
        message = dataclasses.replace(message, extracted_text=await self.extract_text(message))
        verdicts = Verdicts(
            spf=auth.spf, dkim=auth.dkim, dmarc=auth.dmarc, arc=auth.arc,
            auth_results=auth.header_value, auth_detail=auth_detail(auth, envelope),
            quarantined=quarantined, iprev=auth.iprev or None,
            **scan_columns(scan, message), **spam_columns(spam, spam_decision))
        try:
            stored = await self.store.store(message, verdicts, envelope.queue_id)
        except StoreTooLarge as error:
            # the same bytes fail the same way every time: permanent, for this message only
            log.warning("smtp.rejected", reason="too big to store", error=str(error),
                        queue_id=envelope.queue_id, mail_from=envelope.mail_from, rcpt=rcpt,
                        transport=envelope.transport)
            return Outcome(MessageVerdict.TOO_BIG_TO_STORE)
        except DatabaseUnavailable as error:
            log.error("smtp.tempfail", reason="store failed", error=str(error),
                      queue_id=envelope.queue_id, mail_from=envelope.mail_from, rcpt=rcpt,
                      transport=envelope.transport)
            return Outcome(MessageVerdict.STORE_TEMPFAIL)
        stored_at = time.perf_counter()
        self.metrics.store_latency.observe(stored_at - scored)
        log.info("smtp.accepted", queue_id=envelope.queue_id, message_id=parsed.message_id,
                 mail_from=envelope.mail_from, rcpt=rcpt, size=len(content.data),
                 attachments=len(parsed.attachments), spf=auth.spf, dkim=auth.dkim,
                 dmarc=auth.dmarc, arc=auth.arc, quarantined=quarantined,
                 scan=verdicts.scan_status, spam=verdicts.spam_action or verdicts.spam_status,
                 spam_score=verdicts.spam_score, held_as_spam=verdicts.spam,
                 stored=[s.id for s in stored if not s.duplicate],
                 duplicates=[s.id for s in stored if s.duplicate], transport=envelope.transport,
                 ms={"auth": round((authenticated - began) * 1000, 1),
                     "scan": round((scanned - authenticated) * 1000, 1),
                     "spam": round((scored - scanned) * 1000, 1),
                     "store": round((stored_at - scored) * 1000, 1)})
        return Outcome(MessageVerdict.ACCEPTED, tuple(stored))


def text_extraction(parsed: ParsedMessage,
                    content: ContentSettings) -> tuple[Callable[[], ReplyText], bool]:
    """How the message's new text is found, and whether that is worth a thread: a body
    above EXTRACT_IN_THREAD_ABOVE characters, unless it is plain text that gives quotequail
    at most EXTRACT_INLINE_LINES lines. A plain body is split and searched once, for both."""
    text_body = parsed.text_body
    if text_body and not text_body.isspace():  # as strip() would say, without a copy
        body = Body(text_body, content.extract_max_input, content.extract_max_lines)
        return (partial(body.new_text, content.extract_max_chars),
                len(text_body) > EXTRACT_IN_THREAD_ABOVE
                and body.unwrap_lines > EXTRACT_INLINE_LINES)
    return (partial(message_text, text_body, parsed.html_body, content.extract_max_input,
                    content.extract_max_lines, content.extract_max_chars,
                    content.html_max_input),
            (len(text_body or "") or len(parsed.html_body or "")) > EXTRACT_IN_THREAD_ABOVE)


def auth_detail(auth: AuthResult, envelope: Envelope) -> dict[str, object]:
    """What authentication found, plus the DNSBL zones that list the client (edge.dnsbl
    with dnsbl_action = "mark"), for the inbox and a later spam stage."""
    detail = auth.to_dict()
    if envelope.dnsbl:
        detail["dnsbl"] = list(envelope.dnsbl)
    return detail


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
