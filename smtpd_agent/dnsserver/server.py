"""The DNS server's sockets, zone cache and rate limit: a Service of `serve` and `dns-serve`.

Safe on the open internet: authoritative only (REFUSED outside our zones, RA
never set), answers bigger than the client's UDP size are truncated (TC) so
the client retries over TCP, a per-source token bucket drops UDP floods (a
spoofed source must not make us an amplifier), malformed packets and
responses are dropped silently, and a database error is SERVFAIL, never a
crash. Zones are read from Postgres on demand and cached; a change to a
domain or a DKIM key is announced by Postgres (LISTEN/NOTIFY, migration 0007)
and drops the cached zone at once, and `dns_server.cache_ttl` bounds the rest
(settings such as the MX hosts, a lost listener). Each load recomputes the
zone's hash and bumps the SOA serial when the content changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import structlog

from ..config import Settings, parse_listen
from ..domains import open_key_store
from ..domains.records import delegated_zone_records
from ..runtime import Runtime
from ..store import domains as store
from .zone import Zone, build_zone, find_origin, respond, soa_for, to_wire, udp_limit, zone_hash

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "smtpd_agent_zones"  # migration 0007's triggers
RELISTEN_DELAY = 5.0
MAX_CACHED_ZONES = 10_000
MAX_SOURCES = 65_536
MAX_INFLIGHT = 1_000  # UDP queries being answered at once; beyond, dropped
TCP_MAX_MESSAGE = 65_535


class RateLimiter:
    """Token bucket per source address, in bounded memory (least recently seen evicted)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, source: str) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, last = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return allowed


@dataclass
class _Cached:
    value: object
    expires: float


class ZoneCatalog:
    """Delegated zones from Postgres, cached `cache_ttl` seconds (0: read on every query)."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.settings = settings
        self.keys = open_key_store(pool, settings)
        self.ttl = settings.dns_server.cache_ttl
        self.clock = clock
        self._origins: _Cached | None = None
        self._zones: OrderedDict[dns.name.Name, _Cached] = OrderedDict()
        self._loading: dict[dns.name.Name, asyncio.Future[Zone | None]] = {}

    def invalidate(self, name: str) -> None:
        """Forget `name`'s zone and the zone list: the next query reads them again."""
        try:
            origin = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError):
            origin = None
        if origin is not None:
            self._zones.pop(origin, None)
        self._origins = None

    def invalidate_all(self) -> None:
        self._zones.clear()
        self._origins = None

    async def origins(self) -> frozenset[dns.name.Name]:
        now = self.clock()
        if self._origins is None or self._origins.expires <= now:
            names = await store.delegated_zone_names(self.pool)
            self._origins = _Cached(frozenset(dns.name.from_text(n) for n in names),
                                    now + self.ttl)
        return self._origins.value  # type: ignore[return-value]

    async def zone_for(self, qname: dns.name.Name) -> Zone | None:
        origin = find_origin(qname, await self.origins())
        if origin is None:
            return None
        cached = self._zones.get(origin)
        if cached is not None and cached.expires > self.clock():
            return cached.value  # type: ignore[return-value]
        # one load per zone at a time: a burst of queries must not become a burst of SELECTs
        loading = self._loading.get(origin)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[Zone | None] = asyncio.get_running_loop().create_future()
        self._loading[origin] = future
        try:
            zone = await self.load(origin.to_text(omit_final_dot=True))
            future.set_result(zone)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: the waiters get it, no "never retrieved" warning
            raise
        finally:
            del self._loading[origin]
        self._zones[origin] = _Cached(zone, self.clock() + self.ttl)
        self._zones.move_to_end(origin)
        while len(self._zones) > MAX_CACHED_ZONES:
            self._zones.popitem(last=False)
        return zone

    async def load(self, name: str) -> Zone | None:
        domain = await store.find_domain(self.pool, name)
        if domain is None or not domain.delegated:
            return None
        keys = await self.keys.active_keys(domain.workspace_id, domain.name)
        records = delegated_zone_records(self.settings, domain.name, keys)
        serial = await store.bump_zone_serial(self.pool, domain, zone_hash(records))
        if serial != domain.zone_serial:
            log.info("dns.zone_changed", zone=domain.name, serial=serial,
                     workspace=domain.workspace_slug)
        return build_zone(domain.name, records, soa_for(self.settings, serial))


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        server = self.server
        if not server.limiter.allow(addr[0]):
            server.dropped += 1
            return
        if len(server.tasks) >= MAX_INFLIGHT:
            server.dropped += 1
            return
        task = asyncio.ensure_future(self._answer(data, addr))
        server.tasks.add(task)
        task.add_done_callback(server.tasks.discard)

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        wire = await self.server.answer(data, "udp")
        if wire is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable and such
        log.debug("dns.udp_error", error=str(exc))


