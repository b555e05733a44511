"""The agent job queue in Postgres: claim, read the thread, finish.

Stage 6 of the pipeline. Jobs are created by the store (same transaction as
the message) and leased like outbound deliveries (store/lease.py): a worker
claims the oldest due job, a worker that dies simply stops and the job is due
again when the lease ends. Finishing re-checks the lease token inside the
transaction that stores the reply (store/messages.py writes it, as it writes
every message), so a worker that outlived its lease cannot add a second reply.
Apart from the claim (which serves every workspace), every query names the
job's workspace.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..extract.html_text import body_text
from ..outbound.queue import enqueue
from ..record import StoredInbound
from ..store import lease as lease_queue
from ..store.lease import NOW, Lease, LeaseQueue
from ..store.mailbox import STORED_INBOUND, DraftFields, add_draft, stored_inbound
from ..store.messages import OutboundRow, store_outbound
from . import caps as limits
from .caps import Caps
from .compose import ComposedReply
from .llm import Completion
from .policy import MessageFacts
from .prompt import AttachmentNote, TranscriptEntry

# A claimed job is 'running' until its lease runs out (then it is claimable again).
AGENT_JOBS = LeaseQueue("agent_jobs", claimable=("pending", "running"), leased="running")


@dataclass(frozen=True)
class Job:
    id: int
    workspace_id: int
    agent_id: int
    thread_id: int
    message_id: int
    attempts: int
    lease_token: uuid.UUID

    @property
    def lease(self) -> Lease:
        return Lease(self.id, self.workspace_id, self.lease_token)


@dataclass(frozen=True)
class AgentRecord:
    handle: str
    workspace_slug: str
    display_name: str | None
    system_prompt: str | None
    auto_reply: bool
    enabled: bool
    reply_mode: str = "auto"


@dataclass(frozen=True)
class InboundRecord:
    """The message a job answers: what the decision reads, and what the reply answers."""

    facts: MessageFacts
    message: StoredInbound


async def claim(db: asyncpg.Pool, worker: str, lease: float) -> Job | None:
    rows = await lease_queue.claim(db, AGENT_JOBS, 1, lease, worker=worker, updated_at=NOW)
    if not rows:
        return None
    row = rows[0]
    return Job(row["id"], row["workspace_id"], row["agent_id"], row["thread_id"],
               row["message_id"], row["attempts"], row["lease_token"])


async def load_agent(db: asyncpg.Pool, job: Job) -> AgentRecord | None:
    row = await db.fetchrow(
        """SELECT a.handle, w.slug AS workspace_slug, a.display_name, a.system_prompt,
                  a.auto_reply, a.enabled, a.reply_mode
             FROM agents a JOIN workspaces w ON w.id = a.workspace_id
            WHERE a.id = $1 AND a.workspace_id = $2""", job.agent_id, job.workspace_id)
    return AgentRecord(**dict(row)) if row else None


async def load_inbound(db: asyncpg.Pool, job: Job) -> InboundRecord | None:
    row = await db.fetchrow(
        f"""SELECT m.headers, m.mail_from, m.dmarc, m.scan_status, m.auth_detail,
                   (m.quarantined OR m.spam) AND m.released_at IS NULL AS quarantined,
                   {STORED_INBOUND}
              FROM messages m
             WHERE m.id = $1 AND m.workspace_id = $2 AND m.agent_id = $3
               AND m.direction = 'inbound'""",
        job.message_id, job.workspace_id, job.agent_id)
    if row is None:
        return None
    facts = MessageFacts.with_auth_detail(
        row["auth_detail"], headers=tuple((str(k), str(v)) for k, v in row["headers"]),
        mail_from=row["mail_from"], from_address=row["from_address"], dmarc=row["dmarc"],
        quarantined=row["quarantined"], scan_status=row["scan_status"])
    return InboundRecord(facts, stored_inbound(row))


async def load_transcript(db: asyncpg.Pool, job: Job, correspondent: str,
                          reply_to: str) -> list[TranscriptEntry]:
    """The thread in order, one correspondent's part of it only: their mail up to the one
    being answered, and our replies to them (`correspondent` is the From address being
    answered, `reply_to` where this reply goes). Whatever the thread holds besides (a
    thread stored before threads were kept per correspondent) never reaches the prompt;
    nor does held mail (spam, DMARC quarantine) until an operator releases it."""
    rows = await db.fetch(
        """SELECT id, direction, from_header, to_header, subject, coalesce(sent_at, received_at)
                  AS date, text_body, html_body, extracted_text,
                  CASE direction WHEN 'inbound' THEN from_address ELSE rcpt_to END AS address
             FROM messages
            WHERE thread_id = $1 AND workspace_id = $2 AND agent_id = $3
              AND ((direction = 'inbound' AND id <= $4 AND lower(from_address) = lower($5)
                    AND NOT ((quarantined OR spam) AND released_at IS NULL))
                   OR (direction = 'outbound' AND lower(rcpt_to) IN (lower($5), lower($6))))
            ORDER BY id""", job.thread_id, job.workspace_id, job.agent_id, job.message_id,
        correspondent, reply_to)
    attachments: dict[int, list[AttachmentNote]] = {}
    for row in await db.fetch(
            """SELECT message_id, filename, content_type, size FROM attachments
                WHERE workspace_id = $1 AND message_id = ANY($2::bigint[])
                ORDER BY message_id, position""",
            job.workspace_id, [r["id"] for r in rows]):
        attachments.setdefault(row["message_id"], []).append(
            AttachmentNote(row["filename"], row["content_type"], row["size"]))
    return [TranscriptEntry(direction=r["direction"], from_header=r["from_header"],
                            to_header=r["to_header"], subject=r["subject"], date=r["date"],
                            text=r["extracted_text"] if r["extracted_text"] is not None
                            and r["direction"] == "inbound"
                            else body_text(r["text_body"], r["html_body"]),
                            attachments=tuple(attachments.get(r["id"], ())),
                            address=r["address"])
            for r in rows]


async def custom_domains_among(db: asyncpg.Pool, names: list[str]) -> frozenset[str]:
    """Which of `names` are custom domains of any workspace (mail from them is from us).

    Deliberately across workspaces: an agent of another workspace is still one of ours,
    and only the yes/no leaves this function, never the other workspace's data.
    """
    if not names:
        return frozenset()
    rows = await db.fetch("SELECT name FROM domains WHERE name = ANY($1::text[])", names)
    return frozenset(r["name"] for r in rows)


async def _end(db: asyncpg.Pool | asyncpg.Connection, job: Job, state: str,
               **columns: Any) -> bool:
    """Set a final state, if we still hold the lease. False: someone else has it."""
    return await lease_queue.settle(db, AGENT_JOBS, job.lease, state, updated_at=NOW,
                                    finished_at=NOW, **columns)


async def skip(db: asyncpg.Pool, job: Job, reason: str) -> bool:
    return await _end(db, job, "skipped", skip_reason=reason)


async def fail(db: asyncpg.Pool, job: Job, error: str) -> bool:
    return await _end(db, job, "failed", last_error=error)


async def retry_later(db: asyncpg.Pool, job: Job, error: str, delay: float) -> bool:
    """Back to pending, due after `delay` seconds by the database's clock."""
    return await lease_queue.settle(db, AGENT_JOBS, job.lease, "pending", due_in=delay,
                                    last_error=error, updated_at=NOW)


