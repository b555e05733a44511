"""The DNS server's sockets, zone cache and limits: a Service of `serve` and `dns-serve`.

Safe on the open internet: authoritative only (REFUSED outside our zones, RA
never set), answers bigger than the client's UDP size are truncated (TC) so
the client retries over TCP, a per-source token bucket drops UDP floods (a
spoofed source must not make us an amplifier), TCP connections are capped per
source as well as in total (one host must not hold every slot), malformed
packets and responses are dropped silently. A source is an IPv4 address or an
IPv6 /64 (one host usually holds a whole /64).

Zones are read from Postgres on demand and cached; a change to a domain or a
DKIM key is announced by Postgres (LISTEN/NOTIFY on the runtime's ChangeFeed,
migrations 0007 and 0011) and expires the cached zone at once, and
`dns_server.cache_ttl` bounds the rest (settings such as the MX hosts, a lost
listener). Each load recomputes the zone's hash and bumps the SOA serial when
the content changed. While Postgres fails, the last good copy of a zone keeps
being served (RFC 8767 serve-stale, `dns_server.max_stale`, with
`dns_server.stale_ttl`); only a zone never loaded is SERVFAIL.

A delegated zone not yet verified serves its SOA, NS and glue only: what
`domain check` needs to see the delegation. Its MX, SPF and DKIM keys appear
once the domain is verified, and verification needs the ownership record in the
parent zone (domains/records.py), which we never serve.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import asyncpg
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import structlog

from ..config import Settings, parse_listen
from ..domains import open_key_store
from ..domains.records import DnsRecord, delegated_zone_records
from ..runtime import Runtime
from ..store import domains as store
from ..store.changes import ZONES_CHANNEL, ChangeFeed, Subscription
from .zone import Zone, build_zone, find_origin, respond, soa_for, to_wire, udp_limit, zone_hash

log = structlog.get_logger(__name__)

MAX_CACHED_ZONES = 10_000
MAX_SOURCES = 65_536
MAX_INFLIGHT = 1_000  # UDP queries being answered at once; beyond, dropped
TCP_MAX_MESSAGE = 65_535
# RFC 8767 5: answer from the stale copy when Postgres has not answered in this many
# seconds (a resolver gives up after 2-3), and after a failed load do not ask again
# for this long (every query would wait for the same dead database otherwise).
STALE_ANSWER_AFTER = 1.5
FAILURE_RECHECK = 5.0
# What a delegated zone serves before it is verified: enough for `domain check`.
UNVERIFIED_PURPOSES = frozenset({"delegation", "glue"})
V = TypeVar("V")


def source_key(address: str) -> str:
    """The unit of per-source limits: an IPv4 address, or the /64 of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.IPv6Network((ip, 64), strict=False).network_address}/64"
    return str(ip)


class RateLimiter:
    """Token bucket per source, in bounded memory (least recently seen evicted)."""

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


