"""Issue 16 #2: DKIM work per message is bounded, stops when abandoned, and a temperror on
an aligned signature cannot carry a p=reject From past DMARC.

Real DNS on loopback, real dkimpy signatures. Each test fails on the code before the
fix: every signature was verified, each re-hashing the body; the work ran on after its
deadline in the shared default executor; and auth.temperror="accept" let an aligned
temperror under p=reject through unflagged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from dkim import canonicalization

from smtpd_agent.auth import authenticate, decide
from smtpd_agent.auth.runner import CheckRunner
from smtpd_agent.config import AuthSettings

from .checks import verify_dkim
from .keys import message, sign
from .test_authenticate import AUTHSERV, inbound


@pytest.fixture
def runner():
    checks = CheckRunner(dns_workers=2, verify_workers=1)
    yield checks
    checks.close()


@pytest.fixture
def count_canonicalizations(monkeypatch) -> Callable[[], list[int]]:
    """Called: from then on, the length of each body dkimpy canonicalizes (signing the
    test's message canonicalizes too, so the count starts after it)."""

    def start() -> list[int]:
        calls: list[int] = []
        real = canonicalization.strip_trailing_lines  # the last step of either body canon

        def counting(body):
            calls.append(len(body))
            return real(body)

        monkeypatch.setattr(canonicalization, "strip_trailing_lines", counting)
        return calls

    return start


def key_queries(dns_server) -> list[str]:
    return [name.lower().rstrip(".") for _, name, rtype in dns_server.queries
            if "._domainkey." in name.lower()]


def aligned_first(domain: str) -> bool:
    return domain == "example.com"


async def test_at_most_the_cap_verified_aligned_first(dns_server, resolver, rsa2048, runner):
    raw = message()
    raw = sign(raw, rsa2048, "example.com")  # the aligned one: signed first, so lowest
    for n in range(12):
        dns_server.txt(f"sel._domainkey.noise{n}.example.net", rsa2048.record)
        raw = sign(raw, rsa2048, f"noise{n}.example.net")
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    result = await verify_dkim(resolver, raw, runner, first=aligned_first, limit=3)
    assert len(result.signatures) == 3 and result.skipped == 10
    assert "example.com" in [s.domain for s in result.signatures]
    assert all(s.result == "pass" for s in result.signatures)
    assert len(key_queries(dns_server)) == 3


async def test_authenticate_caps_by_setting_and_prefers_the_from_domain(dns_server, resolver,
                                                                       rsa2048, runner):
    raw = sign(message(), rsa2048, "example.com")
    for n in range(8):
        dns_server.txt(f"sel._domainkey.noise{n}.example.net", rsa2048.record)
        raw = sign(raw, rsa2048, f"noise{n}.example.net")
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    settings = AuthSettings(authserv_id=AUTHSERV, timeout=5, dkim_max_signatures=2)
    result = await authenticate(inbound(raw, "a@elsewhere.example.org"), resolver, settings,
                                AUTHSERV, runner)
    assert len(result.dkim_signatures) == 2
    assert result.dmarc == "pass" and result.dmarc_detail.aligned == ("dkim",)


async def test_one_body_canonicalization_for_many_signatures(dns_server, resolver, rsa2048,
                                                             runner,
                                                             count_canonicalizations):
    raw = message(body="Hello Bob.\r\n" * 1000)
    for n in range(5):
        dns_server.txt(f"sel._domainkey.d{n}.example.com", rsa2048.record)
        raw = sign(raw, rsa2048, f"d{n}.example.com")
    calls = count_canonicalizations()
    result = await verify_dkim(resolver, raw, runner, limit=5)
    assert [s.result for s in result.signatures] == ["pass"] * 5
    assert len(calls) == 1  # dkimpy alone: once per signature


async def test_abandoned_verification_stops_and_frees_its_thread(dns_server, resolver, rsa2048,
                                                                 runner):
    """The deadline passes while a key lookup hangs: the lookup is cancelled, the next
    signature is never started, and the one verify thread is free again at once."""
    raw = message()
    for domain in ("c.example", "b.example", "a.example"):  # a on top, verified first
        raw = sign(raw, rsa2048, domain)
    dns_server.txt("sel._domainkey.a.example", rsa2048.record)
    dns_server.set_timeout("sel._domainkey.b.example")
    dns_server.txt("sel._domainkey.c.example", rsa2048.record)

    result = await verify_dkim(resolver, raw, runner, limit=3, deadline=0.1)
    assert [s.result for s in result.signatures] == ["temperror"] * 3
    assert [s.domain for s in result.signatures] == ["a.example", "b.example", "c.example"]

    # The one verify thread is free again: not held until the hung lookup's own timeout
    # (resolver timeout + 2 s margin), or this deadline would pass and give temperror.
    simple = sign(message(), rsa2048, "a.example")
    after = await verify_dkim(resolver, simple, runner, deadline=1.5)
    assert after.summary == "pass"
    await asyncio.sleep(1.5)  # longer than the DNS timeout: c would have been asked by now
    assert "sel._domainkey.c.example" not in key_queries(dns_server)


async def test_aligned_temperror_under_p_reject_is_quarantined(dns_server, resolver, rsa2048,
                                                              runner):
    """The From domain publishes p=reject; its signature's key cannot be fetched; SPF is for
    another domain. DMARC is temperror, and with auth.temperror = "accept" (the default)
    the message used to be accepted unflagged."""
    dns_server.set_timeout("sel._domainkey.example.com")
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    dns_server.txt("elsewhere.example.org", "v=spf1 -all")
    raw = sign(message(), rsa2048, "example.com")
    settings = AuthSettings(authserv_id=AUTHSERV, timeout=5)
    result = await authenticate(inbound(raw, "a@elsewhere.example.org"), resolver, settings,
                                AUTHSERV, runner)
    assert (result.dkim, result.dmarc, result.dmarc_policy) == ("temperror", "temperror",
                                                                "reject")
    decision = decide(result, settings)
    assert decision.action == "quarantine"
    assert decide(result, AuthSettings(temperror="tempfail")).action == "tempfail"


async def test_dkim_deadline_is_an_aligned_temperror_not_a_dmarc_fail(dns_server, resolver,
                                                                     rsa2048, runner):
    """DKIM missing its deadline says temperror for the signatures it meant to verify, with
    their d=: DMARC must not turn our slowness into fail (and a 550 under p=reject)."""
    dns_server.set_timeout("sel._domainkey.example.com")
    dns_server.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    raw = sign(message(), rsa2048, "example.com")
    settings = AuthSettings(authserv_id=AUTHSERV, timeout=0.2)
    result = await authenticate(inbound(raw, "a@elsewhere.example.org", client_ip=""),
                                resolver, settings, AUTHSERV, runner)
    assert result.dkim_signatures[0].domain == "example.com"
    assert result.dmarc == "temperror"
    assert decide(result, settings).action == "quarantine"


async def test_closing_the_runner_abandons_running_verification(dns_server, resolver, rsa2048):
    """At stop (SIGTERM) the runtime closes its runner: work in flight stops too."""
    raw = message()
    for domain in ("c.example", "b.example"):
        raw = sign(raw, rsa2048, domain)
    dns_server.set_timeout("sel._domainkey.b.example")
    dns_server.txt("sel._domainkey.c.example", rsa2048.record)
    runner = CheckRunner(dns_workers=1, verify_workers=1)
    pending = asyncio.create_task(verify_dkim(resolver, raw, runner, limit=2, deadline=30))
    await asyncio.sleep(0.1)  # b's key lookup is hanging now
    runner.close()
    result = await asyncio.wait_for(pending, 1.0)  # not after the hung lookup's timeout
    assert [s.result for s in result.signatures] == ["temperror", "temperror"]
    await asyncio.sleep(1.5)  # longer than the DNS timeout
    assert "sel._domainkey.c.example" not in key_queries(dns_server)


async def test_dkim_and_arc_share_one_body_canonicalization(dns_server, resolver, rsa2048,
                                                            runner,
                                                            count_canonicalizations):
    """A list's ARC-Message-Signature covers the body as the author's DKIM signature does
    (relaxed body, sha256): authenticate() canonicalizes and hashes that body once, not once
    for DKIM and again for ARC."""
    import dkim

    from .test_arc import arc_sealed

    raw = message(body="Hello Bob.\r\n" * 1000)
    raw = dkim.sign(raw, b"sel", b"example.com", rsa2048.private,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date"]) + raw
    raw = arc_sealed(raw, rsa2048)
    dns_server.txt("sel._domainkey.example.com", rsa2048.record)
    dns_server.txt("arc._domainkey.lists.example.org", rsa2048.record)
    calls = count_canonicalizations()
    settings = AuthSettings(authserv_id=AUTHSERV, timeout=5)
    result = await authenticate(inbound(raw, "a@example.com"), resolver, settings, AUTHSERV,
                                runner)
    assert (result.dkim, result.arc) == ("pass", "pass")
    assert len(calls) == 1  # each verifier on its own: twice
