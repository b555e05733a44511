"""Read an agent's mailbox: threads newest first, each with its messages.

Every query is scoped by workspace_id as well as agent_id, so a caller that
holds one workspace can never read another's rows.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from .directory import Agent


async def agent_inbox(db: asyncpg.Pool | asyncpg.Connection, agent: Agent,
                      limit: int = 50) -> list[dict[str, Any]]:
    threads = await db.fetch(
        """SELECT id, subject, correspondent, message_count, created_at, last_message_at
           FROM threads WHERE agent_id = $1 AND workspace_id = $2
           ORDER BY last_message_at DESC, id DESC LIMIT $3""",
        agent.id, agent.workspace_id, limit)
    if not threads:
        return []
    thread_ids = [t["id"] for t in threads]
    messages = await db.fetch(
        """SELECT id, thread_id, direction, status, message_id, from_header, from_address,
                  to_header, subject, sent_at, received_at, size, mail_from, rcpt_to,
                  host(client_ip) AS client_ip, helo, tls, spf, dkim, dmarc, arc, quarantined,
                  scan_status, scan_signature
           FROM messages WHERE workspace_id = $1 AND thread_id = ANY($2::bigint[])
           ORDER BY received_at, id""",
        agent.workspace_id, thread_ids)
    attachments = await db.fetch(
        """SELECT a.message_id, a.filename, a.content_type, a.size, encode(a.sha256, 'hex') AS sha256,
                  a.scan_status
           FROM attachments a JOIN messages m ON m.id = a.message_id AND m.workspace_id = a.workspace_id
           WHERE a.workspace_id = $1 AND m.thread_id = ANY($2::bigint[])
           ORDER BY a.message_id, a.position""",
        agent.workspace_id, thread_ids)
    by_message: dict[int, list[dict[str, Any]]] = {}
    for row in attachments:
        item = dict(row)
        by_message.setdefault(item.pop("message_id"), []).append(item)
    by_thread: dict[int, list[dict[str, Any]]] = {}
    for row in messages:
        item = dict(row)
        item["attachments"] = by_message.get(item["id"], [])
        by_thread.setdefault(item.pop("thread_id"), []).append(item)
    return [{**dict(thread), "messages": by_thread.get(thread["id"], [])} for thread in threads]
