"""From received bytes to a stored message: parse, authenticate, scan, store.

The listener hands over a `ReceivedContent`; this module freezes it into the
typed record, runs the stages in order and returns the one reply for the
client. 250 is returned only after the store's COMMIT; anything that fails
before is a 4xx so the sender keeps the message and retries.
"""

from __future__ import annotations

import asyncio
from email.utils import format_datetime

import asyncpg
import structlog

from .config import Settings
from .message import parse_message
from .record import Envelope, InboundMessage
from .smtp import replies
from .smtp.replies import Reply
from .smtp.server import ReceivedContent
from .store.database import DatabaseUnavailable
from .store.messages import Verdicts, store_inbound

log = structlog.get_logger("smtpd_agent.pipeline")

# Above this size parsing takes long enough to stall other sessions; do it in a thread.
PARSE_IN_THREAD_ABOVE = 256 * 1024


def received_header(content: ReceivedContent, hostname: str) -> str:
    """RFC 5321 section 4.4 trace header, with the RFC 3848 protocol name."""
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


class Pipeline:
    def __init__(self, db: asyncpg.Pool, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    async def receive(self, content: ReceivedContent) -> Reply:
        envelope = Envelope(
            session_id=content.session_id, client_ip=content.client_ip, helo=content.helo,
            mail_from=content.mail_from, recipients=content.recipients, tls=content.tls,
            tls_version=content.tls_version, smtputf8=content.smtputf8,
            received_at=content.received_at)
        if len(content.data) > PARSE_IN_THREAD_ABOVE:
            parsed = await asyncio.to_thread(parse_message, content.data)
        else:
            parsed = parse_message(content.data)
        message = InboundMessage(
            envelope=envelope, raw=content.data, parsed=parsed,
            trace_headers=(("Received", received_header(content, self.settings.server.hostname)),))
        verdicts = Verdicts()
        rcpt = [r.address for r in content.recipients]
        try:
            stored = await store_inbound(self.db, message, verdicts,
                                         self.settings.store.thread_window_days, content.queue_id)
        except DatabaseUnavailable as error:
            log.error("smtp.tempfail", reason="store failed", error=str(error),
                      queue_id=content.queue_id, mail_from=content.mail_from, rcpt=rcpt)
            return replies.TEMP_STORE_FAILURE.with_text(
                f"Temporary local problem, try again later (session {content.session_id})")
        log.info("smtp.accepted", queue_id=content.queue_id, message_id=parsed.message_id,
                 mail_from=content.mail_from, rcpt=rcpt, size=len(content.data),
                 attachments=len(parsed.attachments),
                 stored=[s.id for s in stored if not s.duplicate],
                 duplicates=[s.id for s in stored if s.duplicate])
        return replies.queued(content.queue_id)
