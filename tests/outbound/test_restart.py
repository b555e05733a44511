"""The queue survives SIGKILL: replies queued (and mid-attempt) when `serve` is killed are
delivered after it starts again, and none is delivered twice."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

import asyncpg
import pytest

from smtpd_agent.outbound.queue import enqueue
from tests.support import DEFAULT_DOMAIN, ServeProcess

from .conftest import make_agent, store_reply

FIRST, QUEUED = 4, 12


# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(120)


async def states(db: asyncpg.Connection) -> Counter[str]:
    return Counter(row["status"] for row in await db.fetch("SELECT status FROM deliveries"))


async def test_kill_9_loses_no_queued_reply_and_sends_none_twice(
        database_url, db, dns_server, relay, tmp_path):
    sink, url = relay
    env = {"DATABASE_URL": database_url, "SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": DEFAULT_DOMAIN,
           "SMTPD_AGENT_DNS_NAMESERVERS": dns_server.nameserver, "SMTPD_AGENT_DNS_TIMEOUT": "0.5",
           "SMTPD_AGENT_OUTBOUND_RELAY": url, "SMTPD_AGENT_OUTBOUND_POLL_INTERVAL": "0.05",
           "SMTPD_AGENT_OUTBOUND_RETRY_BASE": "0.2", "SMTPD_AGENT_OUTBOUND_RETRY_MAX": "0.4",
           "SMTPD_AGENT_OUTBOUND_LEASE": "1.5", "SMTPD_AGENT_OUTBOUND_TIMEOUT": "5"}
    server = ServeProcess(env, tmp_path / "state").start()
    try:
        agent = await make_agent(db)
        # delivered before the kill: must not go again after it
        for index in range(FIRST):
            await store_reply(db, agent, f"early{index}@example.org")
        await asyncio.to_thread(sink.wait_for, FIRST)
        # the relay now answers 451, slowly: the rest stay queued, one attempt always in flight
        sink.rcpt_delay = 0.1
        sink.script = ["451 4.3.0 try again later"] * 100_000
        for index in range(QUEUED):
            async with db.transaction():
                message_id = await store_reply(db, agent, f"queued{index}@example.org")
                if index % 2:
                    await enqueue(db, message_id)  # the rest wait for the worker's sweep
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tried = await db.fetchval("SELECT count(*) FROM deliveries WHERE attempts > 0 "
                                      "AND status <> 'sent'")
            if tried == QUEUED and (await states(db))["sending"]:
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(server.kill)
        at_kill = await states(db)
        assert at_kill["sent"] == FIRST and at_kill["sending"] >= 1, at_kill
        assert len(sink.received) == FIRST
        # the relay is well again; a new process picks the queue up (and the stale lease)
        sink.script.clear()
        sink.rcpt_delay = 0.0
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(sink.wait_for, FIRST + QUEUED, 60)
        deadline = time.monotonic() + 60
        while (await states(db))["sent"] < FIRST + QUEUED and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await states(db) == Counter({"sent": FIRST + QUEUED})
        await asyncio.sleep(1.0)  # anything sent twice would arrive now
        ids = Counter(re.search(rb"^Message-ID: (\S+)", r.data, re.M | re.I).group(1)
                      for r in sink.received)
        assert len(ids) == FIRST + QUEUED and set(ids.values()) == {1}, ids
    finally:
        server.stop()
