"""Reads behind the inbox API: agents, an agent's threads by cursor, a thread, raw bytes.

Every query takes the workspace_id of the API key and filters on it, so a key
of one workspace cannot name a row of another: such a row is simply not found.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

DB = asyncpg.Pool | asyncpg.Connection


@dataclass(frozen=True)
class Cursor:
    """Where a page of threads ends: (last_message_at, id), ordered newest first."""

    last_message_at: datetime
    id: int


async def agents(db: DB, workspace_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT id, handle, display_name, auto_reply, enabled, created_at FROM agents
           WHERE workspace_id = $1 ORDER BY handle""", workspace_id)
    return [dict(r) for r in rows]


async def agent_id(db: DB, workspace_id: int, handle: str) -> int | None:
    return await db.fetchval("SELECT id FROM agents WHERE workspace_id = $1 AND handle = $2",
                             workspace_id, handle.lower())


async def threads_page(db: DB, workspace_id: int, agent: int, limit: int,
                       after: Cursor | None) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT id, subject, correspondent, message_count, created_at, last_message_at
           FROM threads
           WHERE workspace_id = $1 AND agent_id = $2
             AND ($3::timestamptz IS NULL OR (last_message_at, id) < ($3, $4))
           ORDER BY last_message_at DESC, id DESC LIMIT $5""",
        workspace_id, agent, after.last_message_at if after else None,
        after.id if after else 0, limit)
    return [dict(r) for r in rows]


async def thread(db: DB, workspace_id: int, thread_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow(
        """SELECT t.id, a.handle AS agent, t.subject, t.correspondent, t.message_count,
                  t.created_at, t.last_message_at
           FROM threads t JOIN agents a ON a.id = t.agent_id AND a.workspace_id = t.workspace_id
           WHERE t.workspace_id = $1 AND t.id = $2""", workspace_id, thread_id)
    if row is None:
        return None
    messages = await db.fetch(
        """SELECT id, direction, status, message_id, in_reply_to, "references", from_header,
                  from_address, to_header, cc_header, reply_to, subject, sent_at, received_at,
                  headers, text_body, html_body, size, mail_from, rcpt_to,
                  host(client_ip) AS client_ip, tls, spf, dkim, dmarc, arc, auth_results,
                  quarantined, scan_status, scan_signature
           FROM messages WHERE workspace_id = $1 AND thread_id = $2
           ORDER BY received_at, id""", workspace_id, thread_id)
    attachments = await db.fetch(
        """SELECT a.id, a.message_id, a.filename, a.content_type, a.disposition, a.content_id,
                  a.size, encode(a.sha256, 'hex') AS sha256, a.scan_status, a.scan_signature
           FROM attachments a JOIN messages m ON m.id = a.message_id
                                             AND m.workspace_id = a.workspace_id
           WHERE a.workspace_id = $1 AND m.thread_id = $2
           ORDER BY a.message_id, a.position""", workspace_id, thread_id)
    by_message: dict[int, list[dict[str, Any]]] = {}
    for attachment in attachments:
        item = dict(attachment)
        by_message.setdefault(item.pop("message_id"), []).append(item)
    return {**dict(row), "messages": [
        {**dict(m), "attachments": by_message.get(m["id"], [])} for m in messages]}


async def raw_message(db: DB, workspace_id: int, message_id: int) -> bytes | None:
    return await db.fetchval("SELECT raw FROM messages WHERE workspace_id = $1 AND id = $2",
                             workspace_id, message_id)


async def attachment(db: DB, workspace_id: int, attachment_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow(
        """SELECT a.filename, a.content_type, b.content
           FROM attachments a JOIN blobs b ON b.workspace_id = a.workspace_id
                                          AND b.sha256 = a.sha256
           WHERE a.workspace_id = $1 AND a.id = $2""", workspace_id, attachment_id)
    return dict(row) if row else None
