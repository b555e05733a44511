"""iprev (RFC 8601 section 3): the client's reverse DNS name, confirmed by its forward lookup.

A standard, the resolver passed in. PTR names of the client address, then A or
AAAA of each (at most MAX_NAMES) until one gives the address back:

- pass: a PTR name resolves to the client address;
- fail: PTR names exist but none resolves to the address (or none resolves);
- permerror: no PTR record at all (NXDOMAIN or no data);
- temperror: a timeout or SERVFAIL on the way (never "fail": RFC 8601 section 3).

Computed once per connection by the listener and carried on the record; a signal
(stored, and for the spam stage), never a reason to refuse by itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Generator

from ..dns import Answer, DnsTempError, Resolver, SyncResolver, reverse_name
from ..record import Iprev

MAX_NAMES = 10  # PTR names tried, as RFC 7208 section 4.6.4 bounds its ptr mechanism


async def check_iprev(resolver: Resolver, ip: str, timeout: float) -> Iprev:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return Iprev("permerror", ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    known = from_cache(resolver, address)
    if known is not None:
        return known
    try:
        async with asyncio.timeout(timeout):
            return await _answer(resolver, _steps(address))
    except (TimeoutError, DnsTempError):
        return Iprev("temperror", str(address))


def from_cache(resolver: Resolver,
               address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Iprev | None:
    """The verdict for a client seen before (its PTR and A/AAAA answers all still cached),
    made here and now without a coroutine per lookup and a timer (issue 20: it runs per
    connection, on the loop); None when an answer is not cached."""
    return resolver.from_cache(lambda view: _answer_now(view, _steps(address)))


Lookup = tuple[str, str]  # (name, rdtype) asked; the Answer is sent back in
Steps = Generator[Lookup, Answer, Iprev]


def _steps(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Steps:
    """The check without I/O: yields each lookup, is sent its answer, returns the verdict;
    driven from the cache (_answer_now) or over the network (_answer)."""
    ip = str(address)
    ptr = yield reverse_name(ip), "PTR"
    names = [name for name in (r.target.to_text(omit_final_dot=True) for r in ptr.records)
             if name][:MAX_NAMES]
    if not names:
        return Iprev("permerror", ip)
    rdtype = "A" if address.version == 4 else "AAAA"
    for name in names:
        forward = yield name, rdtype
        for record in forward.records:
            try:
                if ipaddress.ip_address(record.address) == address:
                    return Iprev("pass", ip, name.lower())
            except ValueError:
                continue
    return Iprev("fail", ip, names[0].lower())


def _answer_now(view: SyncResolver, steps: Steps) -> Iprev:
    try:
        lookup = next(steps)
        while True:
            lookup = steps.send(view.query(*lookup))
    except StopIteration as done:
        return done.value


async def _answer(resolver: Resolver, steps: Steps) -> Iprev:
    try:
        lookup = next(steps)
        while True:
            lookup = steps.send(await resolver.query(*lookup))
    except StopIteration as done:
        return done.value
