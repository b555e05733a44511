"""The event outbox: what happened in a workspace, for agents that live elsewhere.

The contract the SSE stream (events/stream.py) and the webhook worker rely on:

- `append(connection, workspace_id, type, payload, thread_id=None)` runs INSIDE the
  caller's transaction, the one that makes the change it reports (store_message.sql
  calls the same SQL function for every stored message). The event then exists exactly
  when its cause committed: never lost on a crash, never seen for a rollback. It returns
  the row's `id`. A message's payload is built by functions/message_event.sql
  (`message_event()` here), a draft's and a domain's where they are stored: ids, the
  workspace's slug, envelope, subject, a snippet, text up to TEXT_CHARS and API links;
  never secrets, never whole bodies. A message event's snippet and text are not stored
  with it but joined from the message when read (functions/event_payload.sql, through
  COLUMNS): the text never changes, and the store transaction then writes it once.
  `Event.body()` is the JSON every consumer sends.
- `after(db, workspace_id, last_id, limit, types=None)` pages the committed events
  after the event `last_id` (0: from the beginning), oldest first, at most `limit`;
  `workspace_id=None` reads every workspace (the webhook worker). Feeding back the last
  `id` returned never skips and never repeats an event.
  Why not just `id > last_id`: ids are handed out at INSERT and transactions commit in
  another order, so an id below one already read can still commit. Rows are therefore
  read in (txid, id) order, and only those of transactions older than the oldest one
  still open (`pg_snapshot_xmin`): anything committing later sorts after them.
  `Page.held` says committed events wait behind an older open transaction: ask again
  shortly (the open transaction's COMMIT sends no NOTIFY of its own if it wrote none).
- Every append NOTIFYs channel `EVENTS_CHANNEL` at COMMIT (payload: the workspace id).
  `Wakeups` turns those, through the process's one LISTEN connection (Runtime.changes),
  into asyncio wake-ups per workspace. A NOTIFY sent while that connection is down is
  lost; the feed's reset wakes everybody on reconnect, and readers still poll slowly.
- `event_id` ('evt_' + 32 hex) is the public id, the webhook-id of every delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from .changes import EVENTS_CHANNEL, ChangeFeed

DB = asyncpg.Pool | asyncpg.Connection


class EventType(StrEnum):
    MESSAGE_RECEIVED = "message.received"
    MESSAGE_QUARANTINED = "message.quarantined"
    MESSAGE_SENT = "message.sent"
    MESSAGE_DELIVERED = "message.delivered"
    MESSAGE_DEFERRED = "message.deferred"
    MESSAGE_BOUNCED = "message.bounced"
    MESSAGE_COMPLAINED = "message.complained"
    DRAFT_CREATED = "draft.created"
    DOMAIN_VERIFIED = "domain.verified"
    DOMAIN_DEGRADED = "domain.degraded"
    # an endpoint of the workspace failed too long and was disabled (hooks/worker.py)
    WEBHOOK_DISABLED = "webhook.disabled"


EVENT_TYPES = frozenset(EventType)
# The bounds of a payload's text, the same as functions/event_payload.sql's.
TEXT_CHARS = 8000
SNIPPET_CHARS = 200
API = "/api/v1/workspaces/"


@dataclass(frozen=True)
class Event:
    id: int
    event_id: str
    workspace_id: int
    type: str
    thread_id: int | None
    payload: dict[str, Any]
    created_at: datetime

    def body(self) -> dict[str, Any]:
        """What a consumer sends (the stream's data, a webhook's body): the public id,
        the type, when, and the payload."""
        return {"id": self.event_id, "type": self.type,
                "timestamp": self.created_at.isoformat(), "data": self.payload}

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Event:
        return cls(row["id"], row["event_id"], row["workspace_id"], row["type"],
                   row["thread_id"], json.loads(row["payload"]), row["created_at"])


@dataclass(frozen=True)
class Page:
    events: list[Event]
    # committed events of this reader held back behind an older transaction still open
    held: bool = False

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    @property
    def last_id(self) -> int | None:
        return self.events[-1].id if self.events else None


async def append(connection: asyncpg.Connection, workspace_id: int, type: EventType,
                 payload: dict[str, Any], thread_id: int | None = None) -> int:
    """Write one event in the caller's open transaction; its id."""
    if not connection.is_in_transaction():
        raise RuntimeError("events.append outside a transaction: the event must commit "
                           "with its cause")
    return await connection.fetchval("SELECT append_event($1, $2, $3, $4::text::jsonb)",
                                     workspace_id, str(type), thread_id, json.dumps(payload))


# payload as text: decoded here, whatever codecs the caller's connection has; a message
# event's text is joined as it is read (functions/event_payload.sql)
COLUMNS = ("e.id, e.event_id, e.workspace_id, e.type, e.thread_id, "
           "(e.event_payload)::text AS payload, e.created_at")


