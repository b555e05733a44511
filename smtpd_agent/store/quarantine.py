"""The quarantine: inbound mail held from the agent, listed and released by an operator.

Held means labelled spam by rspamd (spam.py) or quarantined by the sender's
DMARC policy (auth/), and not yet released. A held message has no agent job
(spam) or a job the worker skips (DMARC); the agent's transcript leaves it
out. Releasing it records `released_at` (the labels stay, as evidence) and
queues its job, a new one or the skipped one made due again; whether the
agent then answers is still the worker's decision (a DMARC failure, for
one, is never answered). Held mail was announced as message.quarantined when
stored; its release is the message.received event (`released` true), in the
same transaction. Every query names the workspace of the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from . import events
from .events import EventType

DB = asyncpg.Pool | asyncpg.Connection

HELD = "m.direction = 'inbound' AND (m.spam OR m.quarantined) AND m.released_at IS NULL"


class QuarantineError(LookupError):
    """No held message with that id (never stored, not held, or already released)."""


def why_held(row: dict[str, Any]) -> str:
    """The reasons, for people: rspamd's action and score, the DMARC verdict."""
    reasons = []
    if row["spam"]:
        score = f" {row['spam_score']:.1f}" if row.get("spam_score") is not None else ""
        reasons.append(f"spam (rspamd {row.get('spam_action') or 'label'}{score})")
    if row["quarantined"]:
        reasons.append(f"DMARC quarantine (dmarc={row.get('dmarc') or 'none'})")
    return ", ".join(reasons)


async def held(db: DB, workspace_slug: str | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
    """Held messages, newest first, in every workspace or in one."""
    rows = await db.fetch(
        f"""SELECT m.id, w.slug AS workspace, a.handle AS agent, m.received_at, m.mail_from,
                   m.from_header, m.subject, host(m.client_ip) AS client_ip, m.spam,
                   m.spam_action, m.spam_score, m.spam_symbols, m.quarantined, m.dmarc
              FROM messages m
              JOIN workspaces w ON w.id = m.workspace_id
              JOIN agents a ON a.id = m.agent_id AND a.workspace_id = m.workspace_id
             WHERE {HELD} AND ($1::text IS NULL OR w.slug = $1)
             ORDER BY m.received_at DESC, m.id DESC LIMIT $2""", workspace_slug, limit)
    return [dict(row, reason=why_held(dict(row))) for row in rows]


@dataclass(frozen=True)
class Released:
    message_id: int
    workspace: str
    agent: str
    reason: str
    job_id: int | None  # None when the agent does not answer (auto-reply off)


async def release(pool: asyncpg.Pool, message_id: int,
                  workspace_slug: str | None = None) -> Released:
    """Release one held message and queue its agent job, in one transaction."""
    async with pool.acquire() as connection, connection.transaction():
        row = await connection.fetchrow(
            f"""SELECT m.id, m.workspace_id, m.agent_id, m.thread_id, m.spam, m.spam_action,
                       m.spam_score, m.quarantined, m.dmarc, w.slug, a.handle, a.auto_reply
                  FROM messages m
                  JOIN workspaces w ON w.id = m.workspace_id
                  JOIN agents a ON a.id = m.agent_id AND a.workspace_id = m.workspace_id
                 WHERE m.id = $1 AND {HELD} AND ($2::text IS NULL OR w.slug = $2)
                   FOR UPDATE OF m""", message_id, workspace_slug)
        if row is None:
            raise QuarantineError(f"no held message {message_id}"
                                  + (f" in workspace {workspace_slug}" if workspace_slug else ""))
        await connection.execute(
            "UPDATE messages SET released_at = now() WHERE id = $1 AND workspace_id = $2",
            row["id"], row["workspace_id"])
        job_id = None
        if row["auto_reply"]:
            job_id = await connection.fetchval(
                """INSERT INTO agent_jobs (workspace_id, agent_id, thread_id, message_id)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (message_id) DO UPDATE
                      SET status = 'pending', run_at = now(), attempts = 0, lease_token = NULL,
                          worker = NULL, skip_reason = NULL, last_error = NULL,
                          finished_at = NULL, updated_at = now()
                    WHERE agent_jobs.status IN ('skipped', 'failed')
                   RETURNING id""",
                row["workspace_id"], row["agent_id"], row["thread_id"], row["id"])
        await events.message_event(connection, row["workspace_id"], row["id"],
                                   EventType.MESSAGE_RECEIVED, {"released": True})
        return Released(row["id"], row["slug"], row["handle"], why_held(dict(row)), job_id)
