"""Our resolver against the loopback DNS server: answers, negatives, cache, temperrors."""

from __future__ import annotations

import asyncio

import time

import pytest

from smtpd_agent.config import DnsSettings
from smtpd_agent.dns import DnsTempError, Resolver, parse_nameserver, reverse_name


async def test_record_types(dns_server, resolver):
    dns_server.a("host.example.com", "192.0.2.1", "2001:db8::1")
    dns_server.add("example.com", "MX", (10, "host.example.com"))
    dns_server.add("1.2.0.192.in-addr.arpa", "PTR", "host.example.com")
    dns_server.add("alias.example.com", "CNAME", "host.example.com")
    dns_server.txt("example.com", "v=spf1 -all")
    assert await resolver.a("host.example.com") == ["192.0.2.1"]
    assert await resolver.aaaa("host.example.com") == ["2001:db8::1"]
    assert await resolver.mx("example.com") == [(10, "host.example.com")]
    ptr = await resolver.query(reverse_name("192.0.2.1"), "PTR")
    assert [r.target.to_text(omit_final_dot=True) for r in ptr.records] == ["host.example.com"]
    assert await resolver.a("alias.example.com") == ["192.0.2.1"]
    assert await resolver.txt("example.com") == [b"v=spf1 -all"]


async def test_long_txt_is_split_and_joined_over_tcp(dns_server, resolver):
    value = "p=" + "A" * 900
    dns_server.txt("long.example.com", value)
    assert await resolver.txt("long.example.com") == [value.encode()]
    # 900 octets do not fit a 512-octet UDP answer: the server truncated, the resolver retried on TCP
    assert ("tcp", "long.example.com", "TXT") in dns_server.queries


async def test_nxdomain_and_nodata_are_empty(dns_server, resolver):
    dns_server.a("sub.there.example.com", "192.0.2.1")
    missing = await resolver.query("missing.example.com", "TXT")
    assert missing.empty and missing.nxdomain
    nodata = await resolver.query("sub.there.example.com", "TXT")
    assert nodata.empty and not nodata.nxdomain
    empty_non_terminal = await resolver.query("there.example.com", "A")
    assert empty_non_terminal.empty and not empty_non_terminal.nxdomain


async def test_cache_respects_hits_and_ttl(dns_server, resolver):
    dns_server.add("cached.example.com", "A", "192.0.2.7", ttl=1)
    for _ in range(3):
        assert await resolver.a("cached.example.com") == ["192.0.2.7"]
    assert dns_server.queries.count(("udp", "cached.example.com", "A")) == 1
    await resolver.a("nothing.example.com")
    await resolver.a("nothing.example.com")
    assert dns_server.queries.count(("udp", "nothing.example.com", "A")) == 1  # negative cached
    time.sleep(1.1)
    assert await resolver.a("cached.example.com") == ["192.0.2.7"]
    assert dns_server.queries.count(("udp", "cached.example.com", "A")) == 2


async def test_timeout_is_temperror(dns_server, resolver):
    dns_server.set_timeout("slow.example.com")
    # The server never answers: only the resolver's own deadline can end the lookup (the
    # outer guard turns a missing deadline into a clear failure, not a hang).
    async with asyncio.timeout(60):
        with pytest.raises(DnsTempError):
            await resolver.txt("slow.example.com")


async def test_servfail_is_temperror(dns_server, resolver):
    dns_server.set_servfail("broken.example.com")
    with pytest.raises(DnsTempError):
        await resolver.a("broken.example.com")


async def test_invalid_name_is_empty(resolver):
    answer = await resolver.query("a" * 64 + ".example.com", "TXT")
    assert answer.empty and answer.nxdomain


def test_parse_nameserver():
    assert (parse_nameserver("127.0.0.1:5353").address, parse_nameserver("127.0.0.1:5353").port) \
        == ("127.0.0.1", 5353)
    assert parse_nameserver("192.0.2.1").port == 53
    assert parse_nameserver("[::1]:5300").port == 5300
    assert parse_nameserver("::1").address == "::1"


def test_system_resolver_when_no_nameservers():
    # Constructing must not query anything; it reads /etc/resolv.conf only.
    resolver = Resolver(DnsSettings(nameservers=[], timeout=1.0, cache_size=10))
    assert resolver.timeout == 1.0


