"""Fixtures for the agent stage: the local Messages API, a server whose workers use it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest

from smtpd_agent.store import directory
from tests.dnsserver import DnsTestServer
from tests.messages_api import API_KEY, MessagesAPI
from tests.support import ServerThread

SYSTEM_PROMPT = "You are the support agent of Acme Inc. Be brief."


def publish_spf(dns: DnsTestServer, *domains: str) -> None:
    """SPF for mail from the tests' loopback client: without a DMARC record, an aligned SPF
    pass is what lets the agent answer such a sender at all (agent/policy.py)."""
    for domain in domains:
        dns.txt(domain, "v=spf1 ip4:127.0.0.1 -all")


@pytest.fixture(autouse=True)
def authenticated_senders(dns_server: DnsTestServer) -> None:
    """example.org, the helpers' default sender, authenticates by SPF (no DMARC record)."""
    publish_spf(dns_server, "example.org")


@pytest.fixture
def messages_api() -> Iterator[MessagesAPI]:
    with MessagesAPI() as api:
        yield api


def agent_overrides(api: MessagesAPI, **overrides: Any) -> dict[str, Any]:
    """Fast, bounded agent settings for tests, reaching the local API through the real SDK."""
    values: dict[str, Any] = {
        "agent.api_key": API_KEY,
        "agent.base_url": api.base_url,
        "agent.workers": 2,
        "agent.poll_interval": 0.05,
        "agent.timeout": 5.0,
        "agent.lease": 6.0,
        "agent.backoff_base": 0.3,
        "agent.backoff_max": 2.0,
        "agent.max_attempts": 3,
    }
    values.update(overrides)
    return values


async def add_acme(db: asyncpg.Connection) -> None:
    await directory.add_workspace(db, "acme", "Acme Inc")
    await directory.add_agent(db, "acme", "support", display_name="Acme Support",
                              system_prompt=SYSTEM_PROMPT)
    await directory.add_agent(db, "acme", "sales")


@pytest.fixture
async def agent_server(start_server: Callable[..., ServerThread], db: asyncpg.Connection,
                       messages_api: MessagesAPI) -> ServerThread:
    running = start_server(**agent_overrides(messages_api))
    await add_acme(db)
    return running
