"""The one DNS resolver of the server: every check (SPF, DKIM, DMARC, ARC) asks it.

Built once at start-up from `DnsSettings` and passed to each stage (no
module-level singleton). It wraps dnspython's asyncio resolver with:

- configurable nameservers (`host:port`, `[v6]:port`; none = system resolver);
- a bounded, TTL-respecting cache (dnspython's `LRUCache`, which also keeps
  NXDOMAIN and NODATA answers for the SOA minimum, RFC 2308), never serving an
  answer past its TTL; an answer asked for in the last tenth of its TTL is looked
  up again meanwhile (prefetch), and concurrent misses for one name share one
  lookup, so a busy sender's records expiring do not stall its messages in flight;
- one error model: a name that does not exist or has no data of the type asked
  for is an *empty answer*; a timeout, SERVFAIL or REFUSED is a `DnsTempError`,
  because RFC 7208 section 2.6.6, RFC 6376 section 6.1.2 and RFC 7489 section
  6.6.3 all make it a temporary error, never a failure.

SPF and DKIM libraries are synchronous. `from_cache()` runs such a check
right away on the event loop with answers from the cache only (the common
case: a sender's records are cached after its first message, and a thread hop
costs more than the check); when the check needs a lookup the cache cannot
answer, `in_thread()` runs it again in a worker thread with `blocking()`, a
view of this resolver that hops back onto the event loop, so both share the
cache and the timeouts. Which thread pool, and the deadline, are the caller's
(auth/runner.py); when the caller stops waiting, the view is abandoned: its
lookup in flight is cancelled and the check stops at its next lookup or
checkpoint instead of running on unseen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.nameserver
import dns.resolver
import dns.reversename
import structlog

from .config import DnsSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")

# An answer asked for in the last tenth of its TTL is looked up again meanwhile (as
# Unbound's and BIND's prefetch do), so that a busy sender's records do not expire under
# the messages in flight, each of which would then wait for the network.
REFRESH_AHEAD = 0.1


class DnsTempError(Exception):
    """The DNS did not answer (timeout, SERVFAIL, REFUSED): retry later, never 'fail'."""


class CacheMiss(Exception):
    """A cache-only lookup found nothing cached; the check must run the full way."""


class Abandoned(Exception):
    """Nobody waits for this check any more (deadline, shutdown): stop working.

    Not a DNS error and not a DKIMException, so library code passes it up."""


@dataclass(frozen=True)
class Answer:
    """What DNS said about (name, type): possibly nothing, never an error."""

    name: str
    rdtype: str
    records: tuple[Any, ...] = field(default=())
    nxdomain: bool = False

    @property
    def empty(self) -> bool:
        return not self.records


CacheKey = tuple[dns.name.Name, dns.rdatatype.RdataType, dns.rdataclass.RdataClass]


def _cache_keys(name: str, rdtype: str) -> tuple[CacheKey, CacheKey] | None:
    """Where dnspython's cache keeps (name, rdtype): its records, and an NXDOMAIN for the
    name (kept under ANY); None for a name that cannot be in the DNS."""
    try:
        qname = dns.name.from_text(name)
        kind = dns.rdatatype.from_text(rdtype)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return None
    return (qname, kind, dns.rdataclass.IN), (qname, dns.rdatatype.ANY, dns.rdataclass.IN)


@functools.lru_cache(maxsize=4096)
def reverse_name(address: str) -> str:
    """The PTR name of an IP address (in-addr.arpa / ip6.arpa); kept for the addresses
    seen lately, as dnspython builds it label by label (raises ValueError for a non-address)."""
    return dns.reversename.from_address(address).to_text()


def parse_nameserver(spec: str) -> dns.nameserver.Do53Nameserver:
    """`1.2.3.4`, `1.2.3.4:5353`, `::1`, `[::1]:5353` -> a plain DNS (port 53 default) server."""
    spec = spec.strip()
    host, port = spec, 53
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
        port = int(port_text)
    ipaddress.ip_address(host)  # dnspython wants an address; fail loudly at start-up
    return dns.nameserver.Do53Nameserver(host, port)


class Resolver:
    """Async DNS lookups with a shared TTL cache; see the module docstring for the error model."""

    def __init__(self, settings: DnsSettings) -> None:
        self.timeout = settings.timeout
        resolver = dns.asyncresolver.Resolver(configure=not settings.nameservers)
        if settings.nameservers:
            resolver.nameservers = [parse_nameserver(s) for s in settings.nameservers]
        # One overall deadline per lookup; per-server tries share it.
        resolver.lifetime = settings.timeout
        resolver.timeout = settings.timeout
        # A SERVFAIL is an answer to pass on as temperror, not a reason to spin.
        resolver.retry_servfail = False
        if settings.cache_size > 0:
            resolver.cache = dns.resolver.LRUCache(settings.cache_size)
        self._resolver = resolver
        # Our Answers for names as asked, until their TTL runs out (expiry, answer, when to
        # refresh it): building the cache key (dns.name.from_text) cost more than the rest of
        # a cached SPF check.
        self._answers: dict[tuple[str, str], tuple[float, Answer, float]] = {}
        self._answers_max = settings.cache_size
        # One lookup in flight per name and type, whoever asks meanwhile waits for it.
        self._lookups: dict[tuple[str, str], asyncio.Task[Answer]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def query(self, name: str, rdtype: str) -> Answer:
        """Records of `rdtype` at `name`; empty on NXDOMAIN/NODATA; DnsTempError otherwise.

        Concurrent misses for the same name and type share one lookup: when a sender's
        records expire, its messages in flight do not each send the same query."""
        cached = self.cached(name, rdtype)
        if cached is not None:
            return cached
        return await asyncio.shield(self._lookup(name, rdtype))

    def _lookup(self, name: str, rdtype: str) -> asyncio.Task[Answer]:
        """The lookup of (name, rdtype) in flight, started if there is none. It runs to
        its own deadline (`dns.timeout`) even when every caller stops waiting."""
        key = (name, rdtype)
        lookup = self._lookups.get(key)
        if lookup is None:
            self._loop = loop = asyncio.get_running_loop()
            lookup = loop.create_task(self._resolve(name, rdtype))
            self._lookups[key] = lookup
            lookup.add_done_callback(functools.partial(self._lookup_done, key))
        return lookup

    def _lookup_done(self, key: tuple[str, str], lookup: asyncio.Task[Answer]) -> None:
        if self._lookups.get(key) is lookup:
            del self._lookups[key]
        if not lookup.cancelled():
            lookup.exception()  # retrieved: a temperror nobody waited for is not a bug

    def _refresh_soon(self, name: str, rdtype: str) -> None:
        """From any thread: look (name, rdtype) up again before its cached answer expires."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._refresh, name, rdtype)

    def _refresh(self, name: str, rdtype: str) -> None:
        """Ask the network again for an answer still cached (dnspython's cache would
        answer the lookup itself, so its entry goes; ours serves until it expires). Once
        the new answer is in, ours is rebuilt from it; when the lookup fails the old one
        stays until it expires, as it would have without the refresh."""
        key = (name, rdtype)
        cache = self._resolver.cache
        keys = _cache_keys(name, rdtype)
        if key in self._lookups or cache is None or keys is None:
            return
        for cache_key in keys:
            cache.flush(cache_key)

        def refreshed(lookup: asyncio.Task[Answer]) -> None:
            if not lookup.cancelled() and lookup.exception() is None:
                self._answers.pop(key, None)

        self._lookup(name, rdtype).add_done_callback(refreshed)

    async def _resolve(self, name: str, rdtype: str) -> Answer:
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            # A name that cannot exist in the DNS (label > 63 octets, empty label,
            # not IDNA-encodable) has no records: a permanent condition, not temporary.
            return Answer(name, rdtype, nxdomain=True)
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Answer(name, rdtype, nxdomain=True)
        except dns.resolver.NoAnswer:  # pragma: no cover - raise_on_no_answer=False
            return Answer(name, rdtype)
        except dns.resolver.YXDOMAIN:
            return Answer(name, rdtype, nxdomain=True)
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as error:
            log.info("dns.temperror", name=name, rdtype=rdtype, error=type(error).__name__)
            raise DnsTempError(f"{rdtype} {name}: {type(error).__name__}") from error
        except dns.exception.DNSException as error:
            log.info("dns.temperror", name=name, rdtype=rdtype, error=type(error).__name__)
            raise DnsTempError(f"{rdtype} {name}: {error}") from error
        records = tuple(answer.rrset) if answer.rrset is not None else ()
        return Answer(name, rdtype, records)

    def cached(self, name: str, rdtype: str) -> Answer | None:
        """The answer from the TTL cache, or None; synchronous, safe from any thread.

        Worker threads (pyspf, dkimpy) ask here first, so a warm cache answers
        without a round trip through the event loop.
        """
        cache = self._resolver.cache
        if cache is None:
            return None
        key = (name, rdtype)
        known = self._answers.get(key)
        now = time.time()
        if known is not None:
            expires, answer, refresh_at = known
            if expires > now:
                if now >= refresh_at:  # still asked for near its expiry: refresh it once
                    self._answers[key] = (expires, answer, math.inf)
                    self._refresh_soon(name, rdtype)
                return answer
            self._answers.pop(key, None)
        keys = _cache_keys(name, rdtype)
        if keys is None:
            return None
        records_key, nxdomain_key = keys
        found = cache.get(records_key)
        if found is not None:
            answer = Answer(name, rdtype, tuple(found.rrset) if found.rrset is not None else ())
        else:
            found = cache.get(nxdomain_key)
            if found is None or found.response.rcode() != dns.rcode.NXDOMAIN:
                return None
            answer = Answer(name, rdtype, nxdomain=True)
        if len(self._answers) >= self._answers_max:
            self._answers.clear()
        remaining = found.expiration - now
        refresh_at = now + remaining * (1 - REFRESH_AHEAD) if remaining >= 1 else math.inf
        self._answers[key] = (found.expiration, answer, refresh_at)
        return answer

    async def txt(self, name: str) -> list[bytes]:
        """TXT records, each with its character-strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        answer = await self.query(name, "TXT")
        return [b"".join(r.strings) for r in answer.records]

    async def a(self, name: str) -> list[str]:
        return [r.address for r in (await self.query(name, "A")).records]

    async def aaaa(self, name: str) -> list[str]:
        return [r.address for r in (await self.query(name, "AAAA")).records]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        answer = await self.query(name, "MX")
        return [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer.records]

    def blocking(self, loop: asyncio.AbstractEventLoop) -> BlockingResolver:
        """A synchronous view for library code running in a worker thread."""
        return BlockingResolver(self, loop)

    def from_cache(self, check: Callable[[SyncResolver], T]) -> T | None:
        """`check(view)` run now, on this thread, answered from the cache only; None when it
        asked for something not cached (even if library code swallowed the CacheMiss)."""
        view = CachedResolver(self)
        try:
            result = check(view)
        except CacheMiss:
            return None
        return None if view.missed else result

    async def in_thread(self, check: Callable[[SyncResolver], T],
                        executor: concurrent.futures.Executor | None = None) -> T:
        """`check(view)` in a worker thread of `executor` (None: the loop's default), its
        lookups done on this event loop. If this await is cancelled, the check is abandoned."""
        loop = asyncio.get_running_loop()
        view = self.blocking(loop)
        try:
            return await loop.run_in_executor(executor, check, view)
        finally:
            view.abandon()


class SyncResolver:
    """What synchronous library code (pyspf, dkimpy) may ask of the resolver."""

    def __init__(self) -> None:
        # set once, by another thread (the loop's, abandon()), read by the check's thread:
        # a flag, not a threading.Event with its lock and condition, since one view is
        # made per check and nothing ever waits on it
        self.abandoned = False

    def query(self, name: str, rdtype: str) -> Answer:  # pragma: no cover - interface
        raise NotImplementedError

    def checkpoint(self) -> None:
        """Raise Abandoned once the caller has stopped waiting; cheap, call it between steps."""
        if self.abandoned:
            raise Abandoned()

    def abandon(self) -> None:
        self.abandoned = True

    def txt(self, name: str) -> list[bytes]:
        return [b"".join(r.strings) for r in self.query(name, "TXT").records]


class CachedResolver(SyncResolver):
    """Answers from the TTL cache only; anything else is a CacheMiss, remembered in `missed`."""

    def __init__(self, resolver: Resolver) -> None:
        super().__init__()
        self.resolver = resolver
        self.missed = False

    def query(self, name: str, rdtype: str) -> Answer:
        cached = self.resolver.cached(name, rdtype)
        if cached is None:
            self.missed = True
            raise CacheMiss(f"{rdtype} {name}")
        return cached


class BlockingResolver(SyncResolver):
    """Runs lookups on the event loop from a worker thread (pyspf, dkimpy are synchronous).

    Never call it on the loop's own thread: it would wait on itself.
    """

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.resolver = resolver
        self.loop = loop
        self._in_flight: concurrent.futures.Future[Any] | None = None

    def abandon(self) -> None:
        super().abandon()
        in_flight = self._in_flight
        if in_flight is not None:
            in_flight.cancel()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._in_flight = future
        if self.abandoned:  # abandoned between the checkpoint and now
            future.cancel()
        try:
            # The resolver has its own lifetime; this margin only guards a stuck loop.
            return future.result(timeout=self.resolver.timeout + 2.0)
        except concurrent.futures.TimeoutError as error:
            future.cancel()
            raise DnsTempError("DNS lookup did not finish in time") from error
        except concurrent.futures.CancelledError as error:
            self.checkpoint()
            raise DnsTempError("DNS lookup cancelled") from error
        finally:
            self._in_flight = None

    def query(self, name: str, rdtype: str) -> Answer:
        self.checkpoint()
        cached = self.resolver.cached(name, rdtype)
        if cached is not None:
            return cached
        return self._run(self.resolver.query(name, rdtype))
