"""Store an accepted message: thread, message, attachments, agent job, in one transaction.

The listener answers 250 only after this COMMIT returns. One transaction
covers every mailbox the message was addressed to, so the sender's retry
after a 4xx finds either everything or nothing; a Message-ID (or, without
one, the SHA-256 of the bytes) already stored for a mailbox is not stored
again, so a retry after a lost 250 stores no duplicate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import structlog

from ..record import InboundMessage, Mailbox
from .database import CONNECTION_ERRORS, DatabaseUnavailable

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Verdicts:
    """What the authentication and scanning stages concluded, as stored columns."""

    spf: str | None = None
    dkim: str | None = None
    dmarc: str | None = None
    arc: str | None = None
    auth_results: str | None = None
    auth_detail: dict[str, Any] | None = None
    quarantined: bool = False
    scan_status: str | None = None
    scan_signature: str | None = None
    attachment_scans: tuple[tuple[str | None, str | None], ...] = field(default=())


@dataclass(frozen=True)
class StoredMessage:
    id: int
    thread_id: int
    mailbox: Mailbox
    duplicate: bool


def dedup_key(message: InboundMessage) -> str:
    if message.parsed.message_id:
        return message.parsed.message_id
    return "sha256:" + hashlib.sha256(message.raw).hexdigest()


def stored_bytes(message: InboundMessage) -> bytes:
    """The raw message as received, with our trace headers prepended (newest first)."""
    prefix = b"".join(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
                      for name, value in message.trace_headers)
    return prefix + message.raw


def unique_mailboxes(message: InboundMessage) -> list[tuple[Mailbox, str]]:
    """Each mailbox once, with the first recipient address that reached it."""
    seen: dict[int, tuple[Mailbox, str]] = {}
    for recipient in message.envelope.recipients:
        seen.setdefault(recipient.mailbox.agent_id, (recipient.mailbox, recipient.address))
    return list(seen.values())


async def store_inbound(db: asyncpg.Pool, message: InboundMessage, verdicts: Verdicts,
                        thread_window_days: int, queue_id: str) -> list[StoredMessage]:
    """Store for every mailbox, or raise DatabaseUnavailable; never half of it."""
    last_error: BaseException | None = None
    for _attempt in range(2):
        try:
            async with db.acquire() as connection:
                async with connection.transaction():
                    return [await _store_one(connection, message, verdicts, mailbox, rcpt,
                                             thread_window_days, queue_id)
                            for mailbox, rcpt in unique_mailboxes(message)]
        except asyncpg.UniqueViolationError as error:
            # A concurrent delivery of the same message won the race; the retry dedupes.
            last_error = error
        except CONNECTION_ERRORS as error:
            # A pooled connection may have died with a restarted server; one fresh try.
            last_error = error
        except asyncpg.PostgresError as error:
            raise DatabaseUnavailable(f"{type(error).__name__}: {error}") from error
    raise DatabaseUnavailable(f"{type(last_error).__name__}: {last_error}") from last_error


async def _store_one(connection: asyncpg.Connection, message: InboundMessage, verdicts: Verdicts,
                     mailbox: Mailbox, rcpt: str, thread_window_days: int,
                     queue_id: str) -> StoredMessage:
    parsed = message.parsed
    envelope = message.envelope
    key = dedup_key(message)
    existing = await connection.fetchrow(
        """SELECT id, thread_id FROM messages
           WHERE agent_id = $1 AND direction = 'inbound' AND dedup_key = $2""",
        mailbox.agent_id, key)
    if existing:
        log.info("store.duplicate", agent=mailbox.address, message_id=parsed.message_id,
                 stored_id=existing["id"])
        return StoredMessage(existing["id"], existing["thread_id"], mailbox, duplicate=True)

    thread_id = await _find_thread(connection, message, mailbox, thread_window_days)
    if thread_id is None:
        thread_id = await connection.fetchval(
            """INSERT INTO threads (workspace_id, agent_id, subject, normalized_subject, correspondent)
               VALUES ($1, $2, $3, $4, $5) RETURNING id""",
            mailbox.workspace_id, mailbox.agent_id, parsed.subject, parsed.normalized_subject,
            parsed.from_address)
    raw = stored_bytes(message)
    message_row_id = await connection.fetchval(
        """INSERT INTO messages (
               workspace_id, agent_id, thread_id, direction, status, dedup_key, message_id,
               in_reply_to, "references", from_header, from_address, to_header, cc_header,
               reply_to, subject, sent_at, headers, text_body, html_body, raw, size, mail_from,
               rcpt_to, client_ip, helo, tls, tls_version, session_id, queue_id, defects,
               spf, dkim, dmarc, arc, auth_results, auth_detail, quarantined, scan_status,
               scan_signature, received_at)
           VALUES ($1, $2, $3, 'inbound', 'received', $4, $5, $6, $7, $8, $9, $10, $11, $12,
                   $13, $14, $15, $16, $17, $18, $19, $20, $21, $22::inet, $23, $24, $25, $26,
                   $27, $28, $29, $30, $31, $32, $33, $34, $35, $36, $37, coalesce($38, now()))
           RETURNING id""",
        mailbox.workspace_id, mailbox.agent_id, thread_id, key, parsed.message_id,
        list(parsed.in_reply_to), list(parsed.references), _clean(parsed.from_header),
        parsed.from_address, _clean(parsed.to_header), _clean(parsed.cc_header),
        _clean(parsed.reply_to), _clean(parsed.subject), parsed.date,
        [[name, _clean(value)] for name, value in parsed.headers],
        _clean(parsed.text_body), _clean(parsed.html_body), raw, len(raw),
        envelope.mail_from, rcpt, envelope.client_ip or None, _clean(envelope.helo), envelope.tls,
        envelope.tls_version, envelope.session_id, queue_id, list(parsed.defects),
        verdicts.spf, verdicts.dkim, verdicts.dmarc, verdicts.arc, verdicts.auth_results,
        verdicts.auth_detail, verdicts.quarantined, verdicts.scan_status, verdicts.scan_signature,
        envelope.received_at)
    for position, attachment in enumerate(parsed.attachments):
        digest = attachment.sha256
        await connection.execute(
            """INSERT INTO blobs (workspace_id, sha256, size, content) VALUES ($1, $2, $3, $4)
               ON CONFLICT (workspace_id, sha256) DO NOTHING""",
            mailbox.workspace_id, digest, attachment.size, attachment.content)
        scan_status, scan_signature = (verdicts.attachment_scans[position]
                                       if position < len(verdicts.attachment_scans)
                                       else (verdicts.scan_status, None))
        await connection.execute(
            """INSERT INTO attachments (workspace_id, message_id, position, filename, content_type,
                   disposition, content_id, size, sha256, scan_status, scan_signature)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)""",
            mailbox.workspace_id, message_row_id, position, _clean(attachment.filename),
            attachment.content_type, attachment.disposition, _clean(attachment.content_id),
            attachment.size, digest, scan_status, scan_signature)
    await connection.execute(
        """UPDATE threads SET message_count = message_count + 1,
               last_message_at = greatest(last_message_at, now())
           WHERE id = $1 AND workspace_id = $2""", thread_id, mailbox.workspace_id)
    if mailbox.auto_reply:
        # Same transaction as the message: a committed message always has its job, and a
        # 4xx'd one never leaves an orphan job behind. Whether to answer is the worker's call.
        await connection.execute(
            """INSERT INTO agent_jobs (workspace_id, agent_id, thread_id, message_id)
               VALUES ($1, $2, $3, $4)""",
            mailbox.workspace_id, mailbox.agent_id, thread_id, message_row_id)
    return StoredMessage(message_row_id, thread_id, mailbox, duplicate=False)


async def _find_thread(connection: asyncpg.Connection, message: InboundMessage, mailbox: Mailbox,
                       thread_window_days: int) -> int | None:
    parsed = message.parsed
    referenced = list(dict.fromkeys(parsed.in_reply_to + parsed.references))
    if referenced:
        thread_id = await connection.fetchval(
            """SELECT thread_id FROM messages
               WHERE agent_id = $1 AND workspace_id = $2 AND message_id = ANY($3::text[])
               ORDER BY received_at DESC LIMIT 1""",
            mailbox.agent_id, mailbox.workspace_id, referenced)
        if thread_id is not None:
            return thread_id
    if parsed.normalized_subject and parsed.from_address:
        return await connection.fetchval(
            """SELECT id FROM threads
               WHERE agent_id = $1 AND workspace_id = $2 AND normalized_subject = $3
                 AND correspondent = $4 AND last_message_at > now() - $5::interval
               ORDER BY last_message_at DESC LIMIT 1""",
            mailbox.agent_id, mailbox.workspace_id, parsed.normalized_subject,
            parsed.from_address, timedelta(days=thread_window_days))
    return None


def _clean(text: str | None) -> str | None:
    """Postgres text cannot hold NUL or lone surrogates; the raw bytes keep the original."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text
