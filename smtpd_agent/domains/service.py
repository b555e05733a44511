"""The periodic re-check inside `serve`: domains whose records break after setup get noticed.

Customers are told to keep the DNS records after verification; this service
holds them to it. Every `domains.recheck_interval` seconds each domain that
receives mail is checked exactly as `domain check` does; a broken record marks
it `degraded` and logs which record broke (`domain.degraded`, with the record
names), a passing check restores `verified`. Every host may run it: the
check is idempotent, so two hosts re-checking at once only cost DNS queries.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from ..runtime import Runtime
from ..store import domains as store
from . import Domains

log = structlog.get_logger(__name__)


class Periodic:
    """A Service running `run_once()` every `interval` seconds (0: off) until stopped."""

    name = "periodic"
    failure_event = "periodic.failed"

    def __init__(self, runtime: Runtime, interval: float) -> None:
        self.runtime = runtime
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.interval <= 0:
            log.info("service.disabled", service=self.name, reason="interval 0")
            return
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # one failed round must not end the loop
                log.error(self.failure_event, error=str(error))

    async def run_once(self) -> object:
        raise NotImplementedError


class DomainRechecker(Periodic):
    """Re-checks every receiving domain each `domains.recheck_interval` seconds."""

    name = "domain-recheck"
    failure_event = "domain.recheck_failed"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime, runtime.settings.domains.recheck_interval)

    async def run_once(self) -> list[store.Domain]:
        """Check every receiving domain once; returns them in their new state."""
        runtime = self.runtime
        domains = Domains.open(runtime.pool, runtime.settings, runtime.resolver)
        checked = []
        for domain in await store.verified_domains(runtime.pool):
            try:
                updated, _report = await domains.check(domain.name)
            except store.DirectoryError:  # removed meanwhile
                continue
            checked.append(updated)
        log.info("domain.recheck_done", domains=len(checked),
                 degraded=sum(d.state == "degraded" for d in checked))
        return checked


class KeyRotator(Periodic):
    """Every `domains.rotation_interval` seconds, one step of each DKIM rotation under way
    (`Domains.advance_rotations`): a new key DNS now serves starts signing, an old key past
    its grace period is retired. Idempotent, so every host may run it."""

    name = "dkim-rotation"
    failure_event = "dkim.rotation_step_failed"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime, runtime.settings.domains.rotation_interval)

    async def run_once(self) -> object:
        runtime = self.runtime
        return await Domains.open(runtime.pool, runtime.settings,
                                  runtime.resolver).advance_rotations()
