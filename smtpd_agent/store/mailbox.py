"""What the programmable-mailbox API reads and writes beyond the inbox: agents as an admin
sees them, the thread a reply answers, new threads for first messages, and the
Idempotency-Key record. Every query names the caller's workspace.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from ..message import Attachment
from ..record import StoredInbound
from . import events
from .events import EventType

DB = asyncpg.Pool | asyncpg.Connection

# How long an Idempotency-Key answers with the message it first sent.
IDEMPOTENCY_WINDOW = timedelta(hours=24)

AGENT_FIELDS = """a.id, a.handle, a.display_name, a.system_prompt, a.reply_mode, a.auto_reply,
                  a.enabled, a.created_at"""


async def agents(db: DB, workspace_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(f"SELECT {AGENT_FIELDS} FROM agents a WHERE a.workspace_id = $1 "
                          "ORDER BY a.handle", workspace_id)
    return [dict(r) for r in rows]


async def agent(db: DB, workspace_id: int, handle: str) -> dict[str, Any] | None:
    row = await db.fetchrow(f"SELECT {AGENT_FIELDS} FROM agents a WHERE a.workspace_id = $1 "
                            "AND a.handle = $2", workspace_id, handle.lower())
    return dict(row) if row else None


# The columns of a stored inbound message `m` that make a StoredInbound (stored_inbound()).
STORED_INBOUND = """m.message_id, coalesce(m."references", '{}') AS "references",
                    coalesce(m.in_reply_to, '{}') AS in_reply_to, m.subject, m.from_address,
                    m.reply_to, m.rcpt_to"""


def stored_inbound(row: Any) -> StoredInbound:
    return StoredInbound(row["message_id"], tuple(row["references"]),
                         tuple(row["in_reply_to"]), row["subject"], row["from_address"],
                         row["reply_to"], row["rcpt_to"])


@dataclass(frozen=True)
class ReplyTarget:
    """A thread of the workspace, its agent, and the newest inbound message in it (what a
    reply answers; None before anyone wrote in)."""

    thread_id: int
    agent_id: int
    handle: str
    display_name: str | None
    enabled: bool
    thread_subject: str | None
    correspondent: str | None
    inbound: StoredInbound | None


async def reply_target(db: DB, workspace_id: int, thread_id: int) -> ReplyTarget | None:
    row = await db.fetchrow(
        f"""SELECT t.id AS thread_id, t.agent_id, a.handle, a.display_name, a.enabled,
                   t.subject AS thread_subject, t.correspondent, m.id AS inbound_id,
                   {STORED_INBOUND}
              FROM threads t
              JOIN agents a ON a.id = t.agent_id AND a.workspace_id = t.workspace_id
              LEFT JOIN LATERAL (
                  SELECT * FROM messages m
                   WHERE m.thread_id = t.id AND m.workspace_id = t.workspace_id
                     AND m.direction = 'inbound'
                   ORDER BY m.received_at DESC, m.id DESC LIMIT 1) m ON true
             WHERE t.workspace_id = $1 AND t.id = $2""", workspace_id, thread_id)
    if row is None:
        return None
    return ReplyTarget(row["thread_id"], row["agent_id"], row["handle"], row["display_name"],
                       row["enabled"], row["thread_subject"], row["correspondent"],
                       stored_inbound(row) if row["inbound_id"] is not None else None)


async def last_message_of(db: DB, workspace_id: int, thread_id: int) -> dict[str, Any] | None:
    """The thread's newest message of any direction (a reply to our own first message)."""
    row = await db.fetchrow(
        """SELECT message_id, coalesce("references", '{}') AS "references", subject
             FROM messages WHERE workspace_id = $1 AND thread_id = $2 AND status <> 'draft'
            ORDER BY received_at DESC, id DESC LIMIT 1""", workspace_id, thread_id)
    return dict(row) if row else None


async def new_thread(connection: asyncpg.Connection, workspace_id: int, agent_id: int,
                     subject: str, correspondent: str | None,
                     normalized_subject: str) -> int:
    return await connection.fetchval(
        """INSERT INTO threads (workspace_id, agent_id, subject, normalized_subject,
                                correspondent)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""",
        workspace_id, agent_id, subject, normalized_subject, correspondent)


