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

from ..dns import DnsTempError, Resolver
from ..record import Iprev

MAX_NAMES = 10  # PTR names tried, as RFC 7208 section 4.6.4 bounds its ptr mechanism


async def check_iprev(resolver: Resolver, ip: str, timeout: float) -> Iprev:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return Iprev("permerror", ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    try:
        async with asyncio.timeout(timeout):
            return await _confirm(resolver, address)
    except (TimeoutError, DnsTempError):
        return Iprev("temperror", str(address))


async def _confirm(resolver: Resolver, address: ipaddress.IPv4Address | ipaddress.IPv6Address
                   ) -> Iprev:
    ip = str(address)
    names = [name for name in await resolver.ptr(ip) if name][:MAX_NAMES]
    if not names:
        return Iprev("permerror", ip)
    lookup = resolver.a if address.version == 4 else resolver.aaaa
    for name in names:
        for found in await lookup(name):
            try:
                if ipaddress.ip_address(found) == address:
                    return Iprev("pass", ip, name.lower())
            except ValueError:
                continue
    return Iprev("fail", ip, names[0].lower())
