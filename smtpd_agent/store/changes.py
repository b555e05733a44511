"""Changes pushed from Postgres to running servers: one LISTEN connection per process.

Triggers on the tables a cache reads NOTIFY a channel at COMMIT (migrations 0007 and
0011: the delegated zones the DNS server serves; functions/notify_routing_change.sql:
the agents, workspaces and domains the router reads; functions/append_event.sql: a new
event in the outbox, store/events.py; functions/notify_webhook_delivery.sql: a webhook
delivery queued). A `ChangeFeed` listens on a connection of its own (a pooled one would be
handed to other work) and calls every subscriber of the channel with the payload, so
a cache drops what changed at once instead of waiting for its TTL.

Notifications sent while the connection is down are lost, so every (re)connect calls
each subscriber's `reset` (expire everything). While it is down the caches' own TTLs
bound staleness; the feed reconnects in the background every `retry_delay` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import structlog

log = structlog.get_logger(__name__)

ZONES_CHANNEL = "smtpd_agent_zones"  # payload: the zone (domain) name
ROUTING_CHANNEL = "smtpd_agent_routing"  # payload: the table that changed
EVENTS_CHANNEL = "smtpd_agent_events"  # payload: the workspace id (store/events.py)
# payload: the workspace id of a webhook delivery queued (functions/notify_webhook_delivery.sql)
WEBHOOKS_CHANNEL = "smtpd_agent_webhooks"
RETRY_DELAY = 5.0


@dataclass(frozen=True, eq=False)
class Subscription:
    channel: str
    changed: Callable[[str], None]
    # called on every (re)connect: notifications may have been missed meanwhile
    reset: Callable[[], None]


class ChangeFeed:
    """LISTEN on every subscribed channel; connects on `start()` or the first subscription."""

    def __init__(self, database_url: str, connect_timeout: float,
                 retry_delay: float = RETRY_DELAY) -> None:
        self.database_url = database_url
        self.connect_timeout = connect_timeout
        self.retry_delay = retry_delay
        self._subscriptions: list[Subscription] = []
        self._connection: asyncpg.Connection | None = None
        self._listening: set[str] = set()
        self._lock = asyncio.Lock()  # one connect or LISTEN at a time on the connection
        self._tasks: set[asyncio.Future[None]] = set()
        self._retry: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    def subscribe(self, channel: str, changed: Callable[[str], None],
                  reset: Callable[[], None]) -> Subscription:
        """Register a subscriber; the LISTEN happens in the background (`start()` waits
        for it). `reset` runs on every (re)connect, the first one included."""
        subscription = Subscription(channel, changed, reset)
        self._subscriptions.append(subscription)
        if not self._closed:
            task = asyncio.ensure_future(self._sync())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subscription)

    async def start(self) -> None:
        """Connect and LISTEN now (bounded by the connect timeout); on failure keep
        retrying in the background."""
        self._closed = False
        await self._sync()

    async def _sync(self) -> None:
        async with self._lock:
            if self._closed:
                return
            connection = self._connection
            if connection is None or connection.is_closed():
                await self._connect()
            else:
                await self._listen(connection)

    async def _connect(self) -> None:
        try:
            connection = await asyncpg.connect(self.database_url, timeout=self.connect_timeout)
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            log.warning("changes.listen_failed", error=str(error), retry_in=self.retry_delay)
            self._schedule_retry()
            return
        if self._closed:  # close() ran meanwhile
            await connection.close()
            return
        self._connection = connection
        self._listening = set()
        connection.add_termination_listener(self._lost)
        if await self._listen(connection):
            for subscription in list(self._subscriptions):
                subscription.reset()  # whatever changed while nobody listened

    async def _listen(self, connection: asyncpg.Connection) -> bool:
        wanted = {s.channel for s in self._subscriptions}
        try:
            for channel in sorted(wanted - self._listening):
                await connection.add_listener(channel, self._notified)
                self._listening.add(channel)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("changes.listen_failed", error=str(error), retry_in=self.retry_delay)
            connection.terminate()  # _lost schedules the retry
            return False
        return True

    def _notified(self, connection: object, pid: int, channel: str, payload: str) -> None:
        for subscription in list(self._subscriptions):
            if subscription.channel == channel:
                subscription.changed(payload)

    def _lost(self, connection: object) -> None:
        if connection is self._connection:
            self._connection = None
            self._listening = set()
        if not self._closed:
            log.warning("changes.listen_lost", retry_in=self.retry_delay)
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        async def again() -> None:
            await asyncio.sleep(self.retry_delay)
            self._retry = None
            await self._sync()
        if self._retry is None and not self._closed:
            self._retry = asyncio.ensure_future(again())

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._retry, *self._tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._retry = None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.remove_termination_listener(self._lost)
            with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
                await connection.close(timeout=5)