async def after(db: DB, workspace_id: int | None, last_id: int, limit: int,
                types: Sequence[str] | None = None) -> Page:
    """Committed events after event `last_id`, in the readers' order (module docstring)."""
    # Conditions are left out rather than written `$n IS NULL OR ...`: a prepared
    # statement's generic plan could then not use the (workspace_id, txid, id) index.
    where: list[str] = []
    arguments: list[Any] = []

    def argument(value: Any) -> str:
        arguments.append(value)
        return f"${len(arguments)}"

    if workspace_id is not None:
        where.append(f"e.workspace_id = {argument(workspace_id)}::bigint")
    cursor = None
    if last_id > 0:
        cursor = await db.fetchrow(
            "SELECT txid, id FROM events e WHERE e.id = $1::bigint"
            + (" AND e.workspace_id = $2::bigint" if workspace_id is not None else ""),
            last_id, *([workspace_id] if workspace_id is not None else []))
    if cursor is not None:
        where.append(f"(e.txid, e.id) > ({argument(cursor['txid'])}::xid8, "
                     f"{argument(cursor['id'])}::bigint)")
    else:
        # from the start, or an id this reader may not see (another workspace's, or
        # pruned): every later id of its own; nothing of another workspace either way
        where.append(f"e.id > {argument(max(last_id, 0))}::bigint")
    if types:
        where.append(f"e.type = ANY({argument(list(types))}::text[])")
    rows = await db.fetch(
        f"""SELECT {COLUMNS}, e.txid < pg_snapshot_xmin(pg_current_snapshot()) AS settled
              FROM events e
             WHERE {' AND '.join(where)}
             ORDER BY e.txid, e.id
             LIMIT {argument(limit + 1)}""", *arguments)
    settled = [Event.from_row(row) for row in rows if row["settled"]][:limit]
    held = any(not row["settled"] for row in rows)
    return Page(settled, held)


async def last_id(db: DB, workspace_id: int) -> int:
    """The id a reader starting 'from now' resumes after (0 when there is none)."""
    return await db.fetchval(
        """SELECT coalesce(max(id), 0) FROM (
               SELECT id FROM events e WHERE workspace_id = $1
                  AND txid < pg_snapshot_xmin(pg_current_snapshot())
                ORDER BY txid DESC, id DESC LIMIT 1) AS newest""", workspace_id)


async def depth(db: DB) -> int:
    """Rows in the outbox (the metrics gauge)."""
    return await db.fetchval("SELECT count(*) FROM events")


@dataclass(eq=False)
class Wakeups:
    """asyncio wake-ups from a NOTIFY whose payload is a workspace id, per workspace (None:
    any workspace): the outbox's (`EVENTS_CHANNEL`, every event) by default.

    A reader registers with `watch()` BEFORE it reads, clears the signal, reads, then
    waits on it: an event committed between the read and the wait still wakes it.
    """

    channel: str = EVENTS_CHANNEL
    _signals: dict[int | None, set[asyncio.Event]] = field(default_factory=dict)

    def subscribe(self, changes: ChangeFeed) -> None:
        changes.subscribe(self.channel, self.changed, self.reset)

    def changed(self, payload: str) -> None:
        try:
            workspace_id: int | None = int(payload)
        except ValueError:
            self.reset()
            return
        for key in (workspace_id, None):
            for signal in self._signals.get(key, ()):
                signal.set()

    def reset(self) -> None:
        for signals in self._signals.values():
            for signal in signals:
                signal.set()

    @contextlib.asynccontextmanager
    async def forwarding(self, wake: asyncio.Event,
                         workspace_id: int | None = None) -> AsyncIterator[None]:
        """While inside, every committed event of `workspace_id` (None: any) sets `wake`:
        for a worker whose `lease.poll` loop waits on `wake` between polls."""
        with self.watch(workspace_id) as signal:
            async def relay() -> None:
                while True:
                    await signal.wait()
                    signal.clear()
                    wake.set()

            task = asyncio.create_task(relay())
            try:
                yield
            finally:
                task.cancel()

    @contextlib.contextmanager
    def watch(self, workspace_id: int | None) -> Iterator[asyncio.Event]:
        signal = asyncio.Event()
        self._signals.setdefault(workspace_id, set()).add(signal)
        try:
            yield signal
        finally:
            signals = self._signals.get(workspace_id)
            if signals is not None:
                signals.discard(signal)
                if not signals:
                    del self._signals[workspace_id]


async def message_event(connection: asyncpg.Connection, workspace_id: int, message_id: int,
                        type: EventType, extra: dict[str, Any] | None = None) -> int:
    """An event about one stored message, its payload built by functions/message_event.sql
    (ids, envelope, subject, snippet, bounded text, links) plus `extra`; in the caller's
    transaction, like `append`."""
    if not connection.is_in_transaction():
        raise RuntimeError("events.message_event outside a transaction: the event must "
                           "commit with its cause")
    return await connection.fetchval("SELECT message_event($1, $2, $3, $4::text::jsonb)",
                                     workspace_id, message_id, str(type),
                                     json.dumps(extra or {}))


def text_fields(text: str | None) -> dict[str, Any]:
    """A payload's snippet and text, bounded as event_payload.sql bounds a message's."""
    text = text or ""
    snippet = re.sub(r"\s+", " ", text[:1000]).strip()[:SNIPPET_CHARS]
    return {"snippet": snippet, "text": text[:TEXT_CHARS],
            "text_truncated": len(text) > TEXT_CHARS}


@contextlib.asynccontextmanager
async def transaction(db: DB) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on `db`: a pool's connection, or a savepoint inside the caller's."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as connection, connection.transaction():
            yield connection
    else:
        async with db.transaction():
            yield db
