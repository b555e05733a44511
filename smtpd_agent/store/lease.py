"""Lease queues in Postgres: the agent's jobs and the outbound deliveries, one way.

A row is claimed with `FOR UPDATE SKIP LOCKED` by moving it to the queue's
leased status, pushing `run_at` to the end of the lease and drawing a fresh
`lease_token`; a worker that dies simply stops, and the row is due again when
its lease runs out (one partial index on `run_at` serves "due" and "lease
expired"). Every result is recorded only while the token is still the
current one, so a worker that outlived its lease cannot record a second
result. Both tables share the column names (migration 0009): status, run_at,
attempts, lease_token. Apart from the claim, which serves every workspace
and returns each row with its workspace, every statement names the workspace.

`poll` is the one loop every worker runs over its queue, `stop_polling` ends it;
`attempt_claimed` runs one claimed batch (the outbound and webhook deliveries).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar

import asyncpg
import structlog

from .database import CONNECTION_ERRORS

log = structlog.get_logger(__name__)

DbLike: TypeAlias = asyncpg.Pool | asyncpg.Connection


@dataclass(frozen=True)
class LeaseQueue:
    """A table used as a lease queue: which statuses may be claimed, and the claimed one."""

    table: str
    claimable: tuple[str, ...]
    leased: str


@dataclass(frozen=True)
class Lease:
    """What a worker holds: the row, its workspace, and the token that proves it."""

    id: int
    workspace_id: int
    token: uuid.UUID


class LeaseLost(RuntimeError):
    """Our lease ran out and another worker holds the row: its record wins, ours is dropped."""


class _Now:
    """A column value meaning the database's clock at the statement (`now()`)."""

    def __repr__(self) -> str:
        return "NOW"


NOW: Any = _Now()


def _assignments(columns: dict[str, Any], first: int) -> tuple[str, list[Any]]:
    sql, values = "", []
    for name, value in columns.items():
        if value is NOW:
            sql += f", {name} = now()"
        else:
            values.append(value)
            sql += f", {name} = ${first + len(values) - 1}"
    return sql, values


async def claim(db: DbLike, queue: LeaseQueue, limit: int, lease: float,
                condition: str = "", **columns: Any) -> list[asyncpg.Record]:
    """Take up to `limit` due rows for `lease` seconds (also setting `columns`); each
    claimed row as it is now. No two workers get the same row. `condition`: SQL a row must
    also meet (a constant of the caller's, naming the table by its name, never input)."""
    extra, values = _assignments(columns, 5)
    also = f" AND ({condition})" if condition else ""
    return await db.fetch(
        f"""WITH due AS (
                SELECT id FROM {queue.table}
                 WHERE status = ANY($1::text[]) AND run_at <= now(){also}
                 ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)
            UPDATE {queue.table} q
               SET status = $3, attempts = q.attempts + 1, lease_token = gen_random_uuid(),
                   run_at = now() + make_interval(secs => $4){extra}
              FROM due WHERE q.id = due.id
            RETURNING q.*""",
        list(queue.claimable), limit, queue.leased, lease, *values)


async def hold(connection: asyncpg.Connection, queue: LeaseQueue, lease: Lease) -> bool:
    """Lock the row for the caller's transaction; False when the lease is no longer ours."""
    return bool(await connection.fetchval(
        f"""SELECT lease_token = $3 AND status = $4 FROM {queue.table}
             WHERE id = $1 AND workspace_id = $2 FOR UPDATE""",
        lease.id, lease.workspace_id, lease.token, queue.leased))


async def settle(db: DbLike, queue: LeaseQueue, lease: Lease, state: str, *,
                 due_in: float | None = None, uncount: bool = False,
                 **columns: Any) -> bool:
    """End our lease: the row goes to status `state` (due again in `due_in` seconds, if given;
    the attempt not counted with `uncount`), with `columns` set. False: not ours."""
    extra, values = _assignments(columns, 8)
    result = await db.execute(
        f"""UPDATE {queue.table}
               SET status = $4, lease_token = NULL,
                   run_at = CASE WHEN $5::float8 IS NULL THEN run_at
                                 ELSE now() + make_interval(secs => $5::float8) END,
                   attempts = CASE WHEN $6 THEN greatest(attempts - 1, 0) ELSE attempts END
                   {extra}
             WHERE id = $1 AND workspace_id = $2 AND lease_token = $3 AND status = $7""",
        lease.id, lease.workspace_id, lease.token, state, due_in, uncount, queue.leased,
        *values)
    return result.endswith(" 1")


