"""The search indexer: makes stored messages searchable shortly after their COMMIT.

Place: a Service of `serve` (app.SERVICES). Every stored message is queued for indexing
in its own transaction (store/search.py); this takes the queue in batches of
store.search_batch. The outbox's NOTIFY at COMMIT (every received message has an event)
wakes it, so new mail is searchable within a moment: once no commit has woken it for
store.search_delay, so that a batch holds the many messages committed meanwhile
rather than the one or two of each commit (a statement per batch, not per commit),
and so that while mail keeps arriving it leaves the CPU to receiving it (indexing
cost Postgres more than storing, issue 20); but never later than
store.search_max_delay after the first wake-up, and a burst that lasts longer is
indexed as it comes until it pauses (a steady flow is not delayed, lease.poll).
It also looks every store.search_poll seconds (mail sent over the API, another host's commits while the
LISTEN connection was down, a backlog left by a stop). Any number of processes and
hosts may run it against one database: batches never overlap.
"""

from __future__ import annotations

import asyncio

import structlog

from ..runtime import Runtime
from ..store import search
from ..store.lease import poll, stop_polling

log = structlog.get_logger(__name__)


class SearchIndexer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.batch = runtime.settings.store.search_batch
        self.interval = runtime.settings.store.search_poll
        self.settle = runtime.settings.store.search_delay
        self.settle_max = runtime.settings.store.search_max_delay
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.batch < 1:
            log.info("search.indexer_off", reason="store.search_batch is 0")
            return
        self._task = asyncio.create_task(self._run(), name="search-indexer")

    async def stop(self) -> None:
        # a batch in flight commits (or rolls back, leaving its messages queued)
        await stop_polling(self._task, stopping=self._stopping, wake=self._wake, grace=30)
        self._task = None

    async def step(self) -> bool:
        """Index one batch; True when the queue may hold more."""
        taken = await search.index_pending(self.runtime.pool, self.batch)
        if taken:
            self.runtime.metrics.search_indexed.inc(taken)
            log.debug("search.indexed", messages=taken)
        return taken >= self.batch

    async def _run(self) -> None:
        await self.runtime.changes.start()
        async with self.runtime.event_wakeups.forwarding(self._wake):
            await poll(self.step, interval=self.interval, stopping=self._stopping,
                       wake=self._wake, name="search", settle=self.settle,
                       settle_max=self.settle_max)