class ConnectionSlots:
    """TCP connections open at once: at most `total`, at most `per_source` from one source."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self.open: dict[str, int] = {}
        self.count = 0

    def acquire(self, source: str) -> str | None:
        """None when taken, else why not ("total" or "per_source")."""
        if self.count >= self.total:
            return "total"
        if self.per_source > 0 and self.open.get(source, 0) >= self.per_source:
            return "per_source"
        self.open[source] = self.open.get(source, 0) + 1
        self.count += 1
        return None

    def release(self, source: str) -> None:
        self.count -= 1
        left = self.open.get(source, 1) - 1
        if left > 0:
            self.open[source] = left
        else:
            self.open.pop(source, None)


@dataclass
class _Cached(Generic[V]):
    value: V
    fresh_until: float
    # past fresh_until, servable while Postgres fails (serve-stale) until this
    stale_until: float
    # after a failed refresh: answer from the stale copy without asking again until this
    retry_at: float = float("-inf")
    stale_value: V | None = None


class ZoneCatalog:
    """Delegated zones from Postgres, cached `cache_ttl` seconds (0: read on every query),
    the last good copy served while Postgres fails."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.settings = settings
        self.keys = open_key_store(pool, settings)
        self.ttl = settings.dns_server.cache_ttl
        self.max_stale = settings.dns_server.max_stale
        self.stale_ttl = settings.dns_server.stale_ttl
        self.clock = clock
        self.stale_answers = 0
        self._origins: _Cached[frozenset[dns.name.Name]] | None = None
        self._zones: OrderedDict[dns.name.Name, _Cached[Zone | None]] = OrderedDict()
        self._loading: dict[object, asyncio.Future[Any]] = {}
        self._generation = 0

    def invalidate(self, name: str) -> None:
        """`name`'s zone and the zone list changed: read them again on the next query
        (the old copies stay for serve-stale)."""
        self._generation += 1
        try:
            origin = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError):
            origin = None
        if origin is not None and origin in self._zones:
            self._zones[origin].fresh_until = float("-inf")
        if self._origins is not None:
            self._origins.fresh_until = float("-inf")

    def invalidate_all(self) -> None:
        self._generation += 1
        for cached in (self._origins, *self._zones.values()):
            if cached is not None:
                cached.fresh_until = float("-inf")

    async def origins(self) -> frozenset[dns.name.Name]:
        async def load() -> frozenset[dns.name.Name]:
            names = await store.delegated_zone_names(self.pool)
            return frozenset(dns.name.from_text(n) for n in names)

        def store_origins(cached: _Cached[frozenset[dns.name.Name]]) -> None:
            self._origins = cached
        return await self._cached("origins", self._origins, load, store_origins, "(zones)")

    async def zone_for(self, qname: dns.name.Name) -> Zone | None:
        origin = find_origin(qname, await self.origins())
        if origin is None:
            return None

        def store_zone(cached: _Cached[Zone | None]) -> None:
            self._zones[origin] = cached
            self._zones.move_to_end(origin)
            while len(self._zones) > MAX_CACHED_ZONES:
                self._zones.popitem(last=False)
        return await self._cached(origin, self._zones.get(origin),
                                  lambda: self.load(origin.to_text(omit_final_dot=True)),
                                  store_zone, origin.to_text(omit_final_dot=True))

    async def _cached(self, key: object, cached: _Cached[V] | None,
                      load: Callable[[], Awaitable[V]], remember: Callable[[_Cached[V]], None],
                      name: str) -> V:
        """The fresh copy; else one load at a time per key (a burst of queries must not
        become a burst of SELECTs); the stale copy when that load fails or is slow."""
        now = self.clock()
        if cached is not None and cached.fresh_until > now:
            return cached.value
        stale = cached is not None and cached.stale_until > now
        if stale and cached is not None and cached.retry_at > now:
            return self._stale(cached)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._refresh(cached, load, remember, name))
            self._loading[key] = task
            task.add_done_callback(lambda done: (self._loading.pop(key, None),
                                                 done.cancelled() or done.exception()))
        if not stale or cached is None:
            return cast(V, await asyncio.shield(task))
        try:
            return cast(V, await asyncio.wait_for(asyncio.shield(task), STALE_ANSWER_AFTER))
        except Exception as error:  # noqa: BLE001 - the failure is logged by _refresh
            if isinstance(error, TimeoutError):
                log.warning("dns.serve_stale", zone=name, reason="postgres slow")
            return self._stale(cached)

    async def _refresh(self, cached: _Cached[V] | None,
                       load: Callable[[], Awaitable[V]], remember: Callable[[_Cached[V]], None],
                       name: str) -> V:
        generation = self._generation
        try:
            value = await load()
        except Exception as error:
            now = self.clock()
            serving = cached is not None and cached.stale_until > now
            if cached is not None:
                cached.retry_at = now + FAILURE_RECHECK
            log.error("dns.load_failed", zone=name, error=str(error),
                      error_type=type(error).__name__, serving_stale=serving)
            raise
        now = self.clock()
        # a change announced while we read: the rows may predate it, keep it expired
        fresh = now + self.ttl if generation == self._generation else now
        remember(_Cached(value, fresh, fresh + self.max_stale))
        return value

    def _stale(self, cached: _Cached[V]) -> V:
        self.stale_answers += 1
        if cached.stale_value is None:
            value: Any = cached.value
            cached.stale_value = cast(V, value.capped(self.stale_ttl) if isinstance(value, Zone)
                                      else value)
        return cast(V, cached.stale_value)

    async def load(self, name: str) -> Zone | None:
        domain = await store.find_domain(self.pool, name)
        if domain is None or not domain.delegated:
            return None
        keys = await self.keys.active_keys(domain.workspace_id, domain.name) \
            if domain.receives else []
        records = served_records(delegated_zone_records(self.settings, domain.name, keys),
                                 verified=domain.receives)
        serial = await store.bump_zone_serial(self.pool, domain, zone_hash(records))
        if serial != domain.zone_serial:
            log.info("dns.zone_changed", zone=domain.name, serial=serial,
                     workspace=domain.workspace_slug, verified=domain.receives)
        return build_zone(domain.name, records, soa_for(self.settings, serial))


