"""Outgoing webhooks in Postgres: endpoints, deliveries (a lease queue), attempts.

Place: the store of the hooks feature (smtpd_agent/hooks). Deliveries are made by
the trigger of functions/fan_out_webhooks.sql in the transaction that appends the
event; the worker claims them like the other queues (store/lease.py) and records each
attempt here while its lease is still the current one. Every statement names the
workspace, except the claim, which serves every workspace and returns each row with
its own. Secrets come and go sealed (bytes); sealing is the feature's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from . import lease as lease_queue
from .lease import NOW, Lease, LeaseLost, LeaseQueue

DbLike: TypeAlias = asyncpg.Pool | asyncpg.Connection

QUEUE = LeaseQueue("webhook_deliveries", claimable=("pending", "sending"), leased="sending")
# A delivery waits while an earlier one of its thread is unfinished for its endpoint, and
# while its endpoint is disabled.
CLAIMABLE = """
    NOT EXISTS (SELECT 1 FROM webhook_deliveries earlier
                 WHERE earlier.endpoint_id = webhook_deliveries.endpoint_id
                   AND earlier.thread_id = webhook_deliveries.thread_id
                   AND earlier.id < webhook_deliveries.id
                   AND earlier.status IN ('pending', 'sending'))
    AND EXISTS (SELECT 1 FROM webhook_endpoints e
                 WHERE e.id = webhook_deliveries.endpoint_id AND e.enabled)"""

ENDPOINT_COLUMNS = """id, url, description, event_types, enabled, consecutive_failures,
    failing_since, disabled_at, disabled_reason, created_at, updated_at,
    previous_secret_until"""


class TooMany(Exception):
    """The workspace has webhooks.max_endpoints endpoints already."""


@dataclass(frozen=True)
class Endpoint:
    """An endpoint as the API shows it: everything but its secrets."""

    id: int
    url: str
    description: str | None
    event_types: list[str]
    enabled: bool
    consecutive_failures: int
    failing_since: datetime | None
    disabled_at: datetime | None
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime
    previous_secret_until: datetime | None

    def public(self) -> dict[str, Any]:
        shown = dict(vars(self))
        shown["rotating_secret_until"] = shown.pop("previous_secret_until")
        return shown


def _endpoint(row: asyncpg.Record | None) -> Endpoint | None:
    return None if row is None else Endpoint(**{**dict(row),
                                                "event_types": list(row["event_types"])})


async def create_endpoint(pool: asyncpg.Pool, workspace_id: int, url: str,
                          event_types: list[str], enabled: bool, description: str | None,
                          sealed_secret: bytes, max_endpoints: int) -> Endpoint:
    async with pool.acquire() as connection, connection.transaction():
        # one creation at a time per workspace, so the cap holds under concurrent requests
        await connection.execute("SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE",
                                 workspace_id)
        count = await connection.fetchval(
            "SELECT count(*) FROM webhook_endpoints WHERE workspace_id = $1", workspace_id)
        if count >= max_endpoints:
            raise TooMany(f"at most {max_endpoints} webhook endpoints a workspace")
        row = await connection.fetchrow(
            f"""INSERT INTO webhook_endpoints (workspace_id, url, event_types, enabled,
                                               description, secret)
                VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ENDPOINT_COLUMNS}""",
            workspace_id, url, event_types, enabled, description, sealed_secret)
    endpoint = _endpoint(row)
    assert endpoint is not None
    return endpoint


async def endpoints(db: DbLike, workspace_id: int) -> list[Endpoint]:
    rows = await db.fetch(f"""SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints
                              WHERE workspace_id = $1 ORDER BY id""", workspace_id)
    return [e for e in map(_endpoint, rows) if e is not None]


async def endpoint(db: DbLike, workspace_id: int, endpoint_id: int) -> Endpoint | None:
    return _endpoint(await db.fetchrow(
        f"""SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints
            WHERE id = $1 AND workspace_id = $2""", endpoint_id, workspace_id))


async def update_endpoint(db: DbLike, workspace_id: int, endpoint_id: int, *,
                          url: str | None = None, event_types: list[str] | None = None,
                          description: str | None = None, set_description: bool = False,
                          enabled: bool | None = None) -> Endpoint | None:
    """Change what is given. Enabling again starts its failure count afresh."""
    return _endpoint(await db.fetchrow(
        f"""UPDATE webhook_endpoints
               SET url = coalesce($3, url), event_types = coalesce($4, event_types),
                   description = CASE WHEN $5 THEN $6 ELSE description END,
                   enabled = coalesce($7, enabled),
                   consecutive_failures = CASE WHEN $7 AND NOT enabled THEN 0
                                               ELSE consecutive_failures END,
                   failing_since = CASE WHEN $7 AND NOT enabled THEN NULL
                                        ELSE failing_since END,
                   disabled_at = CASE WHEN $7 THEN NULL WHEN NOT $7 AND enabled THEN now()
                                      ELSE disabled_at END,
                   disabled_reason = CASE WHEN $7 THEN NULL
                                          WHEN NOT $7 AND enabled THEN 'disabled over the API'
                                          ELSE disabled_reason END,
                   updated_at = now()
             WHERE id = $1 AND workspace_id = $2
         RETURNING {ENDPOINT_COLUMNS}""",
        endpoint_id, workspace_id, url, event_types, set_description, description, enabled))


async def delete_endpoint(db: DbLike, workspace_id: int, endpoint_id: int) -> bool:
    """Delete it with its deliveries and their log (nothing more is sent to it)."""
    status = await db.execute(
        "DELETE FROM webhook_endpoints WHERE id = $1 AND workspace_id = $2",
        endpoint_id, workspace_id)
    return status.endswith(" 1")


async def rotate_secret(db: DbLike, workspace_id: int, endpoint_id: int, sealed: bytes,
                        grace: float) -> Endpoint | None:
    """The new secret signs from now on; the old one also signs for `grace` seconds."""
    return _endpoint(await db.fetchrow(
        f"""UPDATE webhook_endpoints
               SET previous_secret = CASE WHEN $4 > 0 THEN secret END,
                   previous_secret_until = CASE WHEN $4 > 0
                                                THEN now() + make_interval(secs => $4) END,
                   secret = $3, updated_at = now()
             WHERE id = $1 AND workspace_id = $2
         RETURNING {ENDPOINT_COLUMNS}""", endpoint_id, workspace_id, sealed, grace))


@dataclass(frozen=True)
class Target:
    """What an attempt needs of its endpoint: the URL and the sealed secrets that sign."""

    endpoint_id: int
    url: str
    enabled: bool
    secrets: tuple[bytes, ...]  # sealed; newest first


async def target(db: DbLike, workspace_id: int, endpoint_id: int) -> Target | None:
    row = await db.fetchrow(
        """SELECT id, url, enabled, secret,
                  CASE WHEN previous_secret_until > now() THEN previous_secret END AS previous
             FROM webhook_endpoints WHERE id = $1 AND workspace_id = $2""",
        endpoint_id, workspace_id)
    if row is None:
        return None
    sealed = (bytes(row["secret"]),) + ((bytes(row["previous"]),) if row["previous"] else ())
    return Target(row["id"], row["url"], row["enabled"], sealed)


# --- the queue ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery: its lease, its endpoint, its event."""

    id: int
    workspace_id: int
    endpoint_id: int
    event_id: int
    event_type: str
    thread_id: int | None
    attempts: int
    created_at: datetime
    lease: Lease


