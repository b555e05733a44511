"""Checks on the event loop from cached DNS, and the full way when the cache cannot answer.

auth/runner.py decides for SPF, DKIM and ARC alike: the cache-only run must give
the same verdict as the full run, must never be used when a lookup was missing
(even if the library swallowed the CacheMiss), and must leave large messages to
the verification pool.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from smtpd_agent.auth import dkim as dkim_module
from smtpd_agent.auth.arc import arc_check
from smtpd_agent.auth.dkim import dkim_check
from smtpd_agent.auth.runner import INLINE_MAX, CheckRunner
from smtpd_agent.auth.spf import spf_check
from smtpd_agent.dns import CacheMiss

from .checks import check_spf, verify_dkim
from .keys import message, sign


@pytest.fixture
def runner():
    checks = CheckRunner(dns_workers=2, verify_workers=1)
    yield checks
    checks.close()


async def test_dkim_from_cache_only_once_the_key_is_cached(dns_server, resolver, rsa2048, runner):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    raw = sign(message(), rsa2048, "example.com")
    assert runner.now(resolver, dkim_check(raw)) is None  # the key is not cached yet
    assert dns_server.queries == []  # and nothing was asked from the cache-only run
    full = await verify_dkim(resolver, raw, runner)
    cached = runner.now(resolver, dkim_check(raw))
    assert cached == full and full.summary == "pass"
    altered = raw.replace(b"Hello Bob.", b"Pay Mallory")
    assert [s.result for s in runner.now(resolver, dkim_check(altered)).signatures] == ["fail"]


async def test_dkim_of_a_large_message_runs_in_the_verify_pool(dns_server, resolver, rsa2048,
                                                              runner, monkeypatch):
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    body = ("x" * 76 + "\r\n") * (INLINE_MAX // 78 + 10)
    raw = sign(message(body=body), rsa2048, "example.com")
    await verify_dkim(resolver, sign(message(), rsa2048, "example.com"), runner)  # key cached
    check = dkim_check(raw)
    assert not check.inline and check.pool == "verify"
    assert runner.now(resolver, check) is None
    threads = []
    real_verify_all = dkim_module.verify_all

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real_verify_all(*args, **kwargs)

    monkeypatch.setattr(dkim_module, "verify_all", recording)
    assert (await verify_dkim(resolver, raw, runner)).summary == "pass"
    assert threads and threads[0].name.startswith("auth-verify")


async def test_spf_from_cache_matches_the_full_check(dns_server, resolver, runner):
    dns_server.txt("example.com", "v=spf1 include:_spf.example.net -all")
    dns_server.txt("_spf.example.net", "v=spf1 ip4:192.0.2.0/24 -all")
    assert runner.now(resolver, spf_check("192.0.2.7", "a@example.com", "mx.example.com")) is None
    for ip, expected in (("192.0.2.7", "pass"), ("198.51.100.1", "fail")):
        full = await check_spf(resolver, ip, "a@example.com", "mx.example.com", runner=runner)
        assert full.result == expected
        assert runner.now(resolver, spf_check(ip, "a@example.com", "mx.example.com")) == full


async def test_spf_runs_in_its_own_pool(dns_server, resolver, runner):
    """SPF never queues behind DKIM/ARC verification: a pool of its own."""
    dns_server.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
    check = spf_check("192.0.2.7", "a@example.com", "mx.example.com")
    assert check.pool == "dns"
    threads = []

    def recording(view):
        threads.append(threading.current_thread().name)
        return check.run(view)

    found = await runner.later(resolver, dataclasses.replace(check, run=recording), 5)
    assert found is not None and found.result == "pass"
    assert threads and threads[0].startswith("auth-dns")


async def test_a_swallowed_cache_miss_still_means_the_full_way(dns_server, resolver):
    """pyspf wraps some lookups in a bare `except:`; the miss must still count."""

    def swallowing(view):
        try:
            view.query("nothing-cached.example.org", "TXT")
        except CacheMiss:
            pass
        return "verdict from a partial look"

    assert resolver.from_cache(swallowing) is None


async def test_arc_without_headers_needs_nothing(resolver, runner):
    assert runner.now(resolver, arc_check(message())).result == "none"
