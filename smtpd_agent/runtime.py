"""What every listener and feature of one process receives: settings, the database, the
resolver, the metrics registry, the one router, the one pipeline and the change feed.

Place: the top of the inbound-stage layer (see docs/architecture.md). Listeners and
features take a `Runtime` and import this module; app.py opens it and hands it to each
service. It imports nothing above the stages, so nothing here can import a part back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import structlog

from .auth import CheckRunner, adapters
from .config import Settings
from .dns import Resolver
from .metrics import Metrics
from .pipeline import DsnReceiver, Pipeline
from .routing import Router
from .scan import Scanner, limit_problems
from .spam import SpamFilter
from .store.changes import WEBHOOKS_CHANNEL, ChangeFeed
from .store.events import Wakeups
from .store.database import EmbeddedPostgres, create_pool, migrate, resolve_database_url

log = structlog.get_logger("smtpd_agent.runtime")

# Builds the bounce processor (outbound/bounces.py) on the runtime's pool; app.py passes it
# in because a feature sits above this layer.
BounceFactory = Callable[[asyncpg.Pool], DsnReceiver]


@dataclass
class Database:
    """An open pool, and the embedded server behind it when there is one."""

    url: str
    pool: asyncpg.Pool
    embedded: EmbeddedPostgres | None

    @classmethod
    async def open(cls, settings: Settings, run_migrations: bool = True) -> Database:
        url, embedded = await asyncio.to_thread(
            resolve_database_url, settings.database, settings.server.state_dir)
        pool: asyncpg.Pool | None = None
        try:
            pool = await create_pool(url, settings.database)
            if run_migrations:
                async with pool.acquire() as connection:
                    await migrate(connection)
        except BaseException:
            if pool is not None:  # a failed migration must not leave the pool's connections
                await pool.close()
            if embedded:
                embedded.release()
            raise
        return cls(url, pool, embedded)

    async def close(self) -> None:
        await self.pool.close()
        if self.embedded:
            await asyncio.to_thread(self.embedded.release)


@dataclass
class Runtime:
    """What every service of one process shares: settings, the database, the resolver."""

    settings: Settings
    database: Database
    resolver: Resolver
    # One registry per process (per App in tests), never prometheus_client's global one.
    metrics: Metrics = field(default_factory=Metrics)
    # Where DSNs to VERP addresses go; None in a runtime that receives no mail (workers).
    bounces: DsnReceiver | None = None
    # The bounded thread pools of the SPF, DKIM and ARC checks (auth/runner.py).
    checks: CheckRunner = field(default_factory=CheckRunner)
    _pipeline: Pipeline | None = field(default=None, repr=False)
    _changes: ChangeFeed | None = field(default=None, repr=False)
    _router: Router | None = field(default=None, repr=False)
    _event_wakeups: Wakeups | None = field(default=None, repr=False)
    _delivery_wakeups: Wakeups | None = field(default=None, repr=False)

    @property
    def pool(self) -> asyncpg.Pool:
        return self.database.pool

    @property
    def changes(self) -> ChangeFeed:
        """The process's one LISTEN connection (store/changes.py): the route and zone caches
        subscribe to it; it connects on the first subscription."""
        if self._changes is None:
            self._changes = ChangeFeed(self.database.url, self.settings.database.connect_timeout)
        return self._changes

    @property
    def event_wakeups(self) -> Wakeups:
        """Wake-ups on new events in the outbox (store/events.py), for the SSE stream and
        the search indexer; subscribed to the change feed on first use."""
        if self._event_wakeups is None:
            self._event_wakeups = Wakeups()
            self._event_wakeups.subscribe(self.changes)
        return self._event_wakeups

    @property
    def delivery_wakeups(self) -> Wakeups:
        """Wake-ups on webhook deliveries queued (functions/notify_webhook_delivery.sql),
        for the webhook worker: an event no endpoint wants wakes nobody."""
        if self._delivery_wakeups is None:
            self._delivery_wakeups = Wakeups(WEBHOOKS_CHANNEL)
            self._delivery_wakeups.subscribe(self.changes)
        return self._delivery_wakeups

    @property
    def scanner(self) -> Scanner | None:
        return self.pipeline.scanner

    @property
    def router(self) -> Router:
        """The one router every way in (SMTP, provider webhooks) routes recipients with."""
        if self._router is None:
            self._router = Router.from_settings(self.pool, self.settings, changes=self.changes)
        return self._router

    @property
    def pipeline(self) -> Pipeline:
        """The one pipeline every way in (SMTP, provider webhooks) feeds; built on first use."""
        if self._pipeline is None:
            self._pipeline = self.build_pipeline(self.settings)
        return self._pipeline

    def build_pipeline(self, settings: Settings) -> Pipeline:
        """A pipeline for `settings` (a SIGHUP reload builds one for the listener). It keeps
        the current Scanner while [scan] is unchanged: one bound on streams to clamd."""
        current = self._pipeline
        if current is not None and current.settings.scan == settings.scan:
            scanner = current.scanner
        else:
            scanner = Scanner(settings.scan) if settings.scan.clamd else None
            if scanner is None:
                log.warning("scan.disabled", reason="scan.clamd is not set: attachments are "
                            "stored with scan status 'unscanned'")
            for problem in limit_problems(settings):
                log.warning("scan.limits", problem=problem)
        if current is not None and current.settings.spam == settings.spam and \
                current.settings.server.hostname == settings.server.hostname:
            spam_filter = current.spam_filter
        else:
            spam_filter = (SpamFilter(settings.spam, settings.server.hostname)
                           if settings.spam.rspamd else None)
        return Pipeline(self.pool, settings, self.resolver, scanner, self.metrics,
                        bounces=self.bounces, checks=self.checks, spam_filter=spam_filter)

    @classmethod
    async def open(cls, settings: Settings, bounces: BounceFactory | None = None) -> Runtime:
        adapters.install()
        database = await Database.open(settings)
        return cls(settings, database, Resolver(settings.dns),
                   bounces=bounces(database.pool) if bounces else None,
                   checks=CheckRunner(settings.auth.dns_workers, settings.auth.verify_workers))

    async def close(self) -> None:
        self.checks.close()
        if self._changes is not None:
            await self._changes.close()
        await self.database.close()


