"""The outbound queue in Postgres: enqueue, claim with SKIP LOCKED and a lease, record results.

Place: between the agent worker (which stores a reply and calls `enqueue` in
its own transaction) and the OutboundWorker (which claims, sends, and records
through `finish_attempt`). Deliveries are leased like the agent's jobs
(store/lease.py). Nothing is kept in process memory: a worker that dies
mid-send leaves a `sending` row whose lease runs out, and any worker on any
host claims it again. Every query names the workspace of the rows it
touches; only the claim and the sweep, which serve every workspace, scan
across them, and they return each row with its workspace.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Literal, TypeAlias

import asyncpg
import structlog

from ..acl import AclDirection
from ..store import acl, events
from ..store import lease as lease_queue
from ..store.events import EventType
from ..store.lease import NOW, Lease, LeaseLost, LeaseQueue
from .decisions import Next, RecipientResult
from .verp import new_token

log = structlog.get_logger(__name__)

DbLike: TypeAlias = asyncpg.Pool | asyncpg.Connection
SuppressionReason = Literal["hard_bounce", "complaint", "manual"]


def normalize_address(address: str) -> str:
    return address.strip().strip("<>").lower()


def recipients_of(raw: bytes) -> list[str]:
    """To and Cc of the message, lower-cased, in order, once each (the agent never Bccs)."""
    headers = BytesHeaderParser().parsebytes(raw)
    fields = [str(v) for name in ("to", "cc") for v in headers.get_all(name, [])]
    seen: dict[str, None] = {}
    for _, address in getaddresses(fields):
        address = normalize_address(address)
        if "@" in address:
            seen.setdefault(address, None)
    return list(seen)


async def is_suppressed(db: DbLike, workspace_id: int, address: str) -> bool:
    """True if `workspace_id` must not write to `address` (hard bounce, complaint, manual).

    Agents' replies and API sends are refused earlier (agent/recipients.py);
    `enqueue` checks again and never sends to a suppressed recipient.
    """
    return bool(await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM suppressions WHERE workspace_id = $1 AND address = $2)",
        workspace_id, normalize_address(address)))


async def suppress(db: DbLike, workspace_id: int, address: str, reason: SuppressionReason,
                   source: str, detail: str = "", delivery_id: int | None = None) -> bool:
    """Add `address` to the workspace's suppression list; False if it was already there."""
    status = await db.execute(
        """INSERT INTO suppressions (workspace_id, address, reason, source, detail, delivery_id)
           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (workspace_id, address) DO NOTHING""",
        workspace_id, normalize_address(address), reason, source, detail[:500], delivery_id)
    added = status.endswith(" 1")
    if added:
        log.info("outbound.suppressed", workspace_id=workspace_id, address=address,
                 reason=reason, source=source, delivery_id=delivery_id)
    return added


