"""Wiring: settings -> database, router, pipeline, listener. No module-level singletons."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import asyncpg
import structlog

from .agent.worker import AgentWorkers
from .config import Settings, SmtpSettings
from .dns import Resolver
from .dnsserver.server import DnsServer
from .domains.service import DomainRechecker, KeyRotator
from .http import HttpServer
from .metrics import Metrics
from .outbound.worker import OutboundWorker
from .pipeline import Pipeline
from .routing import Router
from .scan import Scanner, limit_problems
from .smtp.handler import SessionHandler
from .smtp.server import AgentSMTP, ConnectionLimits, Sessions
from .store.database import EmbeddedPostgres, create_pool, migrate, resolve_database_url

log = structlog.get_logger("smtpd_agent.app")
T = TypeVar("T")


def build_tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


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
        try:
            pool = await create_pool(url, settings.database)
            if run_migrations:
                async with pool.acquire() as connection:
                    await migrate(connection)
        except BaseException:
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
    _pipeline: Pipeline | None = field(default=None, repr=False)

    @property
    def pool(self) -> asyncpg.Pool:
        return self.database.pool

    @property
    def scanner(self) -> Scanner | None:
        return self.pipeline.scanner

    @property
    def pipeline(self) -> Pipeline:
        """The one pipeline every way in (SMTP, provider webhooks) feeds; built on first use."""
        if self._pipeline is None:
            settings = self.settings
            scanner = Scanner(settings.scan) if settings.scan.clamd else None
            if scanner is None:
                log.warning("scan.disabled", reason="scan.clamd is not set: attachments are "
                            "stored with scan status 'unscanned'")
            for problem in limit_problems(settings):
                log.warning("scan.limits", problem=problem)
            self._pipeline = Pipeline(self.pool, settings, self.resolver, scanner, self.metrics)
        return self._pipeline

    @classmethod
    async def open(cls, settings: Settings) -> Runtime:
        database = await Database.open(settings)
        return cls(settings, database, Resolver(settings.dns))

    async def close(self) -> None:
        await self.database.close()


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class MailServer:
    """The SMTP listener with everything it needs; `start()` binds, `stop()` drains."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = settings = runtime.settings
        self.router = Router(runtime.pool, settings.server.default_domain,
                             settings.routing.cache_ttl,
                             bounce_label=settings.domains.default_mail_from_label,
                             custom_bounce_label=settings.domains.mail_from_label,
                             verp_prefix=settings.outbound.verp_prefix)
        self.limits = ConnectionLimits(settings.smtp.max_connections,
                                       settings.smtp.max_connections_per_ip)
        self.sessions = Sessions()
        self._server: asyncio.base_events.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        settings = self.settings
        metrics = self.runtime.metrics
        pipeline = self.runtime.pipeline
        handler = SessionHandler(self.router, settings.smtp.max_recipients, metrics)
        tls_context = build_tls_context(settings.smtp)
        loop = asyncio.get_running_loop()
        metrics.sessions_active.set_function(lambda: len(self.sessions.active))

        def session() -> AgentSMTP:
            metrics.sessions.inc()
            return AgentSMTP(handler, settings=settings.smtp, limits=self.limits,
                             deliver=pipeline.receive, hostname=settings.server.hostname,
                             sessions=self.sessions, tls_context=tls_context, loop=loop,
                             metrics=metrics)

        self._server = await loop.create_server(session, settings.smtp.host, settings.smtp.port,
                                                reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("server.listening", host=settings.smtp.host, port=self.port,
                 default_domain=settings.server.default_domain,
                 embedded_postgres=self.runtime.database.embedded is not None,
                 starttls=tls_context is not None)

    async def stop(self) -> None:
        """Stop accepting, let messages in transfer finish (bounded)."""
        if self._server is not None:
            self._server.close()
            await self.sessions.drain(self.settings.smtp.shutdown_grace)
        log.info("server.stopped")


# The services `serve` runs, in start order (stopped in reverse). Each is built from the
# shared Runtime; later stages (agent workers, HTTP) add themselves here.
SERVICES: list[Callable[[Runtime], Service]] = [
    MailServer,
    # Reply workers (agent.workers of them; 0: run `smtpd-agent worker` elsewhere).
    AgentWorkers,
    DomainRechecker,
    KeyRotator,
    DnsServer,  # off unless dns_server.listen is set
    HttpServer,
    OutboundWorker,
]
# `smtpd-agent dns-serve`: the authoritative DNS server alone
DNS_SERVICES: list[Callable[[Runtime], Service]] = [DnsServer]


class App:
    """One process: the runtime and every service, started and stopped together."""

    def __init__(self, settings: Settings,
                 factories: list[Callable[[Runtime], Service]] | None = None) -> None:
        self.settings = settings
        self.factories = SERVICES if factories is None else factories
        self.runtime: Runtime | None = None
        self.services: list[Service] = []

    def service(self, kind: type[T]) -> T:
        return next(s for s in self.services if isinstance(s, kind))

    async def start(self) -> None:
        self.runtime = await Runtime.open(self.settings)
        try:
            for factory in self.factories:
                service = factory(self.runtime)
                await service.start()
                self.services.append(service)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        while self.services:
            await self.services.pop().stop()
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None


async def serve(settings: Settings,
                factories: list[Callable[[Runtime], Service]] | None = None) -> None:
    app = App(settings, factories)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("server.stopping")
        await app.stop()
