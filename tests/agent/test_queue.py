"""The job queue's guarantees at the SQL level: leases, tokens, release on stop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from smtpd_agent.agent import jobs
from smtpd_agent.agent.caps import Caps
from smtpd_agent.agent.compose import Original, compose_reply
from smtpd_agent.agent.llm import Completion
from smtpd_agent.config import DatabaseSettings
from smtpd_agent.store.database import create_pool
from tests.agent.conftest import add_acme, agent_overrides
from tests.agent.helpers import deliver, mail
from tests.messages_api import Step

# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(60)

CAPS = Caps(5, 200, 500, 2000, 100)


async def test_a_worker_that_lost_its_lease_cannot_store_a_reply(start_server, db, database_url,
                                                                 messages_api):
    server = start_server(**agent_overrides(messages_api, **{"agent.workers": 0}))
    await add_acme(db)
    deliver(server.port, mail())
    pool = await create_pool(database_url, DatabaseSettings(pool_max=2))
    try:
        slow = await jobs.claim(pool, "slow-worker", 0.2)
        assert slow is not None and await jobs.claim(pool, "other", 0.2) is None  # leased
        await asyncio.sleep(0.3)
        fast = await jobs.claim(pool, "fast-worker", 30)
        assert fast is not None and fast.id == slow.id and fast.attempts == 2
        assert fast.lease_token != slow.lease_token
        reply = compose_reply(Original("<m@example.org>", (), "s"), None,
                              "support@acme.agents.test", "alice@example.org", "hi",
                              datetime.now(UTC))
        usage = Completion("hi", "m", 1, 1, 1)
        lost = await jobs.store_reply(pool, slow, reply, usage, CAPS)
        assert (lost.stored, lost.reason) == (False, "lease lost")
        assert not await jobs.fail(pool, slow, "too late")
        won = await jobs.store_reply(pool, fast, reply, usage, CAPS)
        assert won.stored
    finally:
        await pool.close()
    job = await db.fetchrow("SELECT * FROM agent_jobs")
    assert (job["status"], job["worker"], job["reply_message_id"]) == ("done", "fast-worker",
                                                                       won.reply_id)
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'outbound'") == 1


async def test_stopping_server_gives_its_job_back(start_server, db, messages_api):
    server = start_server(**agent_overrides(messages_api, **{"agent.workers": 1}))
    await add_acme(db)
    messages_api.queue(Step("slow", delay=30.0))
    deliver(server.port, mail())
    messages_api.wait_for_requests(1)
    await asyncio.to_thread(server.stop)
    job = await db.fetchrow("SELECT status, attempts, lease_token, run_at <= now() AS due "
                            "FROM agent_jobs")
    assert dict(job) == {"status": "pending", "attempts": 0, "lease_token": None, "due": True}
    assert await db.fetchval("SELECT count(*) FROM messages WHERE direction = 'outbound'") == 0
