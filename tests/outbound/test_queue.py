"""The queue's claims against real Postgres: SKIP LOCKED hands each delivery to one claimer,
an expired lease is claimed again, and the late finisher's record is refused."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest

from smtpd_agent.outbound import queue
from smtpd_agent.outbound.decisions import Next, RecipientResult
from smtpd_agent.store.database import migrate

from .conftest import make_agent, store_reply


# Every wait in here is bounded; a hang fails this test, not the run.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def pool(database_url, db):
    await migrate(db)
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=6)
    yield pool
    await pool.close()


async def test_concurrent_claims_never_share_a_delivery(pool, db):
    agent = await make_agent(db)
    for index in range(30):
        async with db.transaction():
            await queue.enqueue(db, await store_reply(db, agent, f"r{index}@example.org"))
    batches = await asyncio.gather(*(queue.claim(pool, 7, 60) for _ in range(6)))
    ids = [d.id for batch in batches for d in batch]
    assert len(ids) == 30 and len(set(ids)) == 30
    assert await queue.claim(pool, 10, 60) == []


async def test_an_expired_lease_is_claimed_again_and_the_late_record_refused(pool, db):
    agent = await make_agent(db)
    async with db.transaction():
        message_id = await store_reply(db, agent, "bob@example.org")
        assert await queue.enqueue(db, message_id) == await queue.enqueue(db, message_id)
    [first] = await queue.claim(pool, 1, 0.05)
    await asyncio.sleep(0.1)
    [second] = await queue.claim(pool, 1, 60)
    assert (first.id, first.attempts, second.attempts) == (second.id, 1, 2)
    sent = [RecipientResult("bob@example.org", 250, "2.0.0", "ok", "data")]
    with pytest.raises(queue.LeaseLost):
        await queue.finish_attempt(pool, first, datetime.now(UTC), "smtp", sent, Next("sent"),
                                   None, None)
    await queue.finish_attempt(pool, second, datetime.now(UTC), "smtp", sent, Next("sent"),
                               "Q1", None)
    row = await db.fetchrow("SELECT status, provider_message_id FROM deliveries WHERE id = $1",
                            second.id)
    assert tuple(row) == ("sent", "Q1")
    assert await db.fetchval("SELECT count(*) FROM delivery_attempts") == 1