def request_hash(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


@dataclass(frozen=True)
class Remembered:
    message_id: int
    same_request: bool


async def recall(connection: asyncpg.Connection, workspace_id: int, key: str,
                 fingerprint: bytes) -> Remembered | None:
    """The message an Idempotency-Key sent in the last 24 h, under a lock held to COMMIT so
    two concurrent requests with one key send once. An older record is dropped."""
    await connection.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                             0x6964, f"{workspace_id}:{key}")
    row = await connection.fetchrow(
        """SELECT message_id, request_sha256, created_at > now() - $3::interval AS fresh
             FROM api_idempotency WHERE workspace_id = $1 AND idempotency_key = $2""",
        workspace_id, key, IDEMPOTENCY_WINDOW)
    if row is None:
        return None
    if not row["fresh"]:
        await connection.execute(
            "DELETE FROM api_idempotency WHERE workspace_id = $1 AND idempotency_key = $2",
            workspace_id, key)
        return None
    return Remembered(row["message_id"], bytes(row["request_sha256"]) == fingerprint)


async def remember(connection: asyncpg.Connection, workspace_id: int, key: str,
                   fingerprint: bytes, message_id: int) -> None:
    await connection.execute(
        """INSERT INTO api_idempotency (workspace_id, idempotency_key, request_sha256, message_id)
           VALUES ($1, $2, $3, $4)""", workspace_id, key, fingerprint, message_id)
    # records past their window are useless: a few are cleared with each new one
    await connection.execute(
        """DELETE FROM api_idempotency WHERE ctid = ANY(ARRAY(
               SELECT ctid FROM api_idempotency WHERE created_at < now() - $1::interval
                LIMIT 100))""", IDEMPOTENCY_WINDOW)


async def message(db: DB, workspace_id: int, message_id: int) -> dict[str, Any] | None:
    """A message as the API shows it after sending it, or on its own: with its attachments
    and, outbound, its delivery (status, next attempt, every recipient's state)."""
    row = await db.fetchrow(
        """SELECT m.id, m.thread_id, m.direction, m.status, m.message_id, m.from_header,
                  m.to_header, m.cc_header, m.subject, m.in_reply_to, m."references",
                  m.labels, m.received_at AS created_at
             FROM messages m WHERE m.workspace_id = $1 AND m.id = $2""",
        workspace_id, message_id)
    if row is None:
        return None
    found = dict(row)
    found["attachments"] = [dict(r) for r in await db.fetch(
        """SELECT id, filename, content_type, size, encode(sha256, 'hex') AS sha256
             FROM attachments WHERE workspace_id = $1 AND message_id = $2
            ORDER BY position""", workspace_id, message_id)]
    if found["direction"] == "outbound":
        found["delivery"] = (await deliveries(db, workspace_id, [message_id])).get(message_id)
    return found


async def deliveries(db: DB, workspace_id: int,
                     message_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Each outbound message's delivery: its status (queued, sending, sent, deferred,
    bounced, failed), attempts, when the next one is due (queued or deferred) and every
    recipient's state with the code its server gave."""
    if not message_ids:
        return {}
    rows = await db.fetch(
        """SELECT d.id, d.message_id, d.status, d.attempts, d.last_error, d.created_at,
                  d.last_attempt_at,
                  CASE WHEN d.status IN ('queued', 'deferred') THEN d.run_at END
                      AS next_attempt_at,
                  d.finished_at
             FROM deliveries d WHERE d.workspace_id = $1 AND d.message_id = ANY($2::bigint[])""",
        workspace_id, message_ids)
    found = {r["message_id"]: {**dict(r), "recipients": []} for r in rows}
    by_delivery = {r["id"]: found[r["message_id"]] for r in rows}
    for r in await db.fetch(
            """SELECT delivery_id, address, state, code, enhanced, detail
                 FROM delivery_recipients
                WHERE workspace_id = $1 AND delivery_id = ANY($2::bigint[])
                ORDER BY delivery_id, address""", workspace_id, list(by_delivery)):
        by_delivery[r["delivery_id"]]["recipients"].append(
            {"address": r["address"], "state": r["state"], "code": r["code"],
             "enhanced": r["enhanced"], "detail": r["detail"]})
    for item in found.values():
        item.pop("message_id")
    return found


