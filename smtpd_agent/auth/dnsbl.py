"""DNS blocklists (RFC 5782): is a client address listed in a zone?

A standard, pure but for the resolver passed in: no SMTP session here. The
query name is the address's octets (IPv4) or nibbles (IPv6) in reverse, under
the zone; an A record in 127.0.0.0/8 means listed, NXDOMAIN or no data means
not listed. Anything else is an error, never a listing: a timeout or SERVFAIL
(our DNS is in trouble), an answer outside 127/8 (RFC 5782 section 2.3: an
NXDOMAIN-rewriting resolver, not the list), and Spamhaus's 127.255.255.0/24
(its "you may not query us" codes, sent to open resolvers and over quota).
The listener refuses only on `listed`; an error never refuses mail.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
from dataclasses import dataclass

from ..dns import DnsTempError, Resolver

ERROR_NETWORK = ipaddress.ip_network("127.255.255.0/24")
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class Listing(enum.Enum):
    LISTED = "listed"
    CLEAR = "clear"
    ERROR = "error"


@dataclass(frozen=True)
class DnsblResult:
    zone: str
    listing: Listing
    codes: tuple[str, ...] = ()  # the 127.x.y.z return codes on a listing
    reason: str = ""  # why an error is an error, for the log


def query_name(ip: str, zone: str) -> str:
    """1.2.3.4 under zen.spamhaus.org -> 4.3.2.1.zen.spamhaus.org (IPv6: 32 nibbles)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        labels = reversed(str(address).split("."))
    else:
        labels = reversed(address.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone.strip(".")


def classify(zone: str, addresses: list[str]) -> DnsblResult:
    """Pure: the A records found at the query name -> listed / clear / error."""
    if not addresses:
        return DnsblResult(zone, Listing.CLEAR)
    codes = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return DnsblResult(zone, Listing.ERROR, reason=f"not an address: {text[:40]}")
        if address in ERROR_NETWORK:
            return DnsblResult(zone, Listing.ERROR, reason=f"list refused the query ({text})")
        if address not in LOOPBACK:
            return DnsblResult(zone, Listing.ERROR, reason=f"answer outside 127/8 ({text})")
        codes.append(text)
    return DnsblResult(zone, Listing.LISTED, tuple(sorted(codes)))


async def lookup(resolver: Resolver, ip: str, zone: str, timeout: float) -> DnsblResult:
    """One zone for one client, within `timeout` seconds; DNS trouble is an ERROR result."""
    try:
        name = query_name(ip, zone)
    except ValueError:
        return DnsblResult(zone, Listing.ERROR, reason="client is not an IP address")
    try:
        async with asyncio.timeout(timeout):
            addresses = await resolver.a(name)
    except TimeoutError:
        return DnsblResult(zone, Listing.ERROR, reason="timeout")
    except DnsTempError as error:
        return DnsblResult(zone, Listing.ERROR, reason=str(error)[:200])
    return classify(zone, addresses)


async def check(resolver: Resolver, ip: str, zones: list[str],
                timeout: float) -> tuple[DnsblResult, ...]:
    """Every zone at once; results in the order of `zones`."""
    return tuple(await asyncio.gather(*(lookup(resolver, ip, zone, timeout) for zone in zones)))
