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


# The store function, and the agent job when $47 (the mailbox's auto_reply) is set and the
# message is new: one statement, so the job commits with the message or not at all, and the
# hot path stays one round trip. Whether to answer is the worker's decision, not the store's.
STORE_SQL = f"""
    WITH stored AS (
        SELECT * FROM store_inbound_message({', '.join(f'${i}' for i in range(1, 47))})),
    job AS (
        INSERT INTO agent_jobs (workspace_id, agent_id, thread_id, message_id)
        SELECT $1, $2, o_thread_id, o_message_id FROM stored WHERE $47 AND NOT o_duplicate
        RETURNING id)
    SELECT stored.*, (SELECT id FROM job) AS job_id FROM stored"""


async def store_inbound(db: asyncpg.Pool, message: InboundMessage, verdicts: Verdicts,
                        thread_window_days: int, queue_id: str) -> list[StoredMessage]:
    """Store for every mailbox, or raise DatabaseUnavailable; never half of it."""
    mailboxes = unique_mailboxes(message)
    last_error: BaseException | None = None
    for _attempt in range(2):
        try:
            async with db.acquire() as connection:
                if len(mailboxes) == 1:
                    # One statement is its own transaction: one round trip in all.
                    return [await _store_one(connection, message, verdicts, *mailboxes[0],
                                             thread_window_days, queue_id)]
                async with connection.transaction():
                    return [await _store_one(connection, message, verdicts, mailbox, rcpt,
                                             thread_window_days, queue_id)
                            for mailbox, rcpt in mailboxes]
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
    attachments = parsed.attachments
    scans = [verdicts.attachment_scans[i] if i < len(verdicts.attachment_scans)
             else (verdicts.scan_status, None) for i in range(len(attachments))]
    row = await connection.fetchrow(
        STORE_SQL,
        mailbox.workspace_id, mailbox.agent_id, dedup_key(message), parsed.message_id,
        list(parsed.in_reply_to), list(parsed.references), _clean(parsed.from_header),
        parsed.from_address, _clean(parsed.to_header), _clean(parsed.cc_header),
        _clean(parsed.reply_to), _clean(parsed.subject), parsed.normalized_subject, parsed.date,
        [[name, _clean(value)] for name, value in parsed.headers],
        _clean(parsed.text_body), _clean(parsed.html_body), stored_bytes(message),
        envelope.mail_from, rcpt, envelope.client_ip or None, _clean(envelope.helo), envelope.tls,
        envelope.tls_version, envelope.session_id, queue_id, list(parsed.defects),
        verdicts.spf, verdicts.dkim, verdicts.dmarc, verdicts.arc, verdicts.auth_results,
        verdicts.auth_detail, verdicts.quarantined, verdicts.scan_status, verdicts.scan_signature,
        envelope.received_at, timedelta(days=thread_window_days),
        [_clean(a.filename) for a in attachments], [a.content_type for a in attachments],
        [a.disposition for a in attachments], [_clean(a.content_id) for a in attachments],
        [a.sha256 for a in attachments], [a.content for a in attachments],
        [status for status, _ in scans], [signature for _, signature in scans],
        mailbox.auto_reply)
    if row["o_duplicate"]:
        log.info("store.duplicate", agent=mailbox.address, message_id=parsed.message_id,
                 stored_id=row["o_message_id"])
    return StoredMessage(row["o_message_id"], row["o_thread_id"], mailbox,
                         duplicate=row["o_duplicate"])


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
