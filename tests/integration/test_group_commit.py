"""Group commit against a real Postgres: batches share one transaction, a bad message
fails alone, a sender that goes away does not stop the commit, and a message for two
mailboxes is stored for both or neither."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from structlog.testing import capture_logs

from smtpd_agent.config import DatabaseSettings
from smtpd_agent.message import parse_message
from smtpd_agent.record import Envelope, InboundMessage, Mailbox, Recipient
from smtpd_agent.store import directory
from smtpd_agent.store.database import DatabaseUnavailable, create_pool, migrate
from smtpd_agent.store.messages import GroupCommit, StoreRefused, Verdicts
from tests.support import DEFAULT_DOMAIN

VERDICTS = Verdicts(spf="pass", dkim="pass", dmarc="pass", arc="none", scan_status="skipped",
                    auth_detail={"spf": "pass"})


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, DatabaseSettings(pool_max=4))
    async with pool.acquire() as connection:
        await migrate(connection)
    await directory.add_workspace(pool, "acme")
    for handle in ("support", "sales"):
        await directory.add_agent(pool, "acme", handle)
    yield pool
    await pool.close()


async def mailbox(pool: asyncpg.Pool, handle: str) -> Mailbox:
    agent = await directory.get_agent(pool, "acme", handle)
    return Mailbox(agent.workspace_id, "acme", agent.id, handle, f"acme.{DEFAULT_DOMAIN}",
                   auto_reply=True)


def inbound(index: int, *mailboxes: Mailbox) -> InboundMessage:
    raw = (f"From: Alice <alice{index}@example.org>\r\nTo: support@acme.{DEFAULT_DOMAIN}\r\n"
           f"Subject: question {index}\r\nMessage-ID: <q{index}@example.org>\r\n\r\n"
           f"Body {index}\r\n").encode()
    envelope = Envelope("s", "127.0.0.1", "client.test", f"alice{index}@example.org",
                        tuple(Recipient(m.address, m) for m in mailboxes))
    return InboundMessage(envelope, raw, parse_message(raw))


async def test_concurrent_messages_share_transactions(pool):
    support = await mailbox(pool, "support")
    store = GroupCommit(pool, 30, batch_max=32, committers=1)
    results = await asyncio.gather(*(store.store(inbound(i, support), VERDICTS, f"q{i}")
                                     for i in range(40)))
    assert all(len(r) == 1 and not r[0].duplicate for r in results)
    assert await pool.fetchval("SELECT count(*) FROM messages") == 40
    # Rows written by one statement carry its transaction id.
    transactions = await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM messages")
    assert transactions < 40
    # Each message still got its own agent job and thread, committed with it.
    assert await pool.fetchval("SELECT count(*) FROM agent_jobs") == 40
    assert await pool.fetchval("SELECT count(*) FROM threads WHERE message_count = 1") == 40


async def test_batch_of_one_is_the_whole_message(pool):
    support, sales = await mailbox(pool, "support"), await mailbox(pool, "sales")
    store = GroupCommit(pool, 30, batch_max=1, committers=1)
    [first, second] = await store.store(inbound(1, support, sales), VERDICTS, "q1")
    assert {first.mailbox.handle, second.mailbox.handle} == {"support", "sales"}
    again = await store.store(inbound(1, support, sales), VERDICTS, "q1-retry")
    assert [s.duplicate for s in again] == [True, True]
    assert await pool.fetchval("SELECT count(*) FROM messages") == 2


async def test_a_bad_message_fails_alone(pool):
    support = await mailbox(pool, "support")
    missing = Mailbox(support.workspace_id, "acme", 999_999, "ghost", support.domain)
    store = GroupCommit(pool, 30, batch_max=32, committers=1)
    outcomes = await asyncio.gather(
        *(store.store(inbound(i, missing if i == 5 else support), VERDICTS, f"q{i}")
          for i in range(12)), return_exceptions=True)
    failed = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)]
    assert failed == [5]
    assert isinstance(outcomes[5], DatabaseUnavailable)
    assert await pool.fetchval("SELECT count(*) FROM messages") == 11


async def test_a_message_for_two_mailboxes_is_stored_for_both_or_neither(pool):
    support = await mailbox(pool, "support")
    missing = Mailbox(support.workspace_id, "acme", 999_999, "ghost", support.domain)
    store = GroupCommit(pool, 30, batch_max=32, committers=1)
    with pytest.raises(DatabaseUnavailable):
        await store.store(inbound(1, support, missing), VERDICTS, "q1")
    assert await pool.fetchval("SELECT count(*) FROM messages") == 0


async def test_a_sender_that_goes_away_does_not_stop_the_commit(pool):
    support = await mailbox(pool, "support")
    store = GroupCommit(pool, 30, batch_max=32, committers=1)
    waiting = [asyncio.create_task(store.store(inbound(i, support), VERDICTS, f"q{i}"))
               for i in range(10)]
    await asyncio.sleep(0)
    waiting[0].cancel()
    waiting[7].cancel()
    done = await asyncio.gather(*waiting, return_exceptions=True)
    assert sum(isinstance(d, asyncio.CancelledError) for d in done) == 2
    # Stored all the same: the sender will retry and find it (deduplicated).
    assert await pool.fetchval("SELECT count(*) FROM messages") == 10


async def test_an_outage_fails_the_batch_without_trying_each_message(pool, closed_port):
    """Unreachable Postgres fails every waiting sender alike (4xx, they retry); storing
    them one by one would only make each wait for its own failed connection attempts."""
    support = await mailbox(pool, "support")
    unreachable = await create_pool(f"postgresql://postgres@127.0.0.1:{closed_port}/x",
                                    DatabaseSettings(pool_min=0, pool_max=4))
    store = GroupCommit(unreachable, 30, batch_max=32, committers=1)
    try:
        with capture_logs() as events:
            outcomes = await asyncio.gather(
                *(store.store(inbound(i, support), VERDICTS, f"q{i}") for i in range(10)),
                return_exceptions=True)
    finally:
        await unreachable.close()
    assert all(isinstance(o, DatabaseUnavailable) and not isinstance(o, StoreRefused)
               for o in outcomes), outcomes
    assert [e for e in events if e["event"] == "store.batch_failed"] == []


async def _store_while_locked(pool: asyncpg.Pool, overlap_after: float) -> tuple[int, int]:
    """Message 0 starts a commit that waits on a lock held elsewhere; messages 1-9 arrive
    meanwhile. Store statements waiting on the lock 0.5 s later, and transactions that
    stored messages 1-9 once the lock is gone."""
    support = await mailbox(pool, "support")
    store = GroupCommit(pool, 30, batch_max=32, committers=2, overlap_after=overlap_after)
    async with pool.acquire() as blocker, blocker.transaction():
        # INSERT takes ROW EXCLUSIVE on raw_messages: this holds it off
        await blocker.execute("LOCK TABLE raw_messages IN SHARE MODE")
        first = asyncio.create_task(store.store(inbound(0, support), VERDICTS, "q0"))
        await asyncio.sleep(0.1)
        rest = [asyncio.create_task(store.store(inbound(i, support), VERDICTS, f"q{i}"))
                for i in range(1, 10)]
        await asyncio.sleep(0.5)
        waiting = await blocker.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE wait_event_type = 'Lock' AND query LIKE '%store_inbound_batch%'""")
    await asyncio.wait_for(asyncio.gather(first, *rest), 60)
    transactions = await pool.fetchval(
        """SELECT count(DISTINCT xmin::text) FROM messages
            WHERE message_id <> '<q0@example.org>'""")
    return waiting, transactions


async def test_a_second_committer_waits_for_the_first_to_be_slow(pool):
    """store.commit_overlap: messages arriving during a commit make the next batch; only
    when one has waited longer than the overlap does a second commit start beside it."""
    assert await _store_while_locked(pool, overlap_after=30.0) == (1, 1)


async def test_a_slow_commit_has_the_next_batch_go_beside_it(pool):
    waiting, _ = await _store_while_locked(pool, overlap_after=0.05)
    assert waiting == 2
