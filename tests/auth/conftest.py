"""Fixtures for the authentication tests: a real DNS server on loopback and our resolver on it.

The server lives for the whole session (starting and stopping its threads per
test would dominate the run time); each test gets an empty zone and a fresh
resolver, so neither records nor cached answers leak between tests.
"""

from __future__ import annotations


import pytest

from smtpd_agent.config import AuthSettings, DnsSettings
from smtpd_agent.dns import Resolver

from tests.dnsserver import DnsTestServer

from tests.support import TEST_DNS_TIMEOUT


@pytest.fixture
def dns_settings(dns_server: DnsTestServer) -> DnsSettings:
    return DnsSettings(nameservers=[dns_server.nameserver], timeout=TEST_DNS_TIMEOUT,
                       cache_size=1000)


@pytest.fixture
def resolver(dns_settings: DnsSettings) -> Resolver:
    return Resolver(dns_settings)


@pytest.fixture
def auth_settings() -> AuthSettings:
    return AuthSettings(authserv_id="mx.test.example")


@pytest.fixture(scope="session")
def rsa2048():
    from .keys import rsa_key
    return rsa_key(2048)


@pytest.fixture(scope="session")
def ed25519():
    from .keys import ed25519_key
    return ed25519_key()