async def claim(db: DbLike, limit: int, lease: float) -> list[Delivery]:
    rows = await lease_queue.claim(db, QUEUE, limit, lease, condition=CLAIMABLE)
    return [Delivery(r["id"], r["workspace_id"], r["endpoint_id"], r["event_id"],
                     r["event_type"], r["thread_id"], r["attempts"], r["created_at"],
                     Lease(r["id"], r["workspace_id"], r["lease_token"])) for r in rows]


async def release(db: DbLike, delivery: Delivery, due_in: float = 0.0) -> None:
    """Give a claimed delivery back, due in `due_in` seconds, its attempt not counted
    (stopping; a host that cannot unseal the secret)."""
    await lease_queue.settle(db, QUEUE, delivery.lease, "pending", due_in=due_in,
                             uncount=True)


@dataclass(frozen=True)
class Attempt:
    """One attempt as the delivery log records it."""

    started_at: datetime
    duration_ms: int
    status_code: int | None
    outcome: str
    error: str | None
    response: str | None


@dataclass(frozen=True)
class FailureCount:
    """The endpoint's failures in a row after an attempt was recorded."""

    consecutive_failures: int
    failing_since: datetime | None
    enabled: bool


async def record_attempt(pool: asyncpg.Pool, delivery: Delivery, attempt: Attempt,
                         state: str, retry_in: float | None) -> FailureCount:
    """Log the attempt, move the delivery to `state` (due again in `retry_in` seconds when
    pending) and count the endpoint's failures, in one transaction, while our lease holds."""
    async with pool.acquire() as connection, connection.transaction():
        if not await lease_queue.hold(connection, QUEUE, delivery.lease):
            raise LeaseLost(f"webhook delivery {delivery.id}")
        await connection.execute(
            """INSERT INTO webhook_attempts (workspace_id, delivery_id, attempt, started_at,
                                             duration_ms, status_code, outcome, error, response,
                                             retry_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                       CASE WHEN $10::float8 IS NULL THEN NULL
                            ELSE now() + make_interval(secs => $10::float8) END)""",
            delivery.workspace_id, delivery.id, delivery.attempts, attempt.started_at,
            attempt.duration_ms, attempt.status_code, attempt.outcome, attempt.error,
            attempt.response, retry_in)
        finished = state in ("delivered", "failed")
        await lease_queue.settle(
            connection, QUEUE, delivery.lease, state, due_in=retry_in,
            last_status=attempt.status_code, last_error=attempt.error,
            **({"finished_at": NOW} if finished else {}))
        delivered = attempt.outcome == "delivered"
        row = await connection.fetchrow(
            """UPDATE webhook_endpoints
                  SET consecutive_failures = CASE WHEN $3 THEN 0
                                                  ELSE consecutive_failures + 1 END,
                      failing_since = CASE WHEN $3 THEN NULL
                                           ELSE coalesce(failing_since, $4) END
                WHERE id = $1 AND workspace_id = $2
            RETURNING consecutive_failures, failing_since, enabled""",
            delivery.endpoint_id, delivery.workspace_id, delivered, attempt.started_at)
    if row is None:  # deleted meanwhile: nothing to count against
        return FailureCount(0, None, False)
    return FailureCount(row["consecutive_failures"], row["failing_since"], row["enabled"])