class DnsServer:
    """A Service (app.SERVICES): UDP and TCP on `dns_server.listen`; off when it is empty."""

    def __init__(self, runtime: Runtime) -> None:
        self.settings = settings = runtime.settings
        self.database_url = runtime.database.url
        self.catalog = ZoneCatalog(runtime.pool, settings)
        self._listener: asyncpg.Connection | None = None
        self._relisten: asyncio.Task[None] | None = None
        config = settings.dns_server
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        self.payload = config.udp_payload
        self.tasks: set[asyncio.Future[None]] = set()
        self.dropped = 0
        self.port: int | None = None
        self.host: str | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tcp_connections = 0

    async def start(self) -> None:
        config = self.settings.dns_server
        if not config.listen:
            log.info("dns.disabled", reason="dns_server.listen is empty")
            return
        host, port = parse_listen(config.listen)
        loop = asyncio.get_running_loop()
        # UDP first; with port 0 the TCP listener takes the port UDP was given
        for _attempt in range(20):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(host, port))
            bound = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, host, bound,
                                                       reuse_address=True)
            except OSError:
                transport.close()
                if port:
                    raise
                continue
            self._udp = transport  # type: ignore[assignment]
            self.host, self.port = host, bound
            break
        else:  # pragma: no cover - twenty ports taken for TCP in a row
            raise OSError("no port free for both UDP and TCP")
        await self._listen()
        log.info("dns.listening", host=host, port=self.port,
                 zones=len(await self.catalog.origins()))

    async def _listen(self) -> None:
        """LISTEN for zone changes on a connection of its own (a pooled one would be reused).

        Without it (Postgres restarting) the cache TTL still bounds staleness; the listener
        is re-established in the background.
        """
        try:
            connection = await asyncpg.connect(
                self.database_url, timeout=self.settings.database.connect_timeout)
            await connection.add_listener(NOTIFY_CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError, TimeoutError) as error:
            log.warning("dns.listen_failed", error=str(error), retry_in=RELISTEN_DELAY)
            self._schedule_relisten()
            return
        connection.add_termination_listener(self._listener_lost)
        self._listener = connection
        self.catalog.invalidate_all()  # changes missed while not listening

    def _notified(self, connection: object, pid: int, channel: str, payload: str) -> None:
        self.catalog.invalidate(payload)

    def _listener_lost(self, connection: object) -> None:
        self._listener = None
        log.warning("dns.listen_lost", retry_in=RELISTEN_DELAY)
        self._schedule_relisten()

    def _schedule_relisten(self) -> None:
        async def again() -> None:
            await asyncio.sleep(RELISTEN_DELAY)
            self._relisten = None
            await self._listen()
        if self._relisten is None and (self._udp is not None or self._tcp is not None):
            self._relisten = asyncio.ensure_future(again())

    async def stop(self) -> None:
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relisten
            self._relisten = None
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.remove_termination_listener(self._listener_lost)
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await listener.close(timeout=5)
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._udp is not None or self._tcp is not None:
            log.info("dns.stopped", dropped=self.dropped)
        self._udp = self._tcp = None

    async def answer(self, data: bytes, transport: str) -> bytes | None:
        """Wire in, wire out; None: drop (malformed, or a response rather than a query)."""
        try:
            query = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - any parse failure: garbage in, nothing out
            self.dropped += 1
            return None
        if query.flags & dns.flags.QR:
            return None  # never answer an answer (no reflection loops)
        limit = udp_limit(query, self.payload) if transport == "udp" else TCP_MAX_MESSAGE
        try:
            zone = (await self.catalog.zone_for(query.question[0].name)
                    if len(query.question) == 1 else None)
            response = respond(query, zone, self.payload)
        except Exception as error:  # noqa: BLE001 - a database error answers SERVFAIL
            log.error("dns.servfail", error=str(error), error_type=type(error).__name__)
            response = dns.message.make_response(query, our_payload=self.payload)
            response.flags &= ~dns.flags.RA
            response.set_rcode(dns.rcode.SERVFAIL)
        try:
            return to_wire(query, response, limit)
        except Exception as error:  # noqa: BLE001  # pragma: no cover - cannot render
            log.error("dns.render_failed", error=str(error))
            return None

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """RFC 7766: length-prefixed messages, several per connection, idle timeout."""
        config = self.settings.dns_server
        if self._tcp_connections >= config.max_tcp_connections:
            writer.close()
            return
        self._tcp_connections += 1
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), config.tcp_timeout)
                (size,) = struct.unpack("!H", header)
                data = await asyncio.wait_for(reader.readexactly(size), config.tcp_timeout)
                wire = await self.answer(data, "tcp")
                if wire is None:
                    break
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
