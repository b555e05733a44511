"""Store an accepted message: thread, message, attachments, agent job, in one transaction.

The listener answers 250 only after this COMMIT returns. One transaction
covers every mailbox the message was addressed to, so the sender's retry
after a 4xx finds either everything or nothing; a Message-ID (or, without
one, the SHA-256 of the bytes) already stored for a mailbox is not stored
again, so a retry after a lost 250 stores no duplicate.
"""

from __future__ import annotations

import asyncio
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


class StoreRefused(DatabaseUnavailable):
    """Postgres answered with an error for this statement (not an outage): one of the
    messages may be at fault, so a batch is worth storing again one by one."""


@dataclass(frozen=True)
class Submission:
    """One accepted message waiting to be stored."""

    message: InboundMessage
    verdicts: Verdicts
    queue_id: str


# One statement for a whole batch: its own transaction, one round trip (migration 0008).
STORE_SQL = "SELECT * FROM store_inbound_batch($1::inbound_delivery[], $2)"


async def store_inbound(db: asyncpg.Pool, message: InboundMessage, verdicts: Verdicts,
                        thread_window_days: int, queue_id: str) -> list[StoredMessage]:
    """Store for every mailbox, or raise DatabaseUnavailable; never half of it."""
    [stored] = await store_batch(db, [Submission(message, verdicts, queue_id)],
                                 thread_window_days)
    return stored


async def store_batch(db: asyncpg.Pool, batch: list[Submission],
                      thread_window_days: int) -> list[list[StoredMessage]]:
    """Store every message of `batch` in one transaction: all of them, or raise
    DatabaseUnavailable and none. Per message, what was stored for each mailbox."""
    deliveries, owners = [], []
    for index, submission in enumerate(batch):
        for mailbox, rcpt in unique_mailboxes(submission.message):
            deliveries.append(_delivery(submission, mailbox, rcpt))
            owners.append((index, mailbox))
    window = timedelta(days=thread_window_days)
    last_error: BaseException | None = None
    for _attempt in range(2):
        try:
            async with db.acquire() as connection:
                rows = await connection.fetch(STORE_SQL, deliveries, window)
            break
        except asyncpg.UniqueViolationError as error:
            # A concurrent delivery of the same message won the race; the retry dedupes.
            last_error = error
        except CONNECTION_ERRORS as error:
            # A pooled connection may have died with a restarted server; one fresh try.
            last_error = error
        except asyncpg.PostgresError as error:
            raise StoreRefused(f"{type(error).__name__}: {error}") from error
    else:
        raise DatabaseUnavailable(f"{type(last_error).__name__}: {last_error}") from last_error
    stored: list[list[StoredMessage]] = [[] for _ in batch]
    for row in rows:
        index, mailbox = owners[row["o_position"] - 1]
        if row["o_duplicate"]:
            log.info("store.duplicate", agent=mailbox.address,
                     message_id=batch[index].message.parsed.message_id,
                     stored_id=row["o_message_id"])
        stored[index].append(StoredMessage(row["o_message_id"], row["o_thread_id"], mailbox,
                                           duplicate=row["o_duplicate"]))
    return stored


