"""Where the synchronous checks (pyspf, dkimpy) run: the one place that decides.

Place: the standards layer, used by the authenticate stage for SPF, DKIM and ARC
alike. A check first runs on the event loop from cached DNS answers only, when
its input is small enough (a thread hop costs more than a cached check). What
the cache cannot answer runs in a thread pool of its kind, under a deadline:

- "dns": pyspf, which mostly waits for DNS; many threads, little CPU.
- "verify": dkimpy (DKIM, ARC), CPU-bound (hashing, RSA); one thread per core
  by default, so hostile signatures cannot take every core, and in a pool of
  its own, so they cannot starve SPF of threads either.

A check whose deadline passes is abandoned: a queued one never starts, a
running one stops at its next checkpoint or DNS lookup (dns.SyncResolver).
Both pools are bounded; `close()` (the runtime's, at stop) abandons everything
still running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Generic, Literal, TypeVar

from ..dns import Abandoned, Resolver, SyncResolver

T = TypeVar("T")
Pool = Literal["dns", "verify"]

# Inputs above this size are not checked on the event loop even when every key is
# cached: canonicalization is Python, linear in size (about 0.25 ms for 5 KB).
INLINE_MAX = 64 * 1024
DEFAULT_DNS_WORKERS = 16
DEFAULT_VERIFY_WORKERS = 2


@dataclass(frozen=True)
class SyncCheck(Generic[T]):
    """A blocking check of a library, as a function of a resolver view."""

    run: Callable[[SyncResolver], T]
    pool: Pool
    inline: bool = True  # small enough to run on the loop when the cache answers


class CheckRunner:
    """Two bounded thread pools and the cached / in-a-thread decision; one per process."""

    def __init__(self, dns_workers: int = DEFAULT_DNS_WORKERS,
                 verify_workers: int = DEFAULT_VERIFY_WORKERS) -> None:
        self._pools: dict[Pool, concurrent.futures.ThreadPoolExecutor] = {
            "dns": concurrent.futures.ThreadPoolExecutor(
                max(1, dns_workers), thread_name_prefix="auth-dns"),
            "verify": concurrent.futures.ThreadPoolExecutor(
                max(1, verify_workers), thread_name_prefix="auth-verify"),
        }
        self._running: set[SyncResolver] = set()

    @staticmethod
    def now(resolver: Resolver, check: SyncCheck[T]) -> T | None:
        """The verdict right now on this thread from cached DNS, or None."""
        return resolver.from_cache(check.run) if check.inline else None

    async def later(self, resolver: Resolver, check: SyncCheck[T], deadline: float) -> T | None:
        """The full way in the check's pool; None when it missed `deadline` (abandoned)."""
        def tracked(view: SyncResolver) -> T:
            self._running.add(view)
            try:
                return check.run(view)
            finally:
                self._running.discard(view)

        try:
            async with asyncio.timeout(deadline):
                return await resolver.in_thread(tracked, self._pools[check.pool])
        except (TimeoutError, Abandoned):
            return None

    async def run(self, resolver: Resolver, check: SyncCheck[T], deadline: float) -> T | None:
        found = self.now(resolver, check)
        return found if found is not None else await self.later(resolver, check, deadline)

    async def run_all(self, resolver: Resolver, checks: Sequence[SyncCheck[Any]],
                      deadline: float) -> list[Any | None]:
        """Each check from the cache when it can; the rest concurrently, each in time.
        With everything cached, nothing here waits for the event loop."""
        results = [self.now(resolver, check) for check in checks]
        missing = [index for index, result in enumerate(results) if result is None]
        if missing:
            later = await asyncio.gather(
                *(self.later(resolver, checks[index], deadline) for index in missing))
            for index, result in zip(missing, later):
                results[index] = result
        return results

    def close(self) -> None:
        """Queued checks are dropped and running ones abandoned: they stop at their next
        checkpoint, so a stopping process does not wait for hostile work to finish."""
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        for view in list(self._running):
            view.abandon()


@contextlib.asynccontextmanager
async def own_runner(runner: CheckRunner | None) -> AsyncIterator[CheckRunner]:
    """`runner`, or for a one-off caller (a test, a tool) a runner of its own, closed after."""
    if runner is not None:
        yield runner
        return
    own = CheckRunner()
    try:
        yield own
    finally:
        own.close()