# --- drafts -------------------------------------------------------------------------------

DRAFT_FIELDS = """d.id, a.handle AS agent, d.thread_id, d.status, d.origin,
                  d.to_addresses AS "to", d.cc_addresses AS cc, d.bcc_addresses AS bcc,
                  d.subject, d.text_body AS text, d.html_body AS html, d.sent_message_id,
                  d.created_at, d.updated_at"""


@dataclass(frozen=True)
class DraftFields:
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    subject: str | None
    text: str | None
    html: str | None
    # None: an update leaves the draft's attachments as they are; () removes them
    attachments: tuple[Attachment, ...] | None = ()


async def add_draft(db: asyncpg.Pool | asyncpg.Connection, workspace_id: int, agent_id: int,
                    thread_id: int | None, fields: DraftFields, origin: str,
                    job_id: int | None = None) -> int:
    """A new draft with its attachments, announced as draft.created in the same transaction
    (the caller's, when `db` is a connection in one)."""
    async with events.transaction(db) as connection:
        row = await connection.fetchrow(
            """WITH d AS (
                   INSERT INTO drafts (workspace_id, agent_id, thread_id, origin, to_addresses,
                                       cc_addresses, bcc_addresses, subject, text_body,
                                       html_body, job_id)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                   RETURNING id, created_at)
               SELECT d.id, d.created_at, w.slug, a.handle
                 FROM d, workspaces w JOIN agents a ON a.workspace_id = w.id
                WHERE w.id = $1 AND a.id = $2""",
            workspace_id, agent_id, thread_id, origin, list(fields.to), list(fields.cc),
            list(fields.bcc), fields.subject, fields.text, fields.html, job_id)
        draft_id = int(row["id"])
        attachments = fields.attachments or ()
        await _set_draft_attachments(connection, workspace_id, draft_id, attachments)
        base = f"{events.API}{row['slug']}"
        links = {"draft": f"{base}/drafts/{draft_id}"}
        if thread_id is not None:
            links["thread"] = f"{base}/threads/{thread_id}"
        # bcc stays out: it is the sender's private choice, readable over the API
        await events.append(connection, workspace_id, EventType.DRAFT_CREATED, {
            "workspace": row["slug"], "agent": row["handle"],
            "draft": {"id": draft_id, "thread_id": thread_id, "origin": origin,
                      "to": list(fields.to), "cc": list(fields.cc), "subject": fields.subject,
                      "attachments": len(attachments),
                      "created_at": row["created_at"].isoformat()},
            **events.text_fields(fields.text), "links": links}, thread_id=thread_id)
        return draft_id


async def update_draft(db: asyncpg.Pool, workspace_id: int, draft_id: int,
                       fields: DraftFields) -> bool:
    async with db.acquire() as connection, connection.transaction():
        status = await connection.execute(
            """UPDATE drafts SET to_addresses = $3, cc_addresses = $4, bcc_addresses = $5,
                                 subject = $6, text_body = $7, html_body = $8, updated_at = now()
                WHERE workspace_id = $1 AND id = $2 AND status = 'draft'""",
            workspace_id, draft_id, list(fields.to), list(fields.cc), list(fields.bcc),
            fields.subject, fields.text, fields.html)
        if not status.endswith(" 1"):
            return False
        if fields.attachments is not None:
            await _set_draft_attachments(connection, workspace_id, draft_id, fields.attachments)
    return True


