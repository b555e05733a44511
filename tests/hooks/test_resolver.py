"""The delivery client's resolver against the DNS server on loopback: only addresses the
policy admits come back, so the connection can only go to one of them."""

from __future__ import annotations

import pytest

from smtpd_agent.config import DnsSettings
from smtpd_agent.dns import Resolver
from smtpd_agent.hooks.targets import AddressRefused, GuardedResolver, Policy


def guarded(dns_server, policy: Policy = Policy()) -> GuardedResolver:
    return GuardedResolver(Resolver(DnsSettings(nameservers=[dns_server.nameserver],
                                                timeout=2)), policy)


async def test_a_name_with_public_and_private_addresses_gets_the_public_ones_only(dns_server):
    dns_server.a("mixed.hooks.test", "93.184.215.14", "10.0.0.1", "169.254.169.254",
                 "2606:4700::1111", "fd00::1")
    results = await guarded(dns_server).resolve("mixed.hooks.test", 443)
    assert sorted(r["host"] for r in results) == ["2606:4700::1111", "93.184.215.14"]
    assert all(r["port"] == 443 and r["hostname"] == "mixed.hooks.test" for r in results)


async def test_a_name_with_only_refused_addresses_is_refused_with_the_reasons(dns_server):
    dns_server.a("inside.hooks.test", "127.0.0.1", "192.168.1.1")
    with pytest.raises(AddressRefused, match="127.0.0.1 is a loopback address; "
                                             "192.168.1.1 is a private address"):
        await guarded(dns_server).resolve("inside.hooks.test", 443)
    loopback = await guarded(dns_server, Policy(allow_loopback=True)).resolve(
        "inside.hooks.test", 443)
    assert [r["host"] for r in loopback] == ["127.0.0.1"]


async def test_no_address_is_an_error_not_a_fallback(dns_server):
    with pytest.raises(OSError, match="has no address"):
        await guarded(dns_server).resolve("nothing.hooks.test", 443)