async def release(db: asyncpg.Pool, job: Job) -> bool:
    """Give a job back at once (worker stopping); the attempt does not count."""
    return await lease_queue.settle(db, AGENT_JOBS, job.lease, "pending", due_in=0.0,
                                    uncount=True, updated_at=NOW)


@dataclass(frozen=True)
class Finished:
    stored: bool
    reply_id: int | None = None
    reason: str | None = None
    draft_id: int | None = None


async def store_reply(db: asyncpg.Pool, job: Job, reply: ComposedReply, completion: Completion,
                      caps: Caps) -> Finished:
    """Store the reply in the thread and close the job, in one transaction, or nothing.

    The rate limits and caps are checked again here under a per-workspace lock (the
    caps span the workspace's agents), since workers on other machines may have
    replied since the first check.
    """
    usage = {"model": completion.model, "input_tokens": completion.input_tokens,
             "output_tokens": completion.output_tokens, "latency_ms": completion.latency_ms}
    async with db.acquire() as connection, connection.transaction():
        if not await lease_queue.hold(connection, AGENT_JOBS, job.lease):
            return Finished(False, reason="lease lost")
        await limits.lock(connection, job.workspace_id)
        refused = await limits.check(connection, job.workspace_id, job.agent_id,
                                     (reply.to_address,), caps)
        if refused:
            await _end(connection, job, "skipped", skip_reason=refused.reason, **usage)
            return Finished(False, reason=refused.reason)
        reply_id = await store_outbound(connection, OutboundRow(
            workspace_id=job.workspace_id, agent_id=job.agent_id, thread_id=job.thread_id,
            dedup_key=f"reply:{job.message_id}", message_id=reply.message_id,
            in_reply_to=tuple(reply.in_reply_to), references=tuple(reply.references),
            from_header=reply.from_header, from_address=reply.from_address,
            to_address=reply.to_address, subject=reply.subject, headers=tuple(reply.headers),
            text_body=reply.text, html_body=reply.html, raw=reply.raw))
        await limits.remember_recipients(connection, job.workspace_id, job.agent_id,
                                         (reply.to_address,))
        # into the outbound queue in the same transaction (signed and sent by OutboundWorker)
        await enqueue(connection, reply_id, job.workspace_id)
        await _end(connection, job, "done", reply_message_id=reply_id, **usage)
    return Finished(True, reply_id=reply_id)


async def store_draft(db: asyncpg.Pool, job: Job, reply: ComposedReply,
                      completion: Completion) -> Finished:
    """reply_mode 'draft': keep the reply as a draft of the thread (nothing is queued) and
    close the job, in one transaction; a person or program sends or discards it."""
    usage = {"model": completion.model, "input_tokens": completion.input_tokens,
             "output_tokens": completion.output_tokens, "latency_ms": completion.latency_ms}
    async with db.acquire() as connection, connection.transaction():
        if not await lease_queue.hold(connection, AGENT_JOBS, job.lease):
            return Finished(False, reason="lease lost")
        draft_id = await add_draft(connection, job.workspace_id, job.agent_id, job.thread_id,
                                   DraftFields(to=(reply.to_address,), cc=(), bcc=(),
                                               subject=reply.subject, text=reply.text,
                                               html=None), "agent", job.id)
        await _end(connection, job, "done", **usage)
    return Finished(True, draft_id=draft_id)
