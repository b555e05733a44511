"""Retention of the event outbox and the webhook delivery log: the statements.

Both tables grow by a row per event (several KB of payload each), so old rows go, in
batches of at most `limit` rows per statement (each its own short transaction, rows
taken with SKIP LOCKED, never one DELETE that holds locks over the whole table):

- a finished webhook delivery (delivered, failed) once its `finished_at` is older than
  its status's retention; its attempts go with it (ON DELETE CASCADE);
- an event once its `created_at` is older than the events' retention AND no delivery
  of it is left. A pending or retrying delivery reads its event when it is sent, and the
  delivery log and its replay read it too: the event stays as long as any delivery of it
  is kept, so the FK's cascade never takes a delivery with it.

Each deleted event raises its workspace's mark in `events_pruned` (the newest id
deleted) in the same statement: the SSE stream tells a client resuming after an older
id that it missed events. `try_lock` is the cluster-wide "one pruner at a time":
a session advisory lock on the connection the batches then run on, so it is held
exactly while that connection runs them and freed by Postgres if the process dies.
Days of 0 mean "keep forever": the caller does not call the prune for that kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

# pg_try_advisory_lock key: "smtpd-agent retention" folded into a bigint.
RETENTION_LOCK = 0x736D_7470_7265_746E


@dataclass(frozen=True)
class EventCursor:
    """Where the next batch of events resumes: after this (created_at, id)."""

    created_at: datetime | None = None
    id: int = 0


@dataclass(frozen=True)
class EventBatch:
    deleted: int
    # rows looked at (deleted or kept for a delivery); fewer than the limit: the last batch
    examined: int
    cursor: EventCursor


async def try_lock(connection: asyncpg.Connection) -> bool:
    """Take the pruner's lock for this session; False when another session holds it."""
    return bool(await connection.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK))


async def unlock(connection: asyncpg.Connection) -> None:
    await connection.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)


async def prune_deliveries(connection: asyncpg.Connection, status: str, days: int,
                           limit: int) -> int:
    """Delete up to `limit` deliveries of `status` (delivered or failed) finished more
    than `days` days ago, oldest first; how many went."""
    if status not in ("delivered", "failed"):
        raise ValueError(f"not a finished delivery status: {status!r}")
    result = await connection.execute(
        """WITH doomed AS (
               SELECT id FROM webhook_deliveries
                WHERE status = $1 AND finished_at < now() - make_interval(days => $2)
                ORDER BY status, finished_at, id
                LIMIT $3 FOR UPDATE SKIP LOCKED)
           DELETE FROM webhook_deliveries d USING doomed WHERE d.id = doomed.id""",
        status, days, limit)
    return int(result.rsplit(" ", 1)[-1])


async def prune_events(connection: asyncpg.Connection, days: int, limit: int,
                       cursor: EventCursor = EventCursor()) -> EventBatch:
    """Look at up to `limit` events created more than `days` days ago after `cursor`,
    oldest first, and delete those no delivery needs (module docstring)."""
    row = await connection.fetchrow(
        """WITH looked AS (
               SELECT e.id, e.workspace_id, e.created_at, needed.one IS NULL AS unneeded
                 FROM (SELECT id, workspace_id, created_at FROM events
                        WHERE created_at < now() - make_interval(days => $1)
                          AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4))
                        ORDER BY created_at, id
                        LIMIT $2) AS e
                 -- one index probe per event (webhook_deliveries_event), never a hash of
                 -- the whole delivery table
                 LEFT JOIN LATERAL (SELECT 1 AS one FROM webhook_deliveries d
                                     WHERE d.event_id = e.id LIMIT 1) AS needed ON true),
           doomed AS (
               SELECT e.id FROM events e JOIN looked USING (id)
                WHERE looked.unneeded
                  FOR UPDATE OF e SKIP LOCKED),
           gone AS (
               DELETE FROM events e USING doomed WHERE e.id = doomed.id
               RETURNING e.id, e.workspace_id),
           marked AS (
               INSERT INTO events_pruned AS p (workspace_id, through_id)
               SELECT workspace_id, max(id) FROM gone GROUP BY workspace_id
               ON CONFLICT (workspace_id) DO UPDATE
                  SET through_id = greatest(p.through_id, EXCLUDED.through_id),
                      pruned_at = now()
               RETURNING 1)
           SELECT (SELECT count(*) FROM gone) AS deleted,
                  (SELECT count(*) FROM looked) AS examined,
                  last.created_at, last.id
             FROM (SELECT 1) AS one
             LEFT JOIN (SELECT created_at, id FROM looked
                         ORDER BY created_at DESC, id DESC LIMIT 1) AS last ON true""",
        days, limit, cursor.created_at, cursor.id)
    next_cursor = (EventCursor(row["created_at"], row["id"]) if row["id"] is not None
                   else cursor)
    return EventBatch(row["deleted"], row["examined"], next_cursor)


async def pruned_through(db: asyncpg.Pool | asyncpg.Connection, workspace_id: int) -> int:
    """The newest event id of the workspace retention deleted (0: none yet)."""
    return await db.fetchval(
        "SELECT coalesce(max(through_id), 0) FROM events_pruned WHERE workspace_id = $1",
        workspace_id)
