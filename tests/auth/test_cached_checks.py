"""Checks on the event loop from cached DNS, and the full way when the cache cannot answer.

The cache-only run must give the same verdict as the full run, must never be
used when a lookup was missing (even if the library swallowed the CacheMiss),
and must leave large messages to a worker thread.
"""

from __future__ import annotations

import threading

from smtpd_agent.auth.arc import verify_arc_cached
from smtpd_agent.auth.dkim import VERIFY_INLINE_MAX, verify_dkim, verify_dkim_cached
from smtpd_agent.auth.spf import check_spf, check_spf_cached
from smtpd_agent.dns import CacheMiss

from .keys import message, sign


async def test_dkim_from_cache_only_once_the_key_is_cached(dns_server, resolver, rsa2048):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    raw = sign(message(), rsa2048, "example.com")
    assert verify_dkim_cached(resolver, raw) is None  # the key is not cached yet
    assert dns_server.queries == []  # and nothing was asked from the cache-only run
    full = await verify_dkim(resolver, raw)
    cached = verify_dkim_cached(resolver, raw)
    assert cached == full and full.summary == "pass"
    altered = raw.replace(b"Hello Bob.", b"Pay Mallory")
    assert [s.result for s in verify_dkim_cached(resolver, altered).signatures] == ["fail"]


async def test_dkim_of_a_large_message_runs_in_a_thread(dns_server, resolver, rsa2048,
                                                       monkeypatch):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    body = ("x" * 76 + "\r\n") * (VERIFY_INLINE_MAX // 78 + 10)
    raw = sign(message(body=body), rsa2048, "example.com")
    await verify_dkim(resolver, sign(message(), rsa2048, "example.com"))  # key now cached
    assert verify_dkim_cached(resolver, raw) is None
    threads = []
    real_verify_all = verify_dkim.__globals__["verify_all"]

    def recording(*args):
        threads.append(threading.current_thread())
        return real_verify_all(*args)

    monkeypatch.setitem(verify_dkim.__globals__, "verify_all", recording)
    assert (await verify_dkim(resolver, raw)).summary == "pass"
    assert threads and threads[0] is not threading.main_thread()


async def test_spf_from_cache_matches_the_full_check(dns_server, resolver):
    dns_server.txt("example.com", "v=spf1 include:_spf.example.net -all")
    dns_server.txt("_spf.example.net", "v=spf1 ip4:192.0.2.0/24 -all")
    assert check_spf_cached(resolver, "192.0.2.7", "a@example.com", "mx.example.com") is None
    for ip, expected in (("192.0.2.7", "pass"), ("198.51.100.1", "fail")):
        full = await check_spf(resolver, ip, "a@example.com", "mx.example.com")
        assert full.result == expected
        assert check_spf_cached(resolver, ip, "a@example.com", "mx.example.com") == full


async def test_a_swallowed_cache_miss_still_means_the_full_way(dns_server, resolver):
    """pyspf wraps some lookups in a bare `except:`; the miss must still count."""

    def swallowing(view):
        try:
            view.query("nothing-cached.example.org", "TXT")
        except CacheMiss:
            pass
        return "verdict from a partial look"

    assert resolver.from_cache(swallowing) is None


async def test_arc_without_headers_needs_nothing(resolver):
    assert verify_arc_cached(resolver, message()).result == "none"
