"""The webhook delivery worker: claims due deliveries, POSTs them signed, records the result.

Place: a Service of `serve` (app.SERVICES). Any number of processes on any host run it
against one database; a delivery is leased (store/lease.py) to one of them at a time,
so each event goes out once per endpoint unless a worker dies mid-request (then, after
its lease, another sends it again with the same webhook-id, which receivers dedupe on).
A delivery's NOTIFY at COMMIT (functions/notify_webhook_delivery.sql: fan-out and replays
alike; not every event, which under load woke every process's worker for each commit
to find nothing) wakes it; otherwise it polls every webhooks.poll_interval.
Decisions are decisions.py's; addresses are judged by targets.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from datetime import UTC, datetime
from functools import partial

import aiohttp
import asyncpg
import structlog

from ..config import Settings
from ..domains.keys import KeyStoreError
from ..metrics import Metrics
from ..runtime import Runtime
from ..store import hooks as store
from ..store.lease import attempt_claimed, poll, stop_polling
from . import signing
from .decisions import DeliveryState, Outcome, after_attempt, outcome_of, should_disable
from .payloads import DISABLED_EVENT, event_body, record_disabled
from .service import Sealer
from .targets import AddressRefused, GuardedResolver, Policy, Refused, check_url, describe

log = structlog.get_logger(__name__)

USER_AGENT = "smtpd-agent-webhooks/1"
RESPONSE_KEPT = 500  # characters of an answer kept in the delivery log


class DeliveryWorker:
    """webhooks.concurrency deliveries at once from one process; 0: none (start is a no-op)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.db: asyncpg.Pool = runtime.pool
        self.settings: Settings = runtime.settings
        self.hooks = runtime.settings.webhooks
        self.metrics: Metrics = runtime.metrics
        self.policy = Policy.of(self.hooks.allow_loopback, self.hooks.allowed_networks)
        self.sealer = Sealer(runtime.settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self.hooks.concurrency < 1:
            log.info("webhooks.worker_off", reason="webhooks.concurrency is 0")
            return
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.runtime.resolver, self.policy),
            use_dns_cache=False, limit=self.hooks.concurrency, force_close=True)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            auto_decompress=False, headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=self.hooks.timeout,
                                          sock_connect=self.hooks.connect_timeout))
        self._task = asyncio.create_task(self._run(), name="webhook-worker")
        log.info("webhooks.worker_started", worker=self.name,
                 concurrency=self.hooks.concurrency, allow_loopback=self.hooks.allow_loopback)

    def wake(self) -> None:
        """Look at the queue now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        # attempts in flight finish (each bounded by webhooks.timeout)
        await stop_polling(self._task, stopping=self._stopping, wake=self._wake,
                           grace=self.hooks.timeout + 5)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        log.info("webhooks.worker_stopped", worker=self.name)

    async def _run(self) -> None:
        async def step() -> bool:
            return await self.run_once() >= self.hooks.batch_size

        # a delivery queued in any workspace (its NOTIFY at COMMIT) wakes the worker
        await self.runtime.changes.start()
        async with self.runtime.delivery_wakeups.forwarding(self._wake):
            await poll(step, interval=self.hooks.poll_interval, stopping=self._stopping,
                       wake=self._wake, name="webhooks")

    async def run_once(self) -> int:
        """Claim one batch and attempt each delivery in it; how many were claimed."""
        claimed = await store.claim(self.db, self.hooks.batch_size, self.hooks.lease)
        return await attempt_claimed(
            claimed, self.attempt, release=partial(store.release, self.db),
            concurrency=self.hooks.concurrency, stopping=self._stopping,
            lease_lost="webhooks.lease_lost", failed="webhooks.attempt_error")

    async def attempt(self, delivery: store.Delivery) -> None:
        started = datetime.now(UTC)
        clock = time.monotonic()
        fields = dict(delivery_id=delivery.id, workspace_id=delivery.workspace_id,
                      endpoint_id=delivery.endpoint_id, event_id=delivery.event_id,
                      event_type=delivery.event_type, attempt=delivery.attempts)
        target = await store.target(self.db, delivery.workspace_id, delivery.endpoint_id)
        body = await event_body(self.db, delivery.workspace_id, delivery.event_id)
        status: int | None = None
        error: str | None = None
        response: str | None = None
        refused = False
        if target is None or body is None:
            error = "the endpoint or the event no longer exists"
        else:
            try:
                secrets = [self.sealer.unseal(sealed) for sealed in target.secrets]
            except KeyStoreError as problem:
                # this host's at-rest secret (domains.key_file) is not the one that sealed
                # it: not the endpoint's failure; give it back for a host that can sign
                log.error("webhooks.secret_unreadable", error=str(problem), **fields)
                await store.release(self.db, delivery, self.hooks.retry_base)
                return
            try:
                check_url(target.url, self.policy)  # an IP literal never reaches the resolver
                headers = signing.headers(body.message_id, datetime.now(UTC), body.content,
                                          secrets)
                status, response = await self.post(target.url, body.content, headers)
            except Refused as problem:
                refused, error = True, str(problem)
            except aiohttp.ClientConnectorError as problem:
                refused = isinstance(problem.os_error, AddressRefused)
                error = describe(problem.os_error if refused else problem)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as problem:
                error = describe(problem)
        if status is not None and error is None and not 200 <= status < 300:
            error = f"HTTP {status}"
        outcome = outcome_of(status, refused)
        if target is None or body is None:
            next_ = after_attempt(Outcome.FAILED, delivery.attempts, float("inf"), self.hooks)
        else:
            age = (started - delivery.created_at).total_seconds()
            next_ = after_attempt(outcome, delivery.attempts, age, self.hooks)
        if next_.give_up:
            error = f"gave up after {delivery.attempts} attempts: {error}"[:500]
        duration = int((time.monotonic() - clock) * 1000)
        count = await store.record_attempt(
            self.db, delivery,
            store.Attempt(started, duration, status, outcome.value, error, response),
            next_.state.value, next_.retry_in)
        self.metrics.webhook_deliveries.labels(outcome.value).inc()
        self.metrics.webhook_seconds.observe(duration / 1000)
        if next_.give_up or next_.state is DeliveryState.FAILED:
            self.metrics.webhook_gave_up.inc()
        log.info(f"webhooks.{outcome.value}", status=status, error=error,
                 duration_ms=duration, state=next_.state.value, retry_in=next_.retry_in,
                 **fields)
        if outcome is not Outcome.DELIVERED and count.enabled and should_disable(
                count.consecutive_failures, count.failing_since, datetime.now(UTC),
                self.hooks):
            await self.disable(delivery, target.url if target else "", count, error or "")

    async def post(self, url: str, content: bytes,
                   headers: dict[str, str]) -> tuple[int, str]:
        """POST without following redirects; the status and the first bytes of the answer."""
        assert self._session is not None
        async with self._session.post(url, data=content, allow_redirects=False,
                                      headers={**headers,
                                               "Content-Type": "application/json"}) as reply:
            head = await reply.content.read(self.hooks.max_response_bytes)
            return reply.status, head.decode("utf-8", "replace")[:RESPONSE_KEPT]

    async def disable(self, delivery: store.Delivery, url: str, count: store.FailureCount,
                      last_error: str) -> None:
        reason = (f"{count.consecutive_failures} failed attempts in a row since "
                  f"{count.failing_since.isoformat() if count.failing_since else '?'}; "
                  f"last: {last_error}")[:500]
        async with self.db.acquire() as connection, connection.transaction():
            failed = await store.disable(connection, delivery.workspace_id,
                                         delivery.endpoint_id, reason)
            if failed < 0:
                return  # another worker disabled it first
            await record_disabled(connection, delivery.workspace_id, delivery.endpoint_id,
                                  url, reason, failed)
        self.metrics.webhook_endpoints_disabled.inc()
        log.warning("webhooks.endpoint_disabled", workspace_id=delivery.workspace_id,
                    endpoint_id=delivery.endpoint_id, reason=reason,
                    failures=count.consecutive_failures, deliveries_failed=failed,
                    event_type=DISABLED_EVENT)