async def enqueue(connection: asyncpg.Connection, message_id: int,
                  workspace_id: int | None = None, bcc: Sequence[str] = ()) -> int | None:
    """Queue the outbound message `message_id` for delivery; its delivery id (None if not one).

    Call it in the transaction that stores the message (direction 'outbound',
    status 'queued'). Idempotent: a second call returns the same delivery. `bcc`: envelope
    recipients beyond the message's To and Cc (never in its headers).
    Suppressed recipients are recorded as skipped ('suppressed') and never sent
    to, and so are those the workspace's or the sending agent's allow/block lists
    refuse ('blocked'); with nobody left the delivery fails at once.
    """
    if workspace_id is None:
        workspace_id = await connection.fetchval(
            "SELECT workspace_id FROM messages WHERE id = $1", message_id)
        if workspace_id is None:
            return None
    message = await connection.fetchrow(
        """SELECT m.id, m.raw, m.agent_id FROM messages m
            WHERE m.id = $1 AND m.workspace_id = $2 AND m.direction = 'outbound'""",
        message_id, workspace_id)
    if message is None:
        return None
    delivery_id = await connection.fetchval(
        """INSERT INTO deliveries (workspace_id, message_id, verp_token)
           VALUES ($1, $2, $3) ON CONFLICT (message_id) DO NOTHING RETURNING id""",
        workspace_id, message_id, new_token())
    if delivery_id is None:
        return await connection.fetchval(
            "SELECT id FROM deliveries WHERE message_id = $1 AND workspace_id = $2",
            message_id, workspace_id)
    recipients = recipients_of(bytes(message["raw"]))
    recipients += [a for a in dict.fromkeys(map(normalize_address, bcc))
                   if "@" in a and a not in recipients]
    suppressed = {row["address"] for row in await connection.fetch(
        "SELECT address FROM suppressions WHERE workspace_id = $1 AND address = ANY($2::text[])",
        workspace_id, recipients)}
    blocked: dict[str, str] = {}
    for address in recipients:
        if address not in suppressed:
            decision = await acl.check(connection, workspace_id, message["agent_id"],
                                       AclDirection.SEND, address)
            if decision.refused:
                blocked[address] = decision.reason

    def state_of(address: str) -> tuple[str, str | None]:
        if address in suppressed:
            return "suppressed", "on the workspace's suppression list"
        if address in blocked:
            return "blocked", f"allow/block list: {blocked[address]}"
        return "queued", None

    await connection.executemany(
        """INSERT INTO delivery_recipients (delivery_id, workspace_id, address, state, detail)
           VALUES ($1, $2, $3, $4, $5)""",
        [(delivery_id, workspace_id, address, *state_of(address)) for address in recipients])
    for address in recipients:
        state, detail = state_of(address)
        if state != "queued":
            log.info("outbound.recipient_skipped", workspace_id=workspace_id,
                     delivery_id=delivery_id, message_id=message_id, address=address,
                     reason=state, detail=detail)
    skipped = len(suppressed) + len(blocked)
    if skipped == len(recipients):
        reason = ("no recipients" if not recipients else "every recipient is suppressed"
                  if not blocked else "every recipient is suppressed or blocked")
        await connection.execute(
            """UPDATE deliveries SET status = 'failed', last_error = $3, finished_at = now()
               WHERE id = $1 AND workspace_id = $2""", delivery_id, workspace_id, reason)
        await _set_message_status(connection, workspace_id, message_id, "failed")
        await events.message_event(
            connection, workspace_id, message_id, EventType.MESSAGE_BOUNCED,
            {"delivery": {"id": delivery_id, "state": "failed", "reason": reason,
                          "recipients": [{"address": a, "state": state_of(a)[0]}
                                         for a in recipients[:EVENT_RECIPIENTS]]}})
        log.info("outbound.failed", workspace_id=workspace_id, delivery_id=delivery_id,
                 message_id=message_id, reason=reason)
    else:
        log.info("outbound.queued", workspace_id=workspace_id, delivery_id=delivery_id,
                 message_id=message_id, recipients=len(recipients) - skipped)
    return int(delivery_id)