async def test_concurrent_misses_for_one_name_send_one_query(dns_server, resolver):
    """Twenty checks miss the same record at once (a sender's first message, or its
    records just expired): one query goes out and every one of them gets its answer."""
    dns_server.txt("burst.example.com", "v=spf1 -all")
    answers = await asyncio.gather(*(resolver.txt("burst.example.com") for _ in range(20)))
    assert answers == [[b"v=spf1 -all"]] * 20
    assert dns_server.queries.count(("udp", "burst.example.com", "TXT")) == 1


async def test_a_waiter_that_gives_up_leaves_the_shared_lookup_to_the_others(dns_server,
                                                                           resolver):
    dns_server.txt("shared.example.com", "v=spf1 -all")
    first = asyncio.ensure_future(resolver.txt("shared.example.com"))
    second = asyncio.ensure_future(resolver.txt("shared.example.com"))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == [b"v=spf1 -all"]
    assert first.cancelled()
    assert dns_server.queries.count(("udp", "shared.example.com", "TXT")) == 1


async def test_an_answer_asked_for_near_its_expiry_is_refreshed_before_it_expires(
        dns_server, resolver):
    """Prefetch: asked for in the last tenth of its TTL, the cached answer is served and
    looked up again meanwhile, so after the old TTL it still comes from the cache."""
    dns_server.add("hot.example.com", "A", "192.0.2.1", ttl=3)
    assert await resolver.a("hot.example.com") == ["192.0.2.1"]
    assert await resolver.a("hot.example.com") == ["192.0.2.1"]  # our entry, refresh at ~2.7 s
    dns_server.clear()  # the record changes meanwhile
    dns_server.add("hot.example.com", "A", "192.0.2.2", ttl=3)
    await asyncio.sleep(2.8)
    assert resolver.cached("hot.example.com", "A").records[0].address == "192.0.2.1"
    for _ in range(100):  # the refresh runs on the loop, beside us
        await asyncio.sleep(0.02)
        if dns_server.queries:
            break
    await asyncio.sleep(0.1)
    assert dns_server.queries.count(("udp", "hot.example.com", "A")) == 1
    await asyncio.sleep(0.5)  # past the first answer's TTL
    assert resolver.cached("hot.example.com", "A").records[0].address == "192.0.2.2"
    assert await resolver.a("hot.example.com") == ["192.0.2.2"]
    assert dns_server.queries.count(("udp", "hot.example.com", "A")) == 1


async def test_a_refresh_that_fails_keeps_the_answer_until_it_expires(dns_server, resolver):
    dns_server.add("flaky.example.com", "A", "192.0.2.1", ttl=2)
    assert await resolver.a("flaky.example.com") == ["192.0.2.1"]
    assert await resolver.a("flaky.example.com") == ["192.0.2.1"]
    dns_server.set_servfail("flaky.example.com")
    await asyncio.sleep(1.85)
    assert await resolver.a("flaky.example.com") == ["192.0.2.1"]  # starts the refresh
    await asyncio.sleep(0.05)
    assert dns_server.queries.count(("udp", "flaky.example.com", "A")) == 2  # SERVFAIL
    assert await resolver.a("flaky.example.com") == ["192.0.2.1"]  # still cached
    await asyncio.sleep(0.3)  # expired now: the answer is not served past its TTL
    assert resolver.cached("flaky.example.com", "A") is None
    with pytest.raises(DnsTempError):
        await resolver.a("flaky.example.com")


async def test_a_short_ttl_is_not_refreshed_ahead(dns_server, resolver):
    """Under a second of TTL there is nothing to gain: asked for in its last tenth, the
    answer is served and no extra query goes out."""
    dns_server.add("brief.example.com", "A", "192.0.2.1", ttl=1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await resolver.a("brief.example.com") == ["192.0.2.1"]
    assert await resolver.a("brief.example.com") == ["192.0.2.1"]  # our entry
    await asyncio.sleep(max(0.0, began + 0.93 - loop.time()))
    assert resolver.cached("brief.example.com", "A") is not None  # in its last tenth
    await asyncio.sleep(0.05)
    assert dns_server.queries.count(("udp", "brief.example.com", "A")) == 1
