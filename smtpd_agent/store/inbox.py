"""Reading a mailbox, for the CLI (`smtpd-agent inbox`) and the HTTP inbox API alike.

Agents, an agent's threads newest first (by cursor), a thread's messages with
their attachments and a short text preview, the raw bytes, an attachment's
content. Every query takes a workspace_id and filters on it, so a caller
holding one workspace (an API key, the CLI's workspace argument) cannot name
a row of another: such a row is simply not found.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .directory import Agent
from .mailbox import deliveries

DB = asyncpg.Pool | asyncpg.Connection

# Characters of a message's text in its preview.
PREVIEW_CHARS = 120

_THREAD_COLUMNS = "t.id, t.subject, t.correspondent, t.message_count, t.created_at, t.last_message_at"

# The text body, else the HTML body without its tags; whitespace folded.
_PREVIEW = f"""left(btrim(regexp_replace(
        coalesce(nullif(m.text_body, ''),
                 regexp_replace(coalesce(m.html_body, ''), '<[^>]*>', ' ', 'g')),
        '\\s+', ' ', 'g')), {PREVIEW_CHARS}) AS preview"""

_MESSAGE_COLUMNS = f"""m.id, m.thread_id, m.direction, m.status, m.message_id, m.in_reply_to,
        m."references", m.from_header, m.from_address, m.to_header, m.cc_header, m.reply_to,
        m.subject, m.sent_at, m.received_at, m.headers, m.text_body, m.html_body,
        m.extracted_text, m.size,
        m.mail_from, m.rcpt_to, host(m.client_ip) AS client_ip, m.helo, m.tls, m.spf, m.dkim,
        m.dmarc, m.arc, m.auth_results, m.quarantined, m.scan_status, m.scan_signature,
        m.labels, m.spam, m.spam_status, m.spam_action, m.spam_score, m.spam_symbols,
        m.released_at, {_PREVIEW}"""


@dataclass(frozen=True)
class Cursor:
    """Where a page of threads ends: (last_message_at, id), ordered newest first."""

    last_message_at: datetime
    id: int


async def agents(db: DB, workspace_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT id, handle, display_name, reply_mode, auto_reply, enabled, created_at FROM agents
           WHERE workspace_id = $1 ORDER BY handle""", workspace_id)
    return [dict(r) for r in rows]


async def agent_id(db: DB, workspace_id: int, handle: str) -> int | None:
    return await db.fetchval("SELECT id FROM agents WHERE workspace_id = $1 AND handle = $2",
                             workspace_id, handle.lower())


async def threads_page(db: DB, workspace_id: int, agent: int, limit: int,
                       after: Cursor | None = None,
                       label: str | None = None) -> list[dict[str, Any]]:
    """`label`: only threads with a message carrying it (say 'unread')."""
    # A message with a custom label is in the partial index messages_labels (migration
    # 0022) exactly when it satisfies this predicate, which the label implies; stating it
    # lets the planner use that index. 'unread' alone is not indexed.
    indexed = "" if label in (None, "unread") else \
        "AND m.labels <> '{unread}'::text[] AND m.labels <> '{}'::text[]"
    rows = await db.fetch(
        f"""SELECT {_THREAD_COLUMNS} FROM threads t
            WHERE t.workspace_id = $1 AND t.agent_id = $2
              AND ($3::timestamptz IS NULL OR (t.last_message_at, t.id) < ($3, $4))
              AND ($6::text IS NULL OR EXISTS (
                  SELECT 1 FROM messages m WHERE m.thread_id = t.id
                     AND m.workspace_id = t.workspace_id AND m.labels @> ARRAY[$6::text]
                     {indexed}))
            ORDER BY t.last_message_at DESC, t.id DESC LIMIT $5""",
        workspace_id, agent, after.last_message_at if after else None,
        after.id if after else 0, limit, label)
    return [dict(r) for r in rows]


async def thread_messages(db: DB, workspace_id: int,
                          thread_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The messages of each thread, oldest first, each with its attachments."""
    if not thread_ids:
        return {}
    messages = await db.fetch(
        f"""SELECT {_MESSAGE_COLUMNS} FROM messages m
            WHERE m.workspace_id = $1 AND m.thread_id = ANY($2::bigint[])
            ORDER BY m.received_at, m.id""", workspace_id, thread_ids)
    attachments = await db.fetch(
        """SELECT a.id, a.message_id, a.filename, a.content_type, a.disposition, a.content_id,
                  a.size, encode(a.sha256, 'hex') AS sha256, a.scan_status, a.scan_signature
           FROM attachments a JOIN messages m ON m.id = a.message_id
                                             AND m.workspace_id = a.workspace_id
           WHERE a.workspace_id = $1 AND m.thread_id = ANY($2::bigint[])
           ORDER BY a.message_id, a.position""", workspace_id, thread_ids)
    by_message: dict[int, list[dict[str, Any]]] = {}
    for attachment in attachments:
        item = dict(attachment)
        by_message.setdefault(item.pop("message_id"), []).append(item)
    sent = await deliveries(db, workspace_id,
                            [m["id"] for m in messages if m["direction"] == "outbound"])
    by_thread: dict[int, list[dict[str, Any]]] = {}
    for message in messages:
        item = dict(message)
        item["attachments"] = by_message.get(item["id"], [])
        if item["direction"] == "outbound":
            item["delivery"] = sent.get(item["id"])
        by_thread.setdefault(item.pop("thread_id"), []).append(item)
    return by_thread


async def agent_inbox(db: DB, agent: Agent, limit: int = 50) -> list[dict[str, Any]]:
    """The agent's newest threads, each with its messages (the CLI's view)."""
    threads = await threads_page(db, agent.workspace_id, agent.id, limit)
    messages = await thread_messages(db, agent.workspace_id, [t["id"] for t in threads])
    return [{**thread, "messages": messages.get(thread["id"], [])} for thread in threads]


async def thread(db: DB, workspace_id: int, thread_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow(
        f"""SELECT {_THREAD_COLUMNS}, a.handle AS agent
            FROM threads t JOIN agents a ON a.id = t.agent_id AND a.workspace_id = t.workspace_id
            WHERE t.workspace_id = $1 AND t.id = $2""", workspace_id, thread_id)
    if row is None:
        return None
    messages = await thread_messages(db, workspace_id, [thread_id])
    return {**dict(row), "messages": messages.get(thread_id, [])}


async def raw_message(db: DB, workspace_id: int, message_id: int) -> bytes | None:
    return await db.fetchval("SELECT m.raw FROM messages m WHERE m.workspace_id = $1 AND m.id = $2",
                             workspace_id, message_id)


async def attachment(db: DB, workspace_id: int, attachment_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow(
        """SELECT a.id, a.filename, a.content_type, a.size, b.content
           FROM attachments a JOIN blobs b ON b.workspace_id = a.workspace_id
                                          AND b.sha256 = a.sha256
           WHERE a.workspace_id = $1 AND a.id = $2""", workspace_id, attachment_id)
    return dict(row) if row else None
