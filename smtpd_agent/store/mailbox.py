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


@dataclass(frozen=True)
class ReplyTarget:
    """A thread of the workspace and the newest inbound message in it (what a reply answers)."""

    thread_id: int
    agent_id: int
    handle: str
    display_name: str | None
    enabled: bool
    thread_subject: str | None
    correspondent: str | None
    message_id: str | None
    references: tuple[str, ...]
    in_reply_to: tuple[str, ...]
    subject: str | None
    from_address: str | None
    reply_to: str | None
    mail_from: str | None
    dmarc: str | None
    rcpt_to: str | None


async def reply_target(db: DB, workspace_id: int, thread_id: int) -> ReplyTarget | None:
    row = await db.fetchrow(
        """SELECT t.id AS thread_id, t.agent_id, a.handle, a.display_name, a.enabled,
                  t.subject AS thread_subject, t.correspondent, m.message_id,
                  coalesce(m."references", '{}') AS "references",
                  coalesce(m.in_reply_to, '{}') AS in_reply_to, m.subject, m.from_address,
                  m.reply_to, m.mail_from, m.dmarc, m.rcpt_to
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
    values = dict(row)
    values["references"] = tuple(values["references"])
    values["in_reply_to"] = tuple(values["in_reply_to"])
    return ReplyTarget(**values)


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


async def sent_message(db: DB, workspace_id: int, message_id: int) -> dict[str, Any] | None:
    """An outbound message as the API shows it right after sending: with its delivery."""
    row = await db.fetchrow(
        """SELECT m.id, m.thread_id, m.direction, m.status, m.message_id, m.from_header,
                  m.to_header, m.cc_header, m.subject, m.in_reply_to, m."references",
                  m.received_at AS created_at
             FROM messages m WHERE m.workspace_id = $1 AND m.id = $2""",
        workspace_id, message_id)
    if row is None:
        return None
    found = dict(row)
    found["delivery"] = (await deliveries(db, workspace_id, [message_id])).get(message_id)
    return found


async def deliveries(db: DB, workspace_id: int,
                     message_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Each outbound message's delivery: its status, attempts and every recipient's state."""
    if not message_ids:
        return {}
    rows = await db.fetch(
        """SELECT d.id, d.message_id, d.status, d.attempts, d.last_error, d.created_at,
                  d.finished_at
             FROM deliveries d WHERE d.workspace_id = $1 AND d.message_id = ANY($2::bigint[])""",
        workspace_id, message_ids)
    found = {r["message_id"]: {**dict(r), "recipients": []} for r in rows}
    by_delivery = {r["id"]: found[r["message_id"]] for r in rows}
    for r in await db.fetch(
            """SELECT delivery_id, address, state, detail FROM delivery_recipients
                WHERE workspace_id = $1 AND delivery_id = ANY($2::bigint[])
                ORDER BY delivery_id, address""", workspace_id, list(by_delivery)):
        by_delivery[r["delivery_id"]]["recipients"].append(
            {"address": r["address"], "state": r["state"], "detail": r["detail"]})
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


async def add_draft(db: DB, workspace_id: int, agent_id: int, thread_id: int | None,
                    fields: DraftFields, origin: str, job_id: int | None = None) -> int:
    """A new draft, announced as draft.created in the same transaction (the caller's, when
    `db` is a connection in one)."""
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
        base = f"{events.API}{row['slug']}"
        links = {"draft": f"{base}/drafts/{row['id']}"}
        if thread_id is not None:
            links["thread"] = f"{base}/threads/{thread_id}"
        # bcc stays out: it is the sender's private choice, readable over the API
        await events.append(connection, workspace_id, EventType.DRAFT_CREATED, {
            "workspace": row["slug"], "agent": row["handle"],
            "draft": {"id": row["id"], "thread_id": thread_id, "origin": origin,
                      "to": list(fields.to), "cc": list(fields.cc), "subject": fields.subject,
                      "created_at": row["created_at"].isoformat()},
            **events.text_fields(fields.text), "links": links}, thread_id=thread_id)
        return int(row["id"])


async def update_draft(db: DB, workspace_id: int, draft_id: int, fields: DraftFields) -> bool:
    status = await db.execute(
        """UPDATE drafts SET to_addresses = $3, cc_addresses = $4, bcc_addresses = $5,
                             subject = $6, text_body = $7, html_body = $8, updated_at = now()
            WHERE workspace_id = $1 AND id = $2 AND status = 'draft'""",
        workspace_id, draft_id, list(fields.to), list(fields.cc), list(fields.bcc),
        fields.subject, fields.text, fields.html)
    return status.endswith(" 1")


async def draft(db: DB, workspace_id: int, draft_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow(
        f"""SELECT {DRAFT_FIELDS}, d.agent_id FROM drafts d
              JOIN agents a ON a.id = d.agent_id AND a.workspace_id = d.workspace_id
             WHERE d.workspace_id = $1 AND d.id = $2""", workspace_id, draft_id)
    return dict(row) if row else None


async def drafts(db: DB, workspace_id: int, agent_id: int | None = None,
                 limit: int = 100) -> list[dict[str, Any]]:
    """The workspace's drafts waiting for a decision, oldest first."""
    rows = await db.fetch(
        f"""SELECT {DRAFT_FIELDS} FROM drafts d
              JOIN agents a ON a.id = d.agent_id AND a.workspace_id = d.workspace_id
             WHERE d.workspace_id = $1 AND d.status = 'draft'
               AND ($2::bigint IS NULL OR d.agent_id = $2)
             ORDER BY d.created_at, d.id LIMIT $3""", workspace_id, agent_id, limit)
    return [dict(r) for r in rows]


async def discard_draft(db: DB, workspace_id: int, draft_id: int) -> bool:
    status = await db.execute(
        """UPDATE drafts SET status = 'discarded', updated_at = now()
            WHERE workspace_id = $1 AND id = $2 AND status = 'draft'""", workspace_id, draft_id)
    return status.endswith(" 1")


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
    with a snippet; `after`: the page after that (rank, id)."""
    rows = await db.fetch(
        f"""WITH q AS (SELECT websearch_to_tsquery('english', $2) AS query),
                hits AS (
                    SELECT m.id, m.thread_id, m.agent_id, m.direction, m.subject,
                           m.from_header, m.received_at, m.labels, m.text_body,
                           ts_rank(m.search, q.query)::real AS rank
                      FROM messages m, q
                     WHERE m.workspace_id = $1 AND m.search @@ q.query
                       AND ($3::bigint IS NULL OR m.agent_id = $3))
            SELECT h.id, h.thread_id, a.handle AS agent, h.direction, h.subject,
                   h.from_header, h.received_at, h.labels, h.rank,
                   ts_headline('english', left(coalesce(nullif(h.text_body, ''), h.subject, ''),
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
