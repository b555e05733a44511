"""Retention of the event outbox and the webhook delivery log: the statements.

Both tables grow by a row per event (with its JSON payload), so old rows go, in
batches of at most `limit` rows per statement (each its own short transaction, rows
taken with SKIP LOCKED, never one DELETE that holds locks over the whole table):

- a finished webhook delivery (delivered, failed) once its `finished_at` is older than
  its status's retention; its attempts go with it (ON DELETE CASCADE);
- an event (walked in id order, up to `event_horizon`) once its `created_at` is older
  than the events' retention AND no delivery of it is left. A pending or retrying
  delivery reads its event when it is sent, and the delivery log and its replay read it
  too: the event stays as long as any delivery of it is kept, so the FK's cascade never
  takes a delivery with it.

Each deleted event raises its workspace's mark in `events_pruned` (the newest id
deleted) in the same statement: the SSE stream tells a client resuming after an older
id that it missed events. `try_lock` is the cluster-wide "one pruner at a time":
a session advisory lock on the connection the batches then run on, so it is held
exactly while that connection runs them and freed by Postgres if the process dies.
Days of 0 mean "keep forever": the caller does not call the prune for that kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

# pg_try_advisory_lock key: "smtpd-agent retention" folded into a bigint.
RETENTION_LOCK = 0x736D_7470_7265_746E
BIGINT_MAX = 2**63 - 1


@dataclass(frozen=True)
class EventBatch:
    deleted: int
    # rows looked at (deleted or kept for a delivery); fewer than the limit: the last batch
    examined: int
    # the id the next batch resumes after
    cursor: int


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


async def event_horizon(connection: asyncpg.Connection, days: int) -> int | None:
    """The first event id created less than `days` days ago (None: every event is older).

    The pruner reads events by id below it, on the primary key: no index on created_at
    is paid for on every message stored. Ids grow with time (a transaction's events
    get its start time, so near the boundary a few may be out of order: those are left
    for the next pass, never deleted young). The scan stops at the first young row; at
    steady state the old rows before it are the few a delivery still keeps."""
    return await connection.fetchval(
        """SELECT id FROM events WHERE created_at >= now() - make_interval(days => $1)
            ORDER BY id LIMIT 1""", days)


async def prune_events(connection: asyncpg.Connection, days: int, limit: int,
                       cursor: int = 0, horizon: int | None = None) -> EventBatch:
    """Look at up to `limit` events after id `cursor` (and below `horizon`) created more
    than `days` days ago, in id order, and delete those no delivery needs (module
    docstring)."""
    row = await connection.fetchrow(
        """WITH looked AS (
               SELECT e.id, e.workspace_id, needed.one IS NULL AS unneeded
                 FROM (SELECT id, workspace_id FROM events
                        WHERE id > $3 AND id < $4
                          AND created_at < now() - make_interval(days => $1)
                        ORDER BY id
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
                  (SELECT max(id) FROM looked) AS last""",
        days, limit, cursor, BIGINT_MAX if horizon is None else horizon)
    return EventBatch(row["deleted"], row["examined"],
                      row["last"] if row["last"] is not None else cursor)


async def pruned_through(db: asyncpg.Pool | asyncpg.Connection, workspace_id: int) -> int:
    """The newest event id of the workspace retention deleted (0: none yet)."""
    return await db.fetchval(
        "SELECT coalesce(max(through_id), 0) FROM events_pruned WHERE workspace_id = $1",
        workspace_id)