async def disable(connection: asyncpg.Connection, workspace_id: int, endpoint_id: int,
                  reason: str) -> int:
    """Disable the endpoint (if still enabled) and fail its unfinished deliveries, which a
    replay can send again; how many deliveries failed, or -1 if it was not enabled."""
    disabled = await connection.fetchval(
        """UPDATE webhook_endpoints
              SET enabled = false, disabled_at = now(), disabled_reason = $3, updated_at = now()
            WHERE id = $1 AND workspace_id = $2 AND enabled RETURNING id""",
        endpoint_id, workspace_id, reason)
    if disabled is None:
        return -1
    status = await connection.execute(
        """UPDATE webhook_deliveries
              SET status = 'failed', lease_token = NULL, finished_at = now(),
                  last_error = 'endpoint disabled: ' || $3
            WHERE endpoint_id = $1 AND workspace_id = $2
              AND status IN ('pending', 'sending')""", endpoint_id, workspace_id, reason[:400])
    return int(status.rsplit(" ", 1)[-1])


async def fail_unfinished(db: DbLike, workspace_id: int, endpoint_id: int, reason: str) -> None:
    """An endpoint disabled over the API: what was waiting for it fails (replay sends it)."""
    await db.execute(
        """UPDATE webhook_deliveries
              SET status = 'failed', lease_token = NULL, finished_at = now(), last_error = $3
            WHERE endpoint_id = $1 AND workspace_id = $2
              AND status IN ('pending', 'sending')""", endpoint_id, workspace_id, reason)


