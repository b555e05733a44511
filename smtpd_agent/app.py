"""Wiring: settings -> database, router, pipeline, listener. No module-level singletons.

`serve()` runs the services until SIGTERM/SIGINT (graceful stop: the listener
closes, messages in transfer finish within `smtp.shutdown_grace`) and reloads
the live settings on SIGHUP (`config.LIVE_KEYS`: TLS certificates, SMTP limits
and policies, auth, scan, store) without dropping a session.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import structlog

from .agent.worker import AgentWorkers
from .config import ConfigError, Settings, SmtpSettings, apply_live, local_name_problem
from .dnsserver.server import DnsServer
from .domains.service import DomainRechecker, KeyRotator
from .events.retention import Pruner
from .hooks.worker import DeliveryWorker
from .http import HttpServer
from .mailbox.indexer import SearchIndexer
from .metrics import MetricsSpooler, spool_directory
from .outbound.bounces import BounceProcessor
from .outbound.worker import OutboundWorker
from .pipeline import Pipeline
from .runtime import Runtime
from .smtp.edge import Edge
from .smtp.handler import SessionHandler
from .smtp.limits import ClientRates, ConnectionLimits, CounterTable, DataBudget
from .smtp.server import AgentSMTP, Sessions, delivering
from .smtp.session import NativeSession
from .store import deployment
from .systemd import Notifier

log = structlog.get_logger("smtpd_agent.app")
T = TypeVar("T")


def build_tls_context(settings: SmtpSettings) -> ssl.SSLContext | None:
    """A server context with the configured chain, read from disk now (and again on reload)."""
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def certificate_summary(path: str) -> dict[str, str]:
    """The SHA-256 fingerprint of the first certificate in a PEM file, for the log: ops
    compare it with `openssl x509 -noout -fingerprint -sha256 -in FILE` after a renewal."""
    if not path:
        return {}
    try:
        text = Path(path).read_text()
        end = text.index(ssl.PEM_FOOTER) + len(ssl.PEM_FOOTER)
        der = ssl.PEM_cert_to_DER_cert(text[text.index(ssl.PEM_HEADER):end])
    except (OSError, ValueError):
        return {}
    return {"tls_cert_sha256": hashlib.sha256(der).hexdigest()}


class Service(Protocol):
    """A part of the process. It may also define `async reload(settings)` for SIGHUP."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def check_greeting_name(settings: Settings) -> None:
    """Warn when the name we announce (greeting, EHLO, Received) is a name like localhost;
    on port 25, where the internet's MTAs talk to us, refuse unless allowed."""
    name = settings.server.hostname
    problem = local_name_problem(name)
    if problem is None:
        return
    log.warning("server.hostname_not_public", hostname=name, problem=problem,
                fallback=name == socket.getfqdn(),
                hint="set server.hostname (SMTPD_AGENT_SERVER_HOSTNAME) to this host's "
                     "public name, the one its A/AAAA and PTR records give")
    if settings.smtp.port == 25 and not settings.server.allow_local_hostname:
        raise ConfigError(
            f"server.hostname is {name!r} ({problem}): a public MX on port 25 must greet with "
            "a name that resolves to it (RFC 5321 4.1.4). Set server.hostname, or set "
            "server.allow_local_hostname = true to start anyway.")


@dataclass(frozen=True)
class SessionParts:
    """What a new SMTP session is built from; replaced whole on reload, so a session
    keeps the parts (certificate, limits, policies) it started with."""

    settings: Settings
    handler: SessionHandler
    pipeline: Pipeline
    tls_context: ssl.SSLContext | None
    edge: Edge