async def poll(step: Callable[[], Awaitable[bool]], *, interval: float,
               stopping: asyncio.Event, wake: asyncio.Event | None = None,
               name: str = "", settle: float = 0.0, settle_max: float = 0.0) -> None:
    """Run `step` until `stopping` is set; when it reports no more work (False), or fails,
    wait `interval` seconds, or until `wake` (or `stopping`) is set.

    `wake` is cleared before each step, never after: a wake-up (new work, or a stop)
    that comes while a step runs makes the next wait return at once instead of being
    lost for a whole interval. With `settle`, a wake-up is followed by that many
    seconds more before the step (a stop still ends the wait), so that work announced
    one item at a time is taken in one batch rather than in one step per item. With
    `settle_max` above `settle`, the step waits until no wake-up has come for `settle`
    seconds, but never more than `settle_max` after the first: work that yields to a
    burst (the search indexer, to mail being received). A burst still going after
    `settle_max` is taken as it comes (a step `settle` after each wake-up, as without
    `settle_max`) until it pauses: the wait is for a burst to end, not a new delay on a
    steady flow."""
    loop = asyncio.get_running_loop()
    deferring = True
    while not stopping.is_set():
        if wake is not None:
            wake.clear()
        try:
            busy = await step()
        except asyncio.CancelledError:
            raise
        except CONNECTION_ERRORS as error:
            log.warning("queue.database_unavailable", loop=name, error=str(error))
            busy = False
        except Exception as error:  # noqa: BLE001 - a bug: log it, wait, go on
            log.exception("queue.poll_failed", loop=name, error=str(error))
            busy = False
        if busy or stopping.is_set():
            continue
        began = loop.time()
        try:
            await asyncio.wait_for((wake or stopping).wait(), interval)
        except TimeoutError:
            deferring = True
            continue
        if loop.time() - began >= settle:
            deferring = True  # nothing was announced for a while: a new burst
        if settle > 0 and not stopping.is_set():
            longest = max(settle, settle_max) if deferring else settle
            deferring = await _settled(wake or stopping, stopping, settle, longest)


async def _settled(wake: asyncio.Event, stopping: asyncio.Event, quiet: float,
                   longest: float) -> bool:
    """Until `wake` has stayed unset for `quiet` seconds (True), `longest` seconds have
    passed (False), or `stopping` is set (a stop sets `wake` as well)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + longest
    woken = False
    while not stopping.is_set():
        if wake is not stopping:
            wake.clear()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        window = min(quiet, remaining)
        try:
            await asyncio.wait_for(wake.wait(), window)
        except TimeoutError:
            return window == quiet or not woken
        woken = True
    return True


async def stop_polling(task: asyncio.Task[None] | None, *, stopping: asyncio.Event,
                       wake: asyncio.Event, grace: float) -> None:
    """End a worker's `poll` loop: it claims nothing more, and the attempts in flight
    finish, for `grace` seconds at most (then the loop is cancelled: their leases run out)."""
    stopping.set()
    wake.set()
    if task is None:
        return
    try:
        await asyncio.wait_for(asyncio.shield(task), grace)
    except TimeoutError:
        task.cancel()


class Claimed(Protocol):
    """A claimed row as a worker holds it: enough to name it in a log line."""

    @property
    def id(self) -> int: ...

    @property
    def workspace_id(self) -> int: ...


C = TypeVar("C", bound=Claimed)


async def attempt_claimed(claimed: Sequence[C], attempt: Callable[[C], Awaitable[None]], *,
                          release: Callable[[C], Awaitable[None]], concurrency: int,
                          stopping: asyncio.Event, lease_lost: str, failed: str) -> int:
    """Attempt each claimed row, `concurrency` at once; how many there were. Once `stopping`
    is set, a row not yet begun is given back (`release`) rather than left to its lease.
    A lost lease (event `lease_lost`) or a failed attempt (event `failed`) is logged and the
    others go on; the failed row's lease runs out and it is tried again."""
    slots = asyncio.Semaphore(concurrency)

    async def one(row: C) -> None:
        async with slots:
            if stopping.is_set():
                await release(row)
                return
            try:
                await attempt(row)
            except LeaseLost as lost:
                log.warning(lease_lost, error=str(lost), delivery_id=row.id,
                            workspace_id=row.workspace_id)
            except Exception:  # noqa: BLE001 - logged; the lease brings the row back
                log.exception(failed, delivery_id=row.id, workspace_id=row.workspace_id)

    await asyncio.gather(*(one(row) for row in claimed))
    return len(claimed)
