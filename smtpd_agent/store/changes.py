"""Changes pushed from Postgres to running servers: one LISTEN connection per process.

Triggers on the tables a cache reads NOTIFY a channel at COMMIT (migration 0007: the
delegated zones the DNS server serves; 0009: the agents, workspaces and domains the
router reads). A `ChangeFeed` listens on a connection of its own (a pooled one would be
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
from dataclasses import dataclass, field

import asyncpg
import structlog

log = structlog.get_logger(__name__)

ZONES_CHANNEL = "smtpd_agent_zones"  # payload: the zone (domain) name
ROUTING_CHANNEL = "smtpd_agent_routing"  # payload: the table that changed
RETRY_DELAY = 5.0


@dataclass(frozen=True, eq=False)
class Subscription:
    channel: str
    changed: Callable[[str], None]
    # called on every (re)connect: notifications may have been missed meanwhile
    reset: Callable[[], None]


@dataclass(eq=False)
class ChangeFeed:
    """LISTEN on every subscribed channel; connects on `start()` or the first subscription."""

    database_url: str
    connect_timeout: float
    retry_delay: float = RETRY_DELAY
    _subscriptions: list[Subscription] = field(default_factory=list)
    _connection: asyncpg.Connection | None = None
    _listening: set[str] = field(default_factory=set)
    _connecting: asyncio.Task[None] | None = None
    _retry: asyncio.Task[None] | None = None
    _closed: bool = False

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    def subscribe(self, channel: str, changed: Callable[[str], None],
                  reset: Callable[[], None]) -> Subscription:
        """Register a subscriber; the LISTEN itself happens in the background (`start()`
        waits for it). Until it does, the subscriber's reset runs once it is in place."""
        subscription = Subscription(channel, changed, reset)
        self._subscriptions.append(subscription)
        if not self._closed:
            self._ensure_connecting()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(subscription)

    async def start(self) -> None:
        """Connect now (bounded by the connect timeout); on failure keep retrying behind."""
        self._closed = False
        self._ensure_connecting()
        if self._connecting is not None:
            await asyncio.shield(self._connecting)

    def _ensure_connecting(self) -> None:
        if self.connected:
            connection = self._connection
            assert connection is not None
            missing = {s.channel for s in self._subscriptions} - self._listening
            if missing:
                self._connecting = asyncio.ensure_future(self._listen(connection, missing))
            return
        if (self._connecting is None or self._connecting.done()) and self._retry is None:
            self._connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            connection = await asyncpg.connect(self.database_url, timeout=self.connect_timeout)
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            log.warning("changes.listen_failed", error=str(error), retry_in=self.retry_delay)
            self._schedule_retry()
            return
        if self._closed:
            await connection.close()
            return
        self._connection = connection
        self._listening = set()
        connection.add_termination_listener(self._lost)
        await self._listen(connection, {s.channel for s in self._subscriptions})
        for subscription in list(self._subscriptions):
            subscription.reset()  # whatever changed while nobody listened

    async def _listen(self, connection: asyncpg.Connection, channels: set[str]) -> None:
        try:
            for channel in sorted(channels - self._listening):
                await connection.add_listener(channel, self._notified)
                self._listening.add(channel)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("changes.listen_failed", error=str(error), retry_in=self.retry_delay)
            with contextlib.suppress(Exception):
                connection.terminate()  # _lost schedules the retry

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
            self._connecting = asyncio.ensure_future(self._connect())
        if self._retry is None and not self._closed:
            self._retry = asyncio.ensure_future(again())

    async def close(self) -> None:
        self._closed = True
        for task in (self._retry, self._connecting):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._retry = self._connecting = None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.remove_termination_listener(self._lost)
            with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
                await connection.close(timeout=5)
