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
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from ..message import Attachment
from ..record import InboundMessage, Mailbox
from .database import CONNECTION_ERRORS, DatabaseUnavailable
from .rows import INBOUND_DELIVERY, MESSAGE_ATTACHMENT, MESSAGE_CONTENT, clean_text

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
    iprev: str | None = None
    # spam.py: the label holds the message from the agent; status None = no rspamd configured.
    spam: bool = False
    spam_status: str | None = None
    spam_action: str | None = None
    spam_score: float | None = None
    spam_required: float | None = None
    spam_symbols: dict[str, float] | None = None
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


class StoreTooLarge(StoreRefused):
    """Postgres refused the message as too large (SQLSTATE class 54, program limit
    exceeded): storing it again would fail again, so the answer is permanent (552)."""


@dataclass(frozen=True)
class Submission:
    """One accepted message waiting to be stored."""

    message: InboundMessage
    verdicts: Verdicts
    queue_id: str

    @property
    def size(self) -> int:
        """Bytes this message adds to a batch's bind parameters: sent once, whatever the
        number of mailboxes."""
        parsed = self.message.parsed
        return (len(self.message.raw) + sum(len(a.content) for a in parsed.attachments)
                + 2 * (len(parsed.text_body or "") + len(parsed.html_body or ""))
                + 2 * len(self.message.extracted_text or ""))


# One statement for a whole batch: its own transaction, one round trip
# (functions/store_inbound_batch.sql).
STORE_SQL = ("SELECT * FROM store_inbound_batch($1::message_content[], "
             "$2::message_attachment[], $3::inbound_delivery[], $4)")


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
    contents, attachments, deliveries, owners = [], [], [], []
    for index, submission in enumerate(batch):
        contents.append(_content(submission))
        attachments += _attachments(submission, index + 1)
        for mailbox, rcpt in unique_mailboxes(submission.message):
            deliveries.append(INBOUND_DELIVERY.row(
                content_position=index + 1, workspace_id=mailbox.workspace_id,
                agent_id=mailbox.agent_id, auto_reply=mailbox.auto_reply, rcpt_to=rcpt))
            owners.append((index, mailbox))
    window = timedelta(days=thread_window_days)
    last_error: BaseException | None = None
    for _attempt in range(2):
        try:
            async with db.acquire() as connection:
                rows = await connection.fetch(STORE_SQL, contents, attachments, deliveries,
                                              window)
            break
        except asyncpg.UniqueViolationError as error:
            # A concurrent delivery of the same message won the race; the retry dedupes.
            last_error = error
        except CONNECTION_ERRORS as error:
            # A pooled connection may have died with a restarted server; one fresh try.
            last_error = error
        except asyncpg.PostgresError as error:
            refused = StoreTooLarge if _too_large(error) else StoreRefused
            raise refused(f"{type(error).__name__}: {error}") from error
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


def _too_large(error: asyncpg.PostgresError) -> bool:
    """Program limit exceeded (54xxx: an index row, a jsonb or an array too big) or a
    value too long for its type: the same message fails the same way every time."""
    state = getattr(error, "sqlstate", "") or ""
    return state.startswith("54") or state == "22001"


