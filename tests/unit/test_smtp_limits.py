"""Connection limits by IPv4 address or IPv6 /64, shared across processes (smtp/limits.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from smtpd_agent.smtp.limits import (LIVENESS_TTL, ConnectionLimits, CounterTable, DataBudget,
                                     client_key)


@pytest.mark.parametrize("ip, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:DB8:1:2::FFFF", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("/run/smtp.sock", "/run/smtp.sock"),
])
def test_client_key(ip, key):
    assert client_key(ip) == key


def test_one_ipv6_slash_64_shares_one_limit():
    limits = ConnectionLimits(total=100, per_ip=2)
    assert limits.acquire("2001:db8::1") and limits.acquire("2001:db8::ffff:2")
    assert not limits.acquire("2001:db8::3:4:5:6"), "a third address of the same /64"
    assert limits.acquire("2001:db8:0:1::1"), "the next /64 is another client"
    assert limits.acquire("192.0.2.1") and limits.acquire("192.0.2.2")
    limits.release("2001:db8::1")
    assert limits.acquire("2001:db8::7")
    assert limits.open_total == 5


def test_the_total_counts_every_client():
    limits = ConnectionLimits(total=3, per_ip=10)
    assert all(limits.acquire(f"192.0.2.{n}") for n in range(3))
    assert not limits.acquire("198.51.100.1")


def test_data_budget():
    budget = DataBudget(limit=1000, free=100)
    assert budget.reserve(600) and not budget.reserve(401) and budget.reserve(400)
    budget.release(1000)
    assert budget.used == 0 and DataBudget(limit=0).reserve(10**12)


CHILD = """
import sys, time
from smtpd_agent.smtp.limits import ConnectionLimits, CounterTable
fd, slot = map(int, sys.argv[1:3])
limits = ConnectionLimits(100, 3, CounterTable.attach(fd, slot))
assert limits.acquire("2001:db8::1") and limits.acquire("2001:db8::2")
print("holding", flush=True)
time.sleep(60)
"""


def test_another_process_counts_until_it_dies():
    table = CounterTable.create(slots=2)
    limits = ConnectionLimits(total=100, per_ip=3, table=table)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(table.fd), "1"],
                             stdout=subprocess.PIPE, pass_fds=(table.fd,))
    try:
        assert child.stdout is not None and child.stdout.readline() == b"holding\n"
        assert limits.open_total == 2
        assert limits.acquire("2001:db8::3")
        assert not limits.acquire("2001:db8::4"), "the other process's two count here"
        with pytest.raises(OSError):
            CounterTable.attach(table.fd, 1)  # a live process has that row
        child.kill()
        child.wait()
        time.sleep(LIVENESS_TTL + 0.1)
        assert limits.open_total == 1
        assert limits.acquire("2001:db8::4")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        table.close()
