"""The per-client key that both listeners' limits count by (addresses.py)."""

from __future__ import annotations

import pytest

from smtpd_agent.addresses import client_key
from smtpd_agent.dnsserver import server as dns_server
from smtpd_agent.smtp import limits as smtp_limits


@pytest.mark.parametrize(("ip", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:DB8:1:2::FFFF", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("/run/smtp.sock", "/run/smtp.sock"),
    ("unknown", "unknown"),
])
def test_ipv4_is_its_address_and_ipv6_its_64(ip: str, key: str) -> None:
    assert client_key(ip) == key


def test_smtp_and_dns_limits_count_by_the_same_key() -> None:
    assert smtp_limits.client_key is client_key
    assert dns_server.client_key is client_key