async def sweep(db: asyncpg.Pool, limit: int = 100) -> int:
    """Enqueue outbound messages left 'queued' without a delivery (a caller that did not enqueue)."""
    rows = await db.fetch(
        """SELECT m.id, m.workspace_id FROM messages m
           WHERE m.direction = 'outbound' AND m.status = 'queued'
             AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id
                             AND d.workspace_id = m.workspace_id)
           ORDER BY m.id LIMIT $1""", limit)
    for row in rows:
        async with db.acquire() as connection, connection.transaction():
            await enqueue(connection, row["id"], row["workspace_id"])
    return len(rows)


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery: the message, its sender and what has been prepared for it."""

    id: int
    workspace_id: int
    message_id: int
    verp_token: str
    attempts: int
    created_at: datetime
    from_address: str
    raw: bytes
    mail_from: str | None
    signed: bytes | None
    agent_id: int | None = None
    lease_token: uuid.UUID | None = None

    @property
    def lease(self) -> Lease:
        assert self.lease_token is not None
        return Lease(self.id, self.workspace_id, self.lease_token)


# Due: queued or deferred whose time has come, or sending whose lease ran out (its worker died).
DELIVERIES = LeaseQueue("deliveries", claimable=("queued", "deferred", "sending"),
                        leased="sending")


async def claim(db: asyncpg.Pool, limit: int, lease: float) -> list[Delivery]:
    """Take up to `limit` due deliveries for `lease` seconds; no two workers get the same one.

    The attempt counter moves here, so a crash mid-send still counts the attempt.
    """
    rows = await lease_queue.claim(db, DELIVERIES, limit, lease, last_attempt_at=NOW)
    if not rows:
        return []
    messages = {r["id"]: r for r in await db.fetch(
        """SELECT m.id, m.from_address, m.raw, m.agent_id
             FROM unnest($1::bigint[], $2::bigint[]) AS d(message_id, workspace_id)
             JOIN messages m ON m.id = d.message_id AND m.workspace_id = d.workspace_id""",
        [r["message_id"] for r in rows], [r["workspace_id"] for r in rows])}
    claimed = []
    for r in rows:
        message = messages.get(r["message_id"])
        if message is None:  # deleted with its message (ON DELETE CASCADE) meanwhile
            continue
        claimed.append(Delivery(
            id=r["id"], workspace_id=r["workspace_id"], message_id=r["message_id"],
            verp_token=r["verp_token"], attempts=r["attempts"], created_at=r["created_at"],
            from_address=message["from_address"] or "", raw=bytes(message["raw"]),
            mail_from=r["mail_from"],
            signed=bytes(r["signed"]) if r["signed"] is not None else None,
            lease_token=r["lease_token"], agent_id=message["agent_id"]))
    for delivery in claimed:
        await _set_message_status(db, delivery.workspace_id, delivery.message_id, "sending")
    return claimed


async def store_prepared(db: DbLike, delivery: Delivery, mail_from: str, signed: bytes) -> None:
    """Keep the signed bytes and the Return-Path: every later attempt sends exactly these."""
    await db.execute(
        """UPDATE deliveries SET mail_from = $3, signed = $4
           WHERE id = $1 AND workspace_id = $2 AND signed IS NULL""",
        delivery.id, delivery.workspace_id, mail_from, signed)


async def pending_recipients(db: DbLike, delivery: Delivery) -> list[str]:
    rows = await db.fetch(
        """SELECT address FROM delivery_recipients
           WHERE delivery_id = $1 AND workspace_id = $2 AND state IN ('queued', 'deferred')
           ORDER BY address""", delivery.id, delivery.workspace_id)
    return [row["address"] for row in rows]


async def block_refused(db: asyncpg.Pool, delivery: Delivery, recipients: list[str]) -> list[str]:
    """Mark 'blocked' the pending recipients the allow/block lists refuse now; the rest.

    Asked again right before each attempt, in one transaction holding the delivery:
    an entry added after the message was queued still stops it.
    """
    allowed = []
    async with db.acquire() as connection, connection.transaction():
        await _still_ours(connection, delivery)
        for address in recipients:
            decision = await acl.check(connection, delivery.workspace_id, delivery.agent_id,
                                       AclDirection.SEND, address)
            if not decision.refused:
                allowed.append(address)
                continue
            await connection.execute(
                """UPDATE delivery_recipients SET state = 'blocked', detail = $4, updated_at = now()
                    WHERE delivery_id = $1 AND workspace_id = $2 AND address = $3""",
                delivery.id, delivery.workspace_id, address,
                f"allow/block list: {decision.reason}")
            log.info("outbound.recipient_skipped", workspace_id=delivery.workspace_id,
                     delivery_id=delivery.id, message_id=delivery.message_id, address=address,
                     reason="blocked", detail=decision.reason)
    return allowed


RECIPIENT_STATE = {"sent": "sent", "retry": "deferred", "bounce": "bounced", "fail": "failed"}
# The delivery's state after an attempt, as the event it announces (store/events.py):
# 'failed' (gave up, or could not send at all) is a final non-delivery like a bounce.
DELIVERY_EVENT = {"sent": EventType.MESSAGE_SENT, "deferred": EventType.MESSAGE_DEFERRED,
                  "bounced": EventType.MESSAGE_BOUNCED, "failed": EventType.MESSAGE_BOUNCED}
# Recipients named in one event; a message to thousands says how many there were.
EVENT_RECIPIENTS = 100


async def _still_ours(connection: asyncpg.Connection, delivery: Delivery) -> None:
    """Lock the delivery row; raise LeaseLost unless we still hold the lease we claimed."""
    if not await lease_queue.hold(connection, DELIVERIES, delivery.lease):
        raise LeaseLost(f"delivery {delivery.id}: attempt {delivery.attempts} is no longer ours")


async def finish_attempt(db: asyncpg.Pool, delivery: Delivery, started_at: datetime,
                         transport: str, results: Sequence[RecipientResult], next_: Next,
                         provider_message_id: str | None, error: str | None) -> None:
    """Record one attempt in one transaction: recipients, suppressions, delivery, message."""
    async with db.acquire() as connection, connection.transaction():
        await _still_ours(connection, delivery)
        for result in results:
            outcome = result.outcome
            state = RECIPIENT_STATE[outcome.kind]
            if next_.give_up and outcome.kind == "retry":
                state = "failed"
            await connection.execute(
                """UPDATE delivery_recipients
                      SET state = $4, code = $5, enhanced = $6, detail = $7, updated_at = now()
                    WHERE delivery_id = $1 AND workspace_id = $2 AND address = $3""",
                delivery.id, delivery.workspace_id, result.address, state, result.code,
                result.enhanced, result.text[:500])
            if outcome.suppress:
                await suppress(connection, delivery.workspace_id, result.address, "hard_bounce",
                               source=f"{transport} {result.stage}",
                               detail=f"{result.code} {result.text}", delivery_id=delivery.id)
        final = next_.state != "deferred"
        codes = {r.code for r in results}
        await lease_queue.settle(
            connection, DELIVERIES, delivery.lease, next_.state, due_in=next_.retry_in or 0.0,
            transport=transport, last_error=error, finished_at=NOW if final else None,
            **({"provider_message_id": provider_message_id} if provider_message_id else {}))
        await connection.execute(
            """INSERT INTO delivery_attempts (delivery_id, workspace_id, attempt, started_at,
                                              transport, outcome, code, detail, retry_in)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            delivery.id, delivery.workspace_id, delivery.attempts, started_at, transport,
            next_.state, next(iter(codes)) if len(codes) == 1 else None,
            (error or "; ".join(f"{r.address}: {r.code} {r.text}" for r in results))[:1000],
            next_.retry_in)
        await _set_message_status(connection, delivery.workspace_id, delivery.message_id,
                                  next_.state)
        await events.message_event(
            connection, delivery.workspace_id, delivery.message_id, DELIVERY_EVENT[next_.state],
            {"delivery": {
                "id": delivery.id, "state": next_.state, "attempt": delivery.attempts,
                "transport": transport, "retry_in": next_.retry_in,
                "recipient_count": len(results),
                "recipients": [{"address": r.address, "code": r.code, "enhanced": r.enhanced,
                                "detail": r.text[:300]} for r in results[:EVENT_RECIPIENTS]],
            }})