def _content(submission: Submission) -> tuple[Any, ...]:
    """The message_content row of a received message (rows.MESSAGE_CONTENT)."""
    message, verdicts = submission.message, submission.verdicts
    parsed, envelope = message.parsed, message.envelope
    raw = stored_bytes(message)
    return MESSAGE_CONTENT.row(
        dedup_key=dedup_key(message), message_id=parsed.message_id,
        in_reply_to=list(parsed.in_reply_to), references=list(parsed.references),
        from_header=parsed.from_header, from_address=parsed.from_address,
        to_header=parsed.to_header, cc_header=parsed.cc_header, reply_to=parsed.reply_to,
        subject=parsed.subject, normalized_subject=parsed.normalized_subject,
        sent_at=parsed.date, headers=[[name, value] for name, value in parsed.headers],
        text_body=parsed.text_body, html_body=parsed.html_body,
        raw_sha256=hashlib.sha256(raw).digest(), raw=raw, mail_from=envelope.mail_from,
        client_ip=envelope.client_ip or None, helo=envelope.helo, tls=envelope.tls,
        tls_version=envelope.tls_version, session_id=envelope.session_id,
        queue_id=submission.queue_id, defects=list(parsed.defects), spf=verdicts.spf,
        dkim=verdicts.dkim, dmarc=verdicts.dmarc, arc=verdicts.arc,
        auth_results=verdicts.auth_results, auth_detail=verdicts.auth_detail,
        quarantined=verdicts.quarantined, scan_status=verdicts.scan_status,
        scan_signature=verdicts.scan_signature, spam=verdicts.spam,
        spam_status=verdicts.spam_status, spam_action=verdicts.spam_action,
        spam_score=verdicts.spam_score, spam_required=verdicts.spam_required,
        spam_symbols=verdicts.spam_symbols, received_at=envelope.received_at,
        iprev=verdicts.iprev, extracted_text=message.extracted_text)


def _attachments(submission: Submission, position: int) -> list[tuple[Any, ...]]:
    """The message_attachment rows of the message_content at `position`."""
    verdicts = submission.verdicts
    rows = []
    for index, attachment in enumerate(submission.message.parsed.attachments):
        status, signature = (verdicts.attachment_scans[index]
                             if index < len(verdicts.attachment_scans)
                             else (verdicts.scan_status, None))
        rows.append(MESSAGE_ATTACHMENT.row(
            content_position=position, position=index, filename=attachment.filename,
            content_type=attachment.content_type, disposition=attachment.disposition,
            content_id=attachment.content_id, sha256=attachment.sha256,
            content=attachment.content, scan_status=status, scan_signature=signature))
    return rows


def split_batch(items: list[Any], sizes: list[int], max_count: int,
                max_bytes: int) -> tuple[list[Any], list[Any]]:
    """The head of `items` that fits one statement (at least one item), and the rest."""
    taken = total = 0
    for size in sizes[:max_count]:
        if taken and total + size > max_bytes:
            break
        taken += 1
        total += size
    return items[:taken], items[taken:]


@dataclass(frozen=True)
class OutboundRow:
    """A message the agent wrote, as stored in its thread before delivery."""

    workspace_id: int
    agent_id: int
    thread_id: int
    dedup_key: str
    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    from_header: str | None
    from_address: str | None
    to_address: str
    subject: str | None
    headers: tuple[tuple[str, str], ...]
    text_body: str | None
    html_body: str | None
    raw: bytes
    cc_header: str | None = None
    # what the message says it is addressed to, when more than the one recipient
    to_header: str | None = None
    status: str = "queued"
    # stored as attachment rows (content once per workspace in blobs), like inbound ones
    attachments: tuple[Attachment, ...] = ()


async def store_outbound(connection: asyncpg.Connection, row: OutboundRow) -> int:
    """Store an outbound message in its thread (status 'queued', or 'draft'); its id. Call
    it inside the caller's transaction (the agent closes its job in the same one; the API
    records its Idempotency-Key in the same one)."""
    content = MESSAGE_CONTENT.row(
        dedup_key=row.dedup_key, message_id=row.message_id, in_reply_to=list(row.in_reply_to),
        references=list(row.references), from_header=row.from_header,
        from_address=row.from_address, to_header=row.to_header or row.to_address,
        cc_header=row.cc_header,
        reply_to=None, subject=row.subject, normalized_subject=None,
        sent_at=datetime.now(UTC), headers=[[name, value] for name, value in row.headers],
        text_body=row.text_body, html_body=row.html_body,
        raw_sha256=hashlib.sha256(row.raw).digest(), raw=row.raw, mail_from=row.from_address,
        client_ip=None, helo=None, tls=None, tls_version=None, session_id=None, queue_id=None,
        defects=None, spf=None, dkim=None, dmarc=None, arc=None, auth_results=None,
        auth_detail=None, quarantined=None, scan_status=None, scan_signature=None, spam=None,
        spam_status=None, spam_action=None, spam_score=None, spam_required=None,
        spam_symbols=None, received_at=None, iprev=None, extracted_text=None)
    attachments = [MESSAGE_ATTACHMENT.row(
        content_position=1, position=index, filename=clean_text(attachment.filename),
        content_type=attachment.content_type, disposition=attachment.disposition or "attachment",
        content_id=attachment.content_id, sha256=attachment.sha256,
        content=attachment.content, scan_status=None, scan_signature=None)
        for index, attachment in enumerate(row.attachments)]
    return await connection.fetchval(
        """SELECT store_message($1, $2, $3, false, 'outbound', $6, $4,
                                $5::message_content, $7::message_attachment[])""",
        row.workspace_id, row.agent_id, row.thread_id, clean_text(row.to_address), content,
        row.status, attachments)


