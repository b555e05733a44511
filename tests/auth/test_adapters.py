"""The dkimpy/pyspf adaptations are explicit: nothing is patched on import, `install()`
does it once, and every check gets its resolver per call (never through global state)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from smtpd_agent.auth import adapters
from smtpd_agent.auth.runner import CheckRunner
from smtpd_agent.config import DnsSettings
from smtpd_agent.dns import Resolver

from tests.dnsserver import DnsTestServer
from tests.support import TEST_DNS_TIMEOUT

from .checks import check_spf


def test_importing_every_module_patches_nothing_and_install_does():
    script = textwrap.dedent("""
        import importlib, pkgutil
        import dkim, dkim.crypto, spf
        before = (dkim.RSASSA_PKCS1_v1_5_verify, dkim.RSASSA_PKCS1_v1_5_sign, spf.DNSLookup)
        import smtpd_agent
        for module in pkgutil.walk_packages(smtpd_agent.__path__, "smtpd_agent."):
            if module.name != "smtpd_agent.__main__":
                importlib.import_module(module.name)
        after = (dkim.RSASSA_PKCS1_v1_5_verify, dkim.RSASSA_PKCS1_v1_5_sign, spf.DNSLookup)
        assert after == before, "patched on import"
        assert before[:2] == (dkim.crypto.RSASSA_PKCS1_v1_5_verify,
                              dkim.crypto.RSASSA_PKCS1_v1_5_sign)
        from smtpd_agent.auth import adapters
        assert not adapters.installed()
        adapters.install()
        adapters.install()
        assert adapters.installed() and spf.DNSLookup is before[2]
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


async def test_concurrent_spf_checks_each_use_their_own_resolver(dns_server):
    """Two resolvers on two DNS servers that disagree: each check sees its own answer."""
    dns_server.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
    with DnsTestServer() as other:
        other.txt("example.com", "v=spf1 ip4:198.51.100.0/24 -all")
        ours = Resolver(DnsSettings(nameservers=[dns_server.nameserver],
                                    timeout=TEST_DNS_TIMEOUT, cache_size=0))
        theirs = Resolver(DnsSettings(nameservers=[other.nameserver],
                                      timeout=TEST_DNS_TIMEOUT, cache_size=0))
        runner = CheckRunner(dns_workers=4, verify_workers=1)
        try:
            results = await asyncio.gather(*(
                check_spf(resolver, "192.0.2.7", "a@example.com", "mx", runner=runner)
                for _ in range(10) for resolver in (ours, theirs)))
        finally:
            runner.close()
    assert [r.result for r in results] == ["pass", "fail"] * 10


async def test_spf_void_lookup_limit_kept(dns_server, resolver):
    """pyspf's RFC 7208 4.6.4 void-lookup limit survives our dns() override."""
    dns_server.txt("example.com", "v=spf1 a:n1.example.com a:n2.example.com "
                   "a:n3.example.com -all")
    result = await check_spf(resolver, "192.0.2.7", "a@example.com", "mx")
    assert result.result == "permerror" and "Void lookup limit" in result.reason


def test_rsa_adapters_are_installed_for_the_test_session():
    assert adapters.installed()