async def fail(db: asyncpg.Pool, delivery: Delivery, started_at: datetime, reason: str) -> None:
    """A delivery that cannot be sent at all (e.g. no DKIM keys): failed, with the reason."""
    async with db.acquire() as connection, connection.transaction():
        await _still_ours(connection, delivery)
        await lease_queue.settle(connection, DELIVERIES, delivery.lease, "failed",
                                 last_error=reason, finished_at=NOW)
        await connection.execute(
            """UPDATE delivery_recipients SET state = 'failed', detail = $3, updated_at = now()
               WHERE delivery_id = $1 AND workspace_id = $2 AND state IN ('queued', 'deferred')""",
            delivery.id, delivery.workspace_id, reason)
        await connection.execute(
            """INSERT INTO delivery_attempts (delivery_id, workspace_id, attempt, started_at,
                                              transport, outcome, detail)
               VALUES ($1, $2, $3, $4, 'none', 'failed', $5)""",
            delivery.id, delivery.workspace_id, delivery.attempts, started_at, reason)
        await _set_message_status(connection, delivery.workspace_id, delivery.message_id,
                                  "failed")
        await events.message_event(
            connection, delivery.workspace_id, delivery.message_id, EventType.MESSAGE_BOUNCED,
            {"delivery": {"id": delivery.id, "state": "failed", "attempt": delivery.attempts,
                          "reason": reason[:300]}})


