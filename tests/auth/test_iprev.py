"""iprev (auth/iprev.py) against the loopback DNS server: the verdicts, and a client seen
before answered from the resolver's cache alone."""

from __future__ import annotations

import ipaddress

from smtpd_agent.auth.iprev import check_iprev, from_cache
from smtpd_agent.dns import reverse_name
from smtpd_agent.record import Iprev


def ptr(dns_server, ip: str, name: str) -> None:
    dns_server.add(reverse_name(ip).rstrip("."), "PTR", name)


async def test_pass_fail_permerror_and_temperror(dns_server, resolver):
    ptr(dns_server, "192.0.2.10", "mx.good.example")
    dns_server.a("mx.good.example", "192.0.2.10")
    ptr(dns_server, "192.0.2.11", "forged.example")
    dns_server.a("forged.example", "198.51.100.1")
    ptr(dns_server, "2001:db8::10", "mx6.good.example")
    dns_server.a("mx6.good.example", "2001:db8::10")
    assert await check_iprev(resolver, "192.0.2.10", 5) == Iprev("pass", "192.0.2.10",
                                                                 "mx.good.example")
    assert await check_iprev(resolver, "::ffff:192.0.2.10", 5) == Iprev(
        "pass", "192.0.2.10", "mx.good.example")
    assert (await check_iprev(resolver, "2001:db8::10", 5)).result == "pass"
    assert await check_iprev(resolver, "192.0.2.11", 5) == Iprev("fail", "192.0.2.11",
                                                                 "forged.example")
    assert (await check_iprev(resolver, "192.0.2.12", 5)).result == "permerror"  # no PTR
    assert (await check_iprev(resolver, "not an address", 5)).result == "permerror"
    # no time at all for a lookup the cache cannot answer: temperror, never fail
    assert (await check_iprev(resolver, "192.0.2.13", 0)).result == "temperror"


async def test_a_client_seen_before_is_answered_from_the_cache(dns_server, resolver):
    for ip, name, address in (("192.0.2.20", "mx.seen.example", "192.0.2.20"),
                              ("192.0.2.21", "forged.seen.example", "198.51.100.2"),
                              ("192.0.2.22", None, None)):
        if name:
            ptr(dns_server, ip, name)
            dns_server.a(name, address)
        client = ipaddress.ip_address(ip)
        assert from_cache(resolver, client) is None  # nothing cached yet: the network
        verdict = await check_iprev(resolver, ip, 5)
        asked = len(dns_server.queries)
        assert from_cache(resolver, client) == verdict
        assert await check_iprev(resolver, ip, 5) == verdict
        assert len(dns_server.queries) == asked
    assert [v.result for v in (from_cache(resolver, ipaddress.ip_address(ip))
                               for ip in ("192.0.2.20", "192.0.2.21", "192.0.2.22"))] == \
        ["pass", "fail", "permerror"]