class MailServer:
    """The SMTP listener with everything it needs; `start()` binds, `stop()` drains."""

    def __init__(self, runtime: Runtime, table: CounterTable | None = None) -> None:
        """`table`: the connection counts shared with the other accepting processes; the
        first process (table None) creates one with a row for each of smtp.processes."""
        self.runtime = runtime
        self.settings = settings = runtime.settings
        self.router = runtime.router
        self.limits = ConnectionLimits(settings.smtp.max_connections,
                                       settings.smtp.max_connections_per_ip,
                                       table or CounterTable.create(settings.smtp.processes))
        self.data_budget = DataBudget(settings.smtp.data_memory_budget)
        self.sessions = Sessions()
        self._server: asyncio.base_events.Server | None = None
        self._parts: SessionParts | None = None
        self.port: int | None = None

    def _build_parts(self, settings: Settings) -> SessionParts:
        """Everything new sessions need; raises (bad certificate, say) before anything changes.

        At start the listener shares the runtime's pipeline (the webhooks feed it too);
        a reload builds one for the new settings, for SMTP sessions only.
        """
        tls_context = build_tls_context(settings.smtp)
        pipeline = (self.runtime.pipeline if self._parts is None
                    else self.runtime.build_pipeline(settings))
        handler = SessionHandler(self.router, settings.smtp.max_recipients, self.runtime.metrics,
                                 acl=pipeline.acl)
        # Rates and bans live in the connection table, so a reload keeps them.
        edge = Edge(settings.edge, self.runtime.resolver,
                    ClientRates(self.limits.table, settings.edge), self.runtime.metrics)
        return SessionParts(settings, handler, pipeline, tls_context, edge)

    async def start(self) -> None:
        settings = self.settings
        check_greeting_name(settings)
        metrics = self.runtime.metrics
        self._parts = self._build_parts(settings)
        await self.runtime.changes.start()  # routing changes reach us before the first RCPT
        loop = asyncio.get_running_loop()
        metrics.sessions_active.set_function(lambda: len(self.sessions.active))

        def session() -> AgentSMTP | NativeSession:
            parts = self._parts
            assert parts is not None
            metrics.sessions.inc()
            # smtp.session: aiosmtpd's session machinery, or our own (smtp/session.py).
            layer = NativeSession if parts.settings.smtp.session == "native" else AgentSMTP
            return layer(parts.handler, settings=parts.settings.smtp, limits=self.limits,
                         deliver=delivering(parts.pipeline.process, metrics),
                         hostname=parts.settings.server.hostname, sessions=self.sessions,
                         tls_context=parts.tls_context, loop=loop, metrics=metrics,
                         data_budget=self.data_budget, edge=parts.edge)

        # With smtp.processes > 1 several processes accept on this port (SO_REUSEPORT).
        self._server = await loop.create_server(session, settings.smtp.host, settings.smtp.port,
                                                reuse_address=True,
                                                reuse_port=settings.smtp.processes > 1)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("server.listening", host=settings.smtp.host, port=self.port,
                 session=settings.smtp.session,
                 default_domain=settings.server.default_domain,
                 embedded_postgres=self.runtime.database.embedded is not None,
                 starttls=self._parts.tls_context is not None,
                 **certificate_summary(settings.smtp.tls_cert))

    async def reload(self, settings: Settings) -> None:
        """New sessions get `settings` (and certificates read afresh); open ones are untouched."""
        parts = self._build_parts(settings)
        self.limits.total = settings.smtp.max_connections
        self.limits.per_ip = settings.smtp.max_connections_per_ip
        self.data_budget.limit = settings.smtp.data_memory_budget
        self.settings = settings
        self._parts = parts
        log.info("server.reloaded", starttls=parts.tls_context is not None,
                 open_sessions=len(self.sessions.active),
                 **certificate_summary(settings.smtp.tls_cert))

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
    # Outgoing webhooks (webhooks.concurrency at once; 0: another process delivers).
    DeliveryWorker,
    # Full-text search, indexed after the COMMIT (store.search_batch; 0: elsewhere).
    SearchIndexer,
    # Deletes old events and finished webhook deliveries (retention.*; one node at a time).
    Pruner.of,
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
        self.runtime = await Runtime.open(self.settings, bounces=BounceProcessor)
        try:
            # The deployment's identity: recorded by the first server, the same for the rest.
            await deployment.claim(self.runtime.pool, self.settings.server.default_domain,
                                   self.settings.server.hostname,
                                   where="this server is configured with default domain")
            for factory in self.factories:
                service = factory(self.runtime)
                await service.start()
                self.services.append(service)
        except BaseException:
            await self.stop()
            raise
        # Everything built so far (modules, SDK and pydantic models, settings) lives as
        # long as the process: keep it out of the collector's full scans, whose pauses
        # showed as the p99 latency of the benchmark.
        gc.freeze()

    async def stop(self) -> None:
        while self.services:
            await self.services.pop().stop()
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None

    async def reload(self, new: Settings) -> bool:
        """Apply the live keys of `new` to every service that can reload; False if refused.

        The merged settings are validated before any service sees them, and each service
        builds its new state before swapping it in: a bad file or an unreadable
        certificate leaves the server running exactly as it was.
        """
        try:
            settings, restart_needed = apply_live(self.settings, new)
            if restart_needed:
                log.warning("config.restart_needed", keys=restart_needed)
            reloading = [s for s in self.services if callable(getattr(s, "reload", None))]
            for service in reloading:
                await service.reload(settings)  # type: ignore[attr-defined]
        except (ConfigError, OSError, ssl.SSLError) as error:
            log.error("config.reload_failed", error=str(error))
            return False
        except Exception as error:  # a reload must never take the mail server down
            log.exception("config.reload_failed", error=f"{type(error).__name__}: {error}")
            return False
        self.settings = settings
        if self.runtime is not None:
            self.runtime.settings = settings
        log.info("config.reloaded")
        return True


