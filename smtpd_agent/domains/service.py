"""The periodic re-check inside `serve`: domains whose records break after setup get noticed.

Customers are told to keep the DNS records after verification; this service
holds them to it. Every `domains.recheck_interval` seconds each domain that
receives mail is checked exactly as `domain check` does; a broken record marks
it `degraded` and logs which record broke (`domain.degraded`, with the record
names), a passing check restores `verified`. Every host may run it: the
check is idempotent, so two hosts re-checking at once only cost DNS queries.
"""

from __future__ import annotations


import structlog

from ..periodic import Periodic
from ..runtime import Runtime
from ..store import domains as store
from . import Domains

log = structlog.get_logger(__name__)


class DomainRechecker(Periodic):
    """Re-checks every receiving domain each `domains.recheck_interval` seconds."""

    name = "domain-recheck"
    failure_event = "domain.recheck_failed"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime.settings.domains.recheck_interval)
        self.runtime = runtime

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
        super().__init__(runtime.settings.domains.rotation_interval)
        self.runtime = runtime

    async def run_once(self) -> object:
        runtime = self.runtime
        return await Domains.open(runtime.pool, runtime.settings,
                                  runtime.resolver).advance_rotations()
