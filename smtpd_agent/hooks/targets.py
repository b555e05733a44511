"""Where a webhook may be delivered: the URL's form and the addresses it may reach.

Hostile by default (SSRF): a workspace names the URL, and our server makes the request
from inside the operator's network. So:
- https only; http only to a loopback host, and only with webhooks.allow_loopback (tests
  and development);
- no user info (credentials in URLs end up in logs), no fragment, a bounded length;
- the address connected to must be global unicast: never loopback (unless allowed),
  private (RFC 1918, ULA), link-local (169.254/16, the cloud metadata services),
  shared (100.64/10), multicast, reserved or unspecified; an IPv4-mapped IPv6 address
  is judged as its IPv4 address, and one that carries an IPv4 address to a translator
  or tunnel (NAT64, 6to4, Teredo) by that address too. webhooks.allowed_networks admits chosen networks.

The check applies to the addresses the connection is made to: `GuardedResolver` is the
resolver of the delivery client's connector, so a name is resolved once, filtered, and
the connection goes to an address that passed (no second lookup to rebind). An IP
literal never reaches a resolver, so `check_url` judges it before every attempt.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address

from ..dns import DnsTempError, Resolver

MAX_URL = 2048
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
LOOPBACK_NAMES = ("localhost", "localhost.")


class Refused(ValueError):
    """The URL or the address it leads to is not one we deliver to; the text says why."""


@dataclass(frozen=True)
class Policy:
    """What webhooks.allow_loopback and webhooks.allowed_networks admit."""

    allow_loopback: bool = False
    allowed_networks: tuple[Network, ...] = ()

    @classmethod
    def of(cls, allow_loopback: bool, networks: Sequence[str]) -> Policy:
        return cls(allow_loopback,
                   tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks))

    def address_problem(self, text: str) -> str | None:
        """Why we must not connect to `text` (an IP address), or None."""
        try:
            address: Address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return f"{text!r} is not an IP address"
        if isinstance(address, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(address)
            if address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            elif embedded is not None:
                problem = self.address_problem(str(embedded))
                if problem:
                    return f"{address} carries {embedded}: {problem}"
        if any(address in network for network in self.allowed_networks):
            return None
        if address.is_loopback:
            return None if self.allow_loopback else f"{address} is a loopback address"
        for kind, flag in (("unspecified", address.is_unspecified),
                           ("link-local", address.is_link_local),
                           ("multicast", address.is_multicast),
                           ("private", address.is_private),
                           ("reserved", address.is_reserved)):
            if flag:
                return f"{address} is a {kind} address"
        if not address.is_global:
            return f"{address} is not a global address"
        return None


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a translator or tunnel would reach for `address`: NAT64's
    well-known prefix, 6to4 (RFC 3056), Teredo's client (RFC 4380)."""
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def _split(url: str) -> SplitResult:
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise Refused(f"url: 1-{MAX_URL} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise Refused("url: no spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as error:
        raise Refused(f"url: {error}") from None
    return parts


def _is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _legacy_ipv4(host: str) -> bool:
    """2130706433, 0177.0.0.1, 127.1, 0x7f.1, 127.0.0.1.: no name, but spellings that
    the HTTP client and getaddrinfo still read as an address (inet_aton), bypassing
    the resolver's check. Refused outright."""
    if is_ip_address(host) or is_ip_address(host.rstrip(".")):
        return True
    try:
        socket.inet_aton(host.rstrip("."))
    except OSError:
        return False
    return True


def check_url(url: str, policy: Policy) -> str:
    """The URL as we store it, or Refused with the reason (what the API answers)."""
    parts = _split(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not host:
        raise Refused("url: no host")
    if parts.username is not None or parts.password is not None:
        raise Refused("url: no user or password in the URL")
    if parts.fragment:
        raise Refused("url: no fragment")
    if scheme == "http":
        if not (policy.allow_loopback and _is_loopback_host(host)):
            raise Refused("url: https is required (http only to a loopback host, with "
                          "webhooks.allow_loopback)")
    elif scheme != "https":
        raise Refused("url: https is required")
    if host in LOOPBACK_NAMES and not policy.allow_loopback:
        raise Refused("url: localhost is not a webhook destination")
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal.split("%", 1)[0])
    except ValueError:
        if _legacy_ipv4(literal):
            raise Refused("url: not a canonical IP address (write a.b.c.d in decimal)") from None
        if "%" in host or not all(label for label in host.rstrip(".").split(".")):
            raise Refused("url: not a valid host name") from None
    else:
        problem = policy.address_problem(literal)
        if problem:
            raise Refused(f"url: {problem}")
    return parts.geturl()


class GuardedResolver(AbstractResolver):
    """The delivery client's resolver: our DNS, and only addresses the policy admits."""

    def __init__(self, resolver: Resolver, policy: Policy) -> None:
        self.resolver = resolver
        self.policy = policy

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host.lower() in LOOPBACK_NAMES:
            names = ["127.0.0.1", "::1"]
        else:
            try:
                names = [*await self.resolver.a(host), *await self.resolver.aaaa(host)]
            except DnsTempError as error:
                raise OSError(f"DNS lookup of {host} failed: {error}") from None
        if not names:
            raise OSError(f"{host} has no address")
        results: list[ResolveResult] = []
        refused = []
        for name in names:
            problem = self.policy.address_problem(name)
            if problem:
                refused.append(problem)
                continue
            v6 = ":" in name
            results.append({"hostname": host, "host": name, "port": port,
                            "family": socket.AF_INET6 if v6 else socket.AF_INET,
                            "proto": 0, "flags": socket.AI_NUMERICHOST})
        if not results:
            raise AddressRefused(f"{host}: " + "; ".join(refused))
        return results

    async def close(self) -> None:
        return None


class AddressRefused(OSError):
    """Every address of the host is one the policy refuses (no connection was made)."""


def describe(error: BaseException) -> str:
    """One line for the delivery log: the kind of failure and its text, bounded."""
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:500]