class GroupCommit:
    """Stores accepted messages, committing together those that arrive while earlier ones
    are being committed: one statement, one transaction, one WAL flush for the lot.

    With little traffic every message is a batch of one and pays nothing extra; under
    load the batches grow by themselves, so Postgres commits less often and the event
    loop makes fewer round trips. Each message still gets its answer only after the
    COMMIT that holds it. Up to `committers` statements run at once, but while one is
    in flight a message waits up to `overlap_after` seconds for it to end (then the
    committer takes everything waiting as its next batch) before another starts beside
    it: a commit takes a few milliseconds, and the messages that arrive meanwhile are
    cheaper as one batch than as transactions of their own (a transaction costs
    Postgres ~0.25 ms beyond its messages, issue 20); behind a slow commit (a large
    message, a busy disk) the others still go after `overlap_after`. A batch that fails is
    stored again one message at a time when Postgres refused it (so one bad message
    cannot fail the others), not when Postgres is unreachable. A batch holds at most
    `batch_max` messages and, beyond its first message, `batch_max_bytes` of content:
    one bind parameter must stay far below Postgres's 1 GB limit.
    """

    def __init__(self, db: asyncpg.Pool, thread_window_days: int, batch_max: int,
                 committers: int, batch_max_bytes: int = 64 * 1024 * 1024,
                 overlap_after: float = 0.0) -> None:
        self.db = db
        self.overlap_after = overlap_after
        self._overlap: asyncio.TimerHandle | None = None
        self.thread_window_days = thread_window_days
        self.batch_max = batch_max
        self.batch_max_bytes = batch_max_bytes
        self.committers = committers
        self._pending: list[tuple[Submission, asyncio.Future[list[StoredMessage]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Counted down by the committer itself as it finishes, not by a done-callback that
        # runs an iteration later: a message queued in between would wait for nobody.
        self._committing = 0

    async def store(self, message: InboundMessage, verdicts: Verdicts,
                    queue_id: str) -> list[StoredMessage]:
        """Like store_inbound(); a sender that goes away does not stop the commit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[StoredMessage]] = loop.create_future()
        self._pending.append((Submission(message, verdicts, queue_id), future))
        if self._committing == 0 or (self._committing < self.committers
                                     and self.overlap_after <= 0):
            self._start_committer()
        elif self._committing < self.committers and self._overlap is None:
            self._overlap = loop.call_later(self.overlap_after, self._overlap_due)
        return await future

    def _start_committer(self) -> None:
        self._committing += 1
        task = asyncio.get_running_loop().create_task(self._commit_pending())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _overlap_due(self) -> None:
        """A message has waited `overlap_after` behind the commits in flight: what waits
        goes beside them."""
        self._overlap = None
        if self._pending and self._committing < self.committers:
            self._start_committer()

    async def _commit_pending(self) -> None:
        try:
            while self._pending:
                head = self._pending[:self.batch_max]
                batch, _ = split_batch(head, [submission.size for submission, _ in head],
                                       self.batch_max, self.batch_max_bytes)
                del self._pending[:len(batch)]
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
