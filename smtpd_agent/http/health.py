"""Liveness and readiness: may this process take traffic?

`/health` answers while the event loop runs. `/health/ready` names each check:
Postgres reachable, migrations current, and clamd answering PING when
scanning is configured and required (when not required, clamd is reported
but does not make the process unready: mail is then stored 'unscanned');
rspamd answering /ping likewise, by `spam.required`.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

import asyncpg
import structlog
from aiohttp import web

from ..config import Settings
from ..scan import Scanner
from ..spam import SpamFilter
from ..store.database import pending_migrations, pending_repeatables
from .responses import json_response

log = structlog.get_logger(__name__)

# A readiness probe must answer well inside an orchestrator's probe timeout.
CHECK_TIMEOUT = 2.0


@dataclass(frozen=True)
class Check:
    ok: bool
    required: bool = True
    detail: str = ""


class Health:
    def __init__(self, db: asyncpg.Pool, settings: Settings, scanner: Scanner | None,
                 spam_filter: SpamFilter | None = None) -> None:
        self.db = db
        self.settings = settings
        self.scanner = scanner
        self.spam_filter = spam_filter

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        (postgres, migrations), clamd, rspamd = await asyncio.gather(
            self._database(), self._clamd(), self._rspamd())
        checks = {"postgres": postgres, "migrations": migrations, "clamd": clamd,
                  "rspamd": rspamd}
        ready = all(c.ok for c in checks.values() if c.required)
        if not ready:
            log.warning("http.not_ready", failing=[n for n, c in checks.items()
                                                   if c.required and not c.ok])
        return json_response({"ready": ready,
                              "checks": {name: asdict(c) for name, c in checks.items()}},
                             status=200 if ready else 503)

    async def _database(self) -> tuple[Check, Check]:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                async with self.db.acquire() as connection:
                    await connection.fetchval("SELECT 1")
                    pending = (await pending_migrations(connection)
                               + await pending_repeatables(connection))
        # Any failure means not ready; the detail says which.
        except Exception as error:  # noqa: BLE001
            detail = f"{type(error).__name__}: {error}"[:200]
            return Check(False, detail=detail), Check(False, detail="postgres unreachable")
        if pending:
            return Check(True), Check(False, detail="pending: " + ", ".join(pending))
        return Check(True), Check(True)

    async def _clamd(self) -> Check:
        if self.scanner is None:
            return Check(True, required=False, detail="scanning not configured")
        required = self.settings.scan.required
        health = await self.scanner.health(CHECK_TIMEOUT)
        if health.ready:
            return Check(True, required=required)
        return Check(False, required=required, detail=f"{health.problem}: {health.detail}")

    async def _rspamd(self) -> Check:
        if self.spam_filter is None:
            return Check(True, required=False, detail="spam scoring not configured")
        required = self.settings.spam.required
        if await self.spam_filter.health(CHECK_TIMEOUT):
            return Check(True, required=required)
        return Check(False, required=required, detail="no answer to /ping")