def served_records(records: tuple[DnsRecord, ...], verified: bool) -> tuple[DnsRecord, ...]:
    """What we answer for a zone: all of it once verified, else only the delegation;
    never an ownership record (that proof must come from the parent zone, not from us)."""
    return tuple(r for r in records if r.purpose != "ownership"
                 and (verified or r.purpose in UNVERIFIED_PURPOSES))


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        server = self.server
        if not server.limiter.allow(source_key(addr[0])):
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
        self.catalog = ZoneCatalog(runtime.pool, settings)
        self.changes: ChangeFeed = runtime.changes
        self._subscription: Subscription | None = None
        config = settings.dns_server
        self.limiter = RateLimiter(config.rate_limit, config.rate_burst)
        self.slots = ConnectionSlots(config.max_tcp_connections,
                                     config.max_tcp_connections_per_source)
        self.payload = config.udp_payload
        self.tasks: set[asyncio.Future[None]] = set()
        self.dropped = 0
        self.tcp_refused = 0
        self.port: int | None = None
        self.host: str | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        config = self.settings.dns_server
        if not config.listen:
            log.info("dns.disabled", reason="dns_server.listen is empty")
            return
        # changes reach the cache from the first query on (ChangeFeed resets it on connect)
        self._subscription = self.changes.subscribe(ZONES_CHANNEL, self.catalog.invalidate,
                                                    self.catalog.invalidate_all)
        await self.changes.start()
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
        log.info("dns.listening", host=host, port=self.port,
                 zones=len(await self.catalog.origins()))

    async def stop(self) -> None:
        if self._subscription is not None:
            self.changes.unsubscribe(self._subscription)
            self._subscription = None
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
            log.info("dns.stopped", dropped=self.dropped, tcp_refused=self.tcp_refused,
                     stale_answers=self.catalog.stale_answers)
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
        """RFC 7766: length-prefixed messages, several per connection, idle timeout;
        slots capped in total and per source (RFC 7766 6.2.2: no one client may hog them)."""
        config = self.settings.dns_server
        peer = writer.get_extra_info("peername")
        source = source_key(peer[0] if isinstance(peer, tuple) and peer else "unknown")
        refused = self.slots.acquire(source)
        if refused is not None:
            self.tcp_refused += 1
            log.debug("dns.tcp_refused", source=source, limit=refused)
            writer.close()
            return
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), config.tcp_timeout)
                (size,) = struct.unpack("!H", header)
                data = await asyncio.wait_for(reader.readexactly(size), config.tcp_timeout)
                wire = await self.answer(data, "tcp")
                if wire is None:
                    break
                writer.write(struct.pack("!H", len(wire)) + wire)
                await asyncio.wait_for(writer.drain(), config.tcp_timeout)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self.slots.release(source)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), config.tcp_timeout)
            except TimeoutError:  # a peer that never reads what is left
                writer.transport.abort()
            except (ConnectionError, OSError):
                pass