# What `serve --listener-only` runs: the extra processes of smtp.processes.
def metrics_spooler(runtime: Runtime) -> Service:
    return MetricsSpooler(runtime.metrics, runtime.settings.server.state_dir)


LISTENER_SERVICES: list[Callable[[Runtime], Service]] = [MailServer, metrics_spooler]


def listener_services(table: CounterTable | None) -> list[Callable[[Runtime], Service]]:
    """LISTENER_SERVICES, the mail server counting connections in the parent's `table`."""
    return [lambda runtime: MailServer(runtime, table), metrics_spooler]


class ListenerProcesses:
    """The smtp.processes - 1 extra accepting processes beside this one.

    Each is `smtpd-agent serve --listener-only` started with our command-line flags
    (`listener_args`: --config, --state-dir, ...) and our bound port, and our own
    environment unchanged: it reads the same file, environment and flags as we did, and
    on SIGHUP re-reads them the same way, so a reload reaches every process. No setting
    is handed over in the environment (secrets would show in /proc/<pid>/environ, and
    an environment value would win over the reloaded file). They share the port through
    SO_REUSEPORT and Postgres through their own pools, and keep no state of their own.
    """

    def __init__(self, settings: Settings, port: int | None,
                 listener_args: Sequence[str] = (), table: CounterTable | None = None) -> None:
        self.settings = settings
        self.port = port
        self.listener_args = list(listener_args)
        self.table = table  # shared connection counts: child k writes row k
        self.children: list[subprocess.Popen[bytes]] = []

    def command(self) -> list[str]:
        return [sys.executable, "-m", "smtpd_agent", "serve", "--listener-only",
                *self.listener_args, "--port", str(self.port)]

    async def start(self) -> None:
        for stale in spool_directory(self.settings.server.state_dir).glob("*.prom"):
            stale.unlink(missing_ok=True)  # a previous run's processes
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # readiness is the parent's to report to systemd
        for slot in range(1, self.settings.smtp.processes):
            command = self.command()
            fds: tuple[int, ...] = ()
            if self.table is not None and self.table.fd >= 0:
                command.append(f"--connection-table={self.table.fd}:{slot}")
                fds = (self.table.fd,)
            self.children.append(subprocess.Popen(command, env=env, pass_fds=fds))
        log.info("server.listener_processes", pids=[c.pid for c in self.children])

    def signal(self, signum: signal.Signals) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    async def stop(self) -> None:
        self.signal(signal.SIGTERM)
        grace = self.settings.smtp.shutdown_grace + 10
        for child in self.children:
            try:
                await asyncio.to_thread(child.wait, grace)
            except subprocess.TimeoutExpired:
                child.kill()


def bound_ports(app: App) -> dict[str, int]:
    """The port each listener of `app` bound, by name: a configured port 0 binds a free one,
    so this line is where an operator (or a test) learns where to connect."""
    ports: dict[str, int] = {}
    for name, kind in (("smtp_port", MailServer), ("http_port", HttpServer),
                       ("dns_port", DnsServer)):
        for service in app.services:
            if isinstance(service, kind) and service.port is not None:
                ports[name] = service.port
    return ports


async def serve(settings: Settings,
                factories: list[Callable[[Runtime], Service]] | None = None, *,
                reload: Callable[[], Settings] | None = None,
                notifier: Notifier | None = None,
                listener_args: Sequence[str] = ()) -> None:
    """Run `factories` (default SERVICES) until SIGTERM/SIGINT; on SIGHUP call `reload()`
    for fresh settings and apply them. `listener_args`: the flags (not the port) the
    smtp.processes extra listeners are started with, so they read what we read."""
    notifier = notifier or Notifier()
    app = App(settings, factories)
    await app.start()
    listeners = (ListenerProcesses(settings, app.service(MailServer).port, listener_args,
                                   app.service(MailServer).limits.table)
                 if factories is None and settings.smtp.processes > 1 else None)
    if listeners:
        await listeners.start()
        if app.runtime is not None:
            app.runtime.metrics.spool = spool_directory(settings.server.state_dir)
    # Handlers before READY=1 and the ready line: a reload asked for the moment systemd
    # (or a test) hears we are ready must be queued, not take the default action (exit).
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    log.info("server.ready", **bound_ports(app))
    notifier.ready(status="accepting mail")
    try:
        while (signum := await signals.get()) == signal.SIGHUP:
            notifier.reloading()
            log.info("config.reloading")
            try:
                fresh = reload() if reload else settings
            except ConfigError as error:
                log.error("config.reload_failed", error=str(error))
            else:
                await app.reload(fresh)
            if listeners:
                listeners.signal(signal.SIGHUP)
            notifier.ready(status="accepting mail")
    finally:
        notifier.stopping()
        log.info("server.stopping")
        if listeners:
            await listeners.stop()
        await app.stop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
