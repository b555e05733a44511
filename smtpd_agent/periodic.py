"""The base of the services that run one pass every so many seconds inside `serve`:
the domain re-check, the DKIM rotation step, the retention pruner."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

log = structlog.get_logger(__name__)


class Periodic:
    """A Service running `run_once()` every `interval` seconds (0: off) until stopped.

    A failed pass is reported by `failed()` and the next one runs on schedule. A pass that
    works in steps can end early once `stopping` is set, or wait between steps with
    `pause()`, which returns True when the service is stopping."""

    name = "periodic"
    failure_event = "periodic.failed"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.interval <= 0:
            log.info("service.disabled", service=self.name, reason="interval 0")
            return
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        self.stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def pause(self, seconds: float) -> bool:
        """Sleep `seconds`; True when the service is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    async def _loop(self) -> None:
        while not await self.pause(self.interval):
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - one failed pass must not end the loop
                self.failed(error)

    def failed(self, error: Exception) -> None:
        log.error(self.failure_event, error=str(error))

    async def run_once(self) -> object:
        raise NotImplementedError
