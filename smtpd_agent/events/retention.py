"""Retention: a Service of `serve` that deletes old events and finished webhook deliveries.

Every `retention.interval` seconds (0: off in this process) one pass: take the cluster's
pruning lock (store/retention.py) on a connection of its own, so several servers on one
database prune one at a time (the others log `retention.skipped` and wait for their next
pass); then finished deliveries past their retention, then events past theirs, each in
batches of `retention.batch_size` rows with `retention.batch_pause` seconds between
batches. The connection is closed after the pass (Postgres frees the lock with it, also
when the process dies). One `retention.pruned` log event per pass with the counts.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import asyncpg
import structlog

from ..config import RetentionSettings
from ..metrics import Metrics
from ..periodic import Periodic
from ..runtime import Runtime
from ..store import retention as store
from ..store.database import CONNECTION_ERRORS, init_connection

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PassResult:
    """What one pass did: ran (False: another node held the lock), and rows deleted."""

    ran: bool
    events: int = 0
    delivered: int = 0
    failed: int = 0
    kept_for_deliveries: int = 0


class Pruner(Periodic):
    """The pruning passes of one process (a Service of app.SERVICES)."""

    name = "retention"
    failure_event = "retention.failed"

    def __init__(self, url: str, settings: RetentionSettings, metrics: Metrics,
                 connect_timeout: float = 5.0, command_timeout: float = 30.0) -> None:
        super().__init__(settings.interval)
        self.url = url
        self.settings = settings
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout

    @classmethod
    def of(cls, runtime: Runtime) -> Pruner:
        """The service of `serve` (app.SERVICES)."""
        database = runtime.settings.database
        return cls(runtime.database.url, runtime.settings.retention, runtime.metrics,
                   database.connect_timeout, database.command_timeout)

    def failed(self, error: Exception) -> None:
        self.metrics.retention_passes.labels("failed").inc()
        if isinstance(error, CONNECTION_ERRORS):
            log.warning("retention.database_unavailable", error=str(error))
        else:
            log.error(self.failure_event, error=str(error), exc_info=error)

    async def run_once(self) -> PassResult:
        """One pass (module docstring)."""
        settings = self.settings
        if settings.keeps_everything:
            return PassResult(ran=False)
        connection = await asyncpg.connect(self.url, timeout=self.connect_timeout,
                                           command_timeout=self.command_timeout)
        try:
            await init_connection(connection)
            if not await store.try_lock(connection):
                self.metrics.retention_passes.labels("skipped").inc()
                log.info("retention.skipped", reason="another process is pruning")
                return PassResult(ran=False)
            try:
                return await self._prune(connection)
            finally:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await store.unlock(connection)
        finally:
            await connection.close()

    async def _prune(self, connection: asyncpg.Connection) -> PassResult:
        settings = self.settings
        started = time.monotonic()
        counts = {"delivered": 0, "failed": 0}
        for status, days in (("delivered", settings.webhook_delivered_days),
                             ("failed", settings.webhook_failed_days)):
            while days and not self.stopping.is_set():
                deleted = await store.prune_deliveries(connection, status, days,
                                                       settings.batch_size)
                counts[status] += deleted
                self.metrics.retention_deleted.labels(f"webhook_deliveries_{status}").inc(
                    deleted)
                if deleted < settings.batch_size or await self.pause(settings.batch_pause):
                    break
        events = examined = cursor = 0
        horizon = (await store.event_horizon(connection, settings.events_days)
                   if settings.events_days else None)
        while settings.events_days and not self.stopping.is_set():
            batch = await store.prune_events(connection, settings.events_days,
                                             settings.batch_size, cursor, horizon)
            events += batch.deleted
            examined += batch.examined
            cursor = batch.cursor
            self.metrics.retention_deleted.labels("events").inc(batch.deleted)
            if batch.examined < settings.batch_size or await self.pause(settings.batch_pause):
                break
        result = PassResult(True, events, counts["delivered"], counts["failed"],
                            examined - events)
        self.metrics.retention_passes.labels("done").inc()
        log.info("retention.pruned", events=result.events,
                 webhook_deliveries_delivered=result.delivered,
                 webhook_deliveries_failed=result.failed,
                 events_kept_for_deliveries=result.kept_for_deliveries,
                 events_days=settings.events_days,
                 webhook_delivered_days=settings.webhook_delivered_days,
                 webhook_failed_days=settings.webhook_failed_days,
                 seconds=round(time.monotonic() - started, 3),
                 stopped_early=self.stopping.is_set())
        return result