async def _set_draft_attachments(connection: asyncpg.Connection, workspace_id: int,
                                 draft_id: int, attachments: tuple[Attachment, ...]) -> None:
    """The draft's attachments become `attachments` (content once per workspace in blobs)."""
    await _drop_draft_attachments(connection, workspace_id, draft_id)
    if not attachments:
        return
    await connection.executemany(
        """INSERT INTO blobs (workspace_id, sha256, size, content) VALUES ($1, $2, $3, $4)
           ON CONFLICT (workspace_id, sha256) DO NOTHING""",
        [(workspace_id, a.sha256, a.size, a.content) for a in attachments])
    await connection.executemany(
        """INSERT INTO draft_attachments (workspace_id, draft_id, position, filename,
                                          content_type, size, sha256)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        [(workspace_id, draft_id, index, a.filename, a.content_type, a.size, a.sha256)
         for index, a in enumerate(attachments)])


async def _drop_draft_attachments(connection: asyncpg.Connection, workspace_id: int,
                                  draft_id: int) -> None:
    """Remove the draft's attachment rows, and their content where nothing else names it."""
    await connection.execute(
        """WITH gone AS (
               DELETE FROM draft_attachments WHERE workspace_id = $1 AND draft_id = $2
               RETURNING sha256)
           DELETE FROM blobs b
            WHERE b.workspace_id = $1 AND b.sha256 IN (SELECT sha256 FROM gone)
              AND NOT EXISTS (SELECT 1 FROM attachments a
                               WHERE a.workspace_id = $1 AND a.sha256 = b.sha256)
              AND NOT EXISTS (SELECT 1 FROM draft_attachments d
                               WHERE d.workspace_id = $1 AND d.sha256 = b.sha256
                                 AND d.draft_id <> $2)""", workspace_id, draft_id)


async def draft_attachments(db: DB, workspace_id: int,
                            draft_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Each draft's attachments as the API lists them (no content)."""
    rows = await db.fetch(
        """SELECT draft_id, id, filename, content_type, size, encode(sha256, 'hex') AS sha256
             FROM draft_attachments WHERE workspace_id = $1 AND draft_id = ANY($2::bigint[])
            ORDER BY draft_id, position""", workspace_id, draft_ids)
    found: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        item = dict(row)
        found.setdefault(item.pop("draft_id"), []).append(item)
    return found


async def draft_attachment_contents(db: DB, workspace_id: int,
                                    draft_id: int) -> tuple[Attachment, ...]:
    rows = await db.fetch(
        """SELECT d.filename, d.content_type, b.content FROM draft_attachments d
             JOIN blobs b ON b.workspace_id = d.workspace_id AND b.sha256 = d.sha256
            WHERE d.workspace_id = $1 AND d.draft_id = $2 ORDER BY d.position""",
        workspace_id, draft_id)
    return tuple(Attachment(r["filename"], r["content_type"], bytes(r["content"]),
                            disposition="attachment") for r in rows)


async def draft_attachment(db: DB, workspace_id: int, draft_id: int,
                           attachment_id: int) -> dict[str, Any] | None:
    """One of the draft's own attachments, with its content."""
    row = await db.fetchrow(
        """SELECT d.id, d.filename, d.content_type, d.size, b.content FROM draft_attachments d
             JOIN blobs b ON b.workspace_id = d.workspace_id AND b.sha256 = d.sha256
            WHERE d.workspace_id = $1 AND d.draft_id = $2 AND d.id = $3""",
        workspace_id, draft_id, attachment_id)
    return dict(row) if row else None


async def draft(db: DB, workspace_id: int, draft_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow(
        f"""SELECT {DRAFT_FIELDS}, d.agent_id FROM drafts d
              JOIN agents a ON a.id = d.agent_id AND a.workspace_id = d.workspace_id
             WHERE d.workspace_id = $1 AND d.id = $2""", workspace_id, draft_id)
    if row is None:
        return None
    found = dict(row)
    found["attachments"] = (await draft_attachments(db, workspace_id, [draft_id])).get(
        draft_id, [])
    return found


async def drafts(db: DB, workspace_id: int, agent_id: int | None = None,
                 limit: int = 100) -> list[dict[str, Any]]:
    """The workspace's drafts waiting for a decision, oldest first."""
    rows = await db.fetch(
        f"""SELECT {DRAFT_FIELDS} FROM drafts d
              JOIN agents a ON a.id = d.agent_id AND a.workspace_id = d.workspace_id
             WHERE d.workspace_id = $1 AND d.status = 'draft'
               AND ($2::bigint IS NULL OR d.agent_id = $2)
             ORDER BY d.created_at, d.id LIMIT $3""", workspace_id, agent_id, limit)
    attached = await draft_attachments(db, workspace_id, [r["id"] for r in rows])
    return [{**dict(r), "attachments": attached.get(r["id"], [])} for r in rows]


async def discard_draft(db: asyncpg.Pool, workspace_id: int, draft_id: int) -> bool:
    """Discard a pending draft and remove its attachments."""
    async with db.acquire() as connection, connection.transaction():
        status = await connection.execute(
            """UPDATE drafts SET status = 'discarded', updated_at = now()
                WHERE workspace_id = $1 AND id = $2 AND status = 'draft'""",
            workspace_id, draft_id)
        if not status.endswith(" 1"):
            return False
        await _drop_draft_attachments(connection, workspace_id, draft_id)
    return True


async def mark_draft_sent(connection: asyncpg.Connection, workspace_id: int, draft_id: int,
                          message_id: int) -> bool:
    """In the transaction that stores the message: False if it was sent or discarded meanwhile."""
    status = await connection.execute(
        """UPDATE drafts SET status = 'sent', sent_message_id = $3, updated_at = now()
            WHERE workspace_id = $1 AND id = $2 AND status = 'draft'""",
        workspace_id, draft_id, message_id)
    return status.endswith(" 1")


# --- labels and search --------------------------------------------------------------------

# A label: lower-case, short, no spaces ('unread', 'needs-human', 'crm:42').
LABEL = re.compile(r"^[a-z0-9][a-z0-9_.:/-]{0,62}$")
MAX_LABELS = 50


async def change_labels(db: DB, workspace_id: int, message_id: int, add: list[str],
                        remove: list[str]) -> list[str] | None:
    """Add then remove labels (each once, sorted); the message's labels, None if not found."""
    return await db.fetchval(
        """UPDATE messages SET labels = ARRAY(
               SELECT DISTINCT l FROM unnest(labels || $3::text[]) AS l
                WHERE l <> ALL($4::text[]) ORDER BY l)
            WHERE workspace_id = $1 AND id = $2 RETURNING labels""",
        workspace_id, message_id, add, remove)


@dataclass(frozen=True)
class SearchCursor:
    rank: float
    id: int


# Marks around each hit in a snippet; the snippet is HTML-escaped in Python, then the
# marks become <mark> (the message text itself is never trusted as HTML).
HIT_START, HIT_STOP = "\u27e6", "\u27e7"


async def search(db: DB, workspace_id: int, query: str, agent_id: int | None, limit: int,
                 after: SearchCursor | None = None) -> list[dict[str, Any]]:
    """Messages of the workspace matching `query` (web search syntax), best first, each
    with a snippet; `after`: the page after that (rank, id). The text searched and
    quoted in the snippet is the message's new text (extracted_text, migration 0020),
    else its text body. A message is found once the search indexer has taken it
    (store/search.py: a moment after its COMMIT, within store.search_max_delay during a
    burst of mail)."""
    rows = await db.fetch(
        f"""WITH q AS (SELECT websearch_to_tsquery('english', $2) AS query),
                hits AS (
                    SELECT m.id, m.thread_id, m.agent_id, m.direction, m.subject,
                           m.from_header, m.received_at, m.labels,
                           coalesce(m.extracted_text, m.text_body) AS searched,
                           ts_rank(s.search, q.query)::real AS rank
                      FROM message_search s
                      JOIN messages m ON m.id = s.message_id AND m.workspace_id = $1
                      CROSS JOIN q
                     WHERE s.workspace_id = $1 AND s.search @@ q.query
                       AND ($3::bigint IS NULL OR m.agent_id = $3))
            SELECT h.id, h.thread_id, a.handle AS agent, h.direction, h.subject,
                   h.from_header, h.received_at, h.labels, h.rank,
                   ts_headline('english', left(coalesce(nullif(h.searched, ''), h.subject, ''),
                                               20000), q.query,
                               'StartSel={HIT_START}, StopSel={HIT_STOP}, MaxWords=30, '
                               'MinWords=10, MaxFragments=2') AS snippet
              FROM hits h CROSS JOIN q
              JOIN agents a ON a.id = h.agent_id AND a.workspace_id = $1
             WHERE $4::real IS NULL OR (h.rank, h.id) < ($4::real, $5::bigint)
             ORDER BY h.rank DESC, h.id DESC LIMIT $6""",
        workspace_id, query, agent_id, after.rank if after else None,
        after.id if after else 0, limit)
    return [dict(r) for r in rows]