# --- the delivery log and replay ---------------------------------------------------------


async def deliveries(db: DbLike, workspace_id: int, endpoint_id: int, limit: int,
                     before: int | None = None) -> list[dict[str, Any]]:
    """The endpoint's deliveries, newest first, each with its attempts (oldest first)."""
    rows = await db.fetch(
        """SELECT d.id, d.event_id, d.event_type, d.thread_id, d.status, d.attempts,
                  d.run_at AS next_attempt_at, d.replay, d.replay_of, d.last_status,
                  d.last_error,
                  d.created_at, d.finished_at,
                  coalesce((SELECT json_agg(json_build_object(
                                'attempt', a.attempt, 'started_at', a.started_at,
                                'duration_ms', a.duration_ms, 'status_code', a.status_code,
                                'outcome', a.outcome, 'error', a.error,
                                'response', a.response, 'retry_at', a.retry_at)
                                ORDER BY a.id)
                              FROM webhook_attempts a
                             WHERE a.delivery_id = d.id AND a.workspace_id = d.workspace_id),
                           '[]') AS log
             FROM webhook_deliveries d
            WHERE d.workspace_id = $1 AND d.endpoint_id = $2 AND ($3::bigint IS NULL
                                                                 OR d.id < $3)
            ORDER BY d.id DESC LIMIT $4""", workspace_id, endpoint_id, before, limit)
    found = []
    for row in rows:
        item = dict(row)
        item["attempt_log"] = json.loads(item.pop("log"))
        if item["status"] in ("delivered", "failed"):
            item["next_attempt_at"] = None
        found.append(item)
    return found


async def attempts(db: DbLike, workspace_id: int, delivery_id: int) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT attempt, started_at, duration_ms, status_code, outcome, error, response,
                  retry_at
             FROM webhook_attempts WHERE delivery_id = $1 AND workspace_id = $2
            ORDER BY id""", delivery_id, workspace_id)
    return [dict(r) for r in rows]


async def replay_delivery(db: DbLike, workspace_id: int, endpoint_id: int,
                          delivery_id: int) -> int | None:
    """A new delivery of that delivery's event to its endpoint, due now; its id (None when
    it is not the workspace's, or retention deleted it meanwhile)."""
    return await _replay(db, 
        """INSERT INTO webhook_deliveries (workspace_id, endpoint_id, event_id, event_type,
                                           thread_id, replay, replay_of)
           SELECT workspace_id, endpoint_id, event_id, event_type, thread_id, true, id
             FROM webhook_deliveries
            WHERE id = $1 AND workspace_id = $2 AND endpoint_id = $3
        RETURNING id""", delivery_id, workspace_id, endpoint_id)


async def replay_event(db: DbLike, workspace_id: int, endpoint_id: int,
                       event_id: int) -> int | None:
    """A new delivery of the workspace's event `event_id` to the endpoint, due now; its id
    (None when either is not the workspace's). Also for an event the endpoint never had."""
    return await _replay(db, 
        """INSERT INTO webhook_deliveries (workspace_id, endpoint_id, event_id, event_type,
                                           thread_id, replay, replay_of)
           SELECT ev.workspace_id, ep.id, ev.id, ev.type, ev.thread_id, true,
                  (SELECT d.id FROM webhook_deliveries d
                    WHERE d.endpoint_id = ep.id AND d.event_id = ev.id AND NOT d.replay)
             FROM events ev JOIN webhook_endpoints ep ON ep.workspace_id = ev.workspace_id
            WHERE ev.id = $3 AND ev.workspace_id = $1 AND ep.id = $2
        RETURNING id""", workspace_id, endpoint_id, event_id)


async def _replay(db: DbLike, sql: str, *arguments: Any) -> int | None:
    try:
        replay: int | None = await db.fetchval(sql, *arguments)
    except asyncpg.ForeignKeyViolationError:  # the event was pruned between read and insert
        return None
    return replay