async def release(db: DbLike, delivery: Delivery, retry_in: float) -> None:
    """Give a claimed delivery back untried (nothing to send with yet): no attempt is counted."""
    await lease_queue.settle(db, DELIVERIES, delivery.lease, "deferred", due_in=retry_in,
                             uncount=True)


@dataclass(frozen=True)
class BounceTarget:
    delivery_id: int
    workspace_id: int
    message_id: int


async def find_by_token(db: DbLike, token: str) -> BounceTarget | None:
    row = await db.fetchrow(
        "SELECT id, workspace_id, message_id FROM deliveries WHERE verp_token = $1", token)
    return BounceTarget(row["id"], row["workspace_id"], row["message_id"]) if row else None


async def find_by_provider_id(db: DbLike, provider_message_id: str) -> BounceTarget | None:
    row = await db.fetchrow(
        """SELECT id, workspace_id, message_id FROM deliveries
           WHERE provider_message_id = $1 ORDER BY id DESC LIMIT 1""", provider_message_id)
    return BounceTarget(row["id"], row["workspace_id"], row["message_id"]) if row else None


async def record_bounce(connection: asyncpg.Connection, target: BounceTarget, address: str,
                        status: str, detail: str, source: str) -> str | None:
    """A recipient bounced after we handed the message on; the delivery's new state, if any.

    The delivery becomes 'bounced' when no recipient of it was delivered or is still pending.
    Every bounce is a message.bounced event (naming the recipient), in the same transaction.
    """
    await connection.execute(
        """UPDATE delivery_recipients
              SET state = 'bounced', enhanced = $4, detail = $5, updated_at = now()
            WHERE delivery_id = $1 AND workspace_id = $2 AND address = $3""",
        target.delivery_id, target.workspace_id, normalize_address(address), status,
        detail[:500])
    remaining = await connection.fetchval(
        """SELECT count(*) FROM delivery_recipients
           WHERE delivery_id = $1 AND workspace_id = $2 AND state NOT IN ('bounced', 'suppressed',
                                                                          'failed', 'blocked')""",
        target.delivery_id, target.workspace_id)
    await events.message_event(
        connection, target.workspace_id, target.message_id, EventType.MESSAGE_BOUNCED,
        {"bounce": {"address": normalize_address(address), "status": status,
                    "detail": detail[:300], "source": source},
         "delivery": {"id": target.delivery_id, "state": "sent" if remaining else "bounced"}})
    if remaining:
        return None
    await connection.execute(
        """UPDATE deliveries SET status = 'bounced', finished_at = coalesce(finished_at, now())
           WHERE id = $1 AND workspace_id = $2""", target.delivery_id, target.workspace_id)
    await _set_message_status(connection, target.workspace_id, target.message_id, "bounced")
    return "bounced"


async def record_feedback(connection: asyncpg.Connection, target: BounceTarget,
                          type: EventType, address: str, detail: str, source: str) -> None:
    """A delivery report or a complaint about one recipient: its event, nothing else
    changes (a complaint's suppression is the caller's)."""
    await events.message_event(
        connection, target.workspace_id, target.message_id, type,
        {"recipient": {"address": normalize_address(address), "detail": detail[:300],
                       "source": source},
         "delivery": {"id": target.delivery_id}})


async def _set_message_status(db: DbLike, workspace_id: int, message_id: int,
                              status: str) -> None:
    await db.execute(
        """UPDATE messages SET status = $3
           WHERE id = $1 AND workspace_id = $2 AND direction = 'outbound'""",
        message_id, workspace_id, status)