def _delivery(submission: Submission, mailbox: Mailbox, rcpt: str) -> tuple[Any, ...]:
    """One inbound_delivery row (migration 0008), in the type's field order."""
    message, verdicts = submission.message, submission.verdicts
    parsed, envelope = message.parsed, message.envelope
    attachments = parsed.attachments
    scans = [verdicts.attachment_scans[i] if i < len(verdicts.attachment_scans)
             else (verdicts.scan_status, None) for i in range(len(attachments))]
    return (
        mailbox.workspace_id, mailbox.agent_id, mailbox.auto_reply, dedup_key(message),
        parsed.message_id, list(parsed.in_reply_to), list(parsed.references),
        _clean(parsed.from_header), parsed.from_address, _clean(parsed.to_header),
        _clean(parsed.cc_header), _clean(parsed.reply_to), _clean(parsed.subject),
        parsed.normalized_subject, parsed.date,
        [[name, _clean(value)] for name, value in parsed.headers],
        _clean(parsed.text_body), _clean(parsed.html_body), stored_bytes(message),
        envelope.mail_from, rcpt, envelope.client_ip or None, _clean(envelope.helo), envelope.tls,
        envelope.tls_version, envelope.session_id, submission.queue_id, list(parsed.defects),
        verdicts.spf, verdicts.dkim, verdicts.dmarc, verdicts.arc, verdicts.auth_results,
        verdicts.auth_detail, verdicts.quarantined, verdicts.scan_status, verdicts.scan_signature,
        envelope.received_at,
        [_clean(a.filename) for a in attachments], [a.content_type for a in attachments],
        [a.disposition for a in attachments], [_clean(a.content_id) for a in attachments],
        [a.sha256 for a in attachments], [a.content for a in attachments],
        [status for status, _ in scans], [signature for _, signature in scans])


class GroupCommit:
    """Stores accepted messages, committing together those that arrive while earlier ones
    are being committed: one statement, one transaction, one WAL flush for the lot.

    With little traffic every message is a batch of one and pays nothing extra; under
    load the batches grow by themselves (no timer, no added latency), so Postgres
    commits less often and the event loop makes fewer round trips. Each message
    still gets its answer only after the COMMIT that holds it. A batch that fails is
    stored again one message at a time when Postgres refused it (so one bad message
    cannot fail the others), not when Postgres is unreachable.
    """

    def __init__(self, db: asyncpg.Pool, thread_window_days: int, batch_max: int,
                 committers: int) -> None:
        self.db = db
        self.thread_window_days = thread_window_days
        self.batch_max = batch_max
        self.committers = committers
        self._pending: list[tuple[Submission, asyncio.Future[list[StoredMessage]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Counted down by the committer itself as it finishes, not by a done-callback that
        # runs an iteration later: a message queued in between would wait for nobody.
        self._committing = 0

    async def store(self, message: InboundMessage, verdicts: Verdicts,
                    queue_id: str) -> list[StoredMessage]:
        """Like store_inbound(); a sender that goes away does not stop the commit."""
        future: asyncio.Future[list[StoredMessage]] = asyncio.get_running_loop().create_future()
        self._pending.append((Submission(message, verdicts, queue_id), future))
        if self._committing < self.committers:
            self._committing += 1
            task = asyncio.get_running_loop().create_task(self._commit_pending())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _commit_pending(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self.batch_max]
                del self._pending[:self.batch_max]
                try:
                    await self._commit(batch)
                except Exception as error:  # a bug, not an outage: say so, answer 4xx, go on
                    log.exception("store.commit_crashed", messages=len(batch))
                    for _, future in batch:
                        _settle(future, error=DatabaseUnavailable(f"store crashed: {error!r}"))
                except BaseException:  # cancelled (shutting down): the senders must retry
                    for _, future in batch:
                        _settle(future, error=DatabaseUnavailable("store interrupted"))
                    raise
        finally:
            self._committing -= 1

    async def _commit(self, batch: list[tuple[Submission, asyncio.Future[Any]]]) -> None:
        try:
            results = await store_batch(self.db, [s for s, _ in batch], self.thread_window_days)
        except DatabaseUnavailable as error:
            if len(batch) == 1 or not isinstance(error, StoreRefused):
                # An outage fails every message alike; trying each alone would only
                # make the senders wait once per message for their 4xx.
                for _, future in batch:
                    _settle(future, error=error)
                return
            log.warning("store.batch_failed", messages=len(batch), error=str(error))
            for item in batch:
                await self._commit([item])
            return
        for (_, future), stored in zip(batch, results):
            _settle(future, stored)


def _settle(future: asyncio.Future[Any], result: Any = None,
            error: BaseException | None = None) -> None:
    if future.done():  # the session went away; what was stored stays stored
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


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
