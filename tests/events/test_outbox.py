"""The outbox's contract (store/events.py) against the real Postgres: an event exists
exactly when its transaction committed, readers never pass an event that commits later,
a workspace reads only its own, and the NOTIFY at COMMIT wakes a waiter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from smtpd_agent.config import DatabaseSettings
from smtpd_agent.store import events, hooks
from smtpd_agent.store.changes import WEBHOOKS_CHANNEL, ChangeFeed
from smtpd_agent.store.database import create_pool, migrate
from smtpd_agent.store.directory import add_workspace
from smtpd_agent.store.events import EventType


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, DatabaseSettings(pool_max=4))
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()


async def test_an_event_exists_only_when_its_transaction_commits(pool: asyncpg.Pool) -> None:
    acme = await add_workspace(pool, "acme")
    async with pool.acquire() as connection:
        with pytest.raises(RuntimeError, match="outside a transaction"):
            await events.append(connection, acme.id, EventType.MESSAGE_RECEIVED, {})
        with pytest.raises(ZeroDivisionError):
            async with connection.transaction():
                await events.append(connection, acme.id, EventType.MESSAGE_RECEIVED, {"n": 1})
                raise ZeroDivisionError
        async with connection.transaction():
            kept = await events.append(connection, acme.id, EventType.MESSAGE_SENT, {"n": 2},
                                       thread_id=7)
    page = await events.after(pool, acme.id, 0, 10)
    assert [(e.id, e.type, e.payload, e.thread_id) for e in page] == \
        [(kept, "message.sent", {"n": 2}, 7)]
    assert page.events[0].event_id.startswith("evt_") and len(page.events[0].event_id) == 36
    assert not page.held


async def test_a_reader_never_passes_an_event_that_commits_later(pool: asyncpg.Pool) -> None:
    """The slow transaction takes the lower id but commits last: a reader paging by the
    last id it saw must still get it, once."""
    acme = await add_workspace(pool, "acme")
    async with pool.acquire() as slow, pool.acquire() as fast:
        slow_tx = slow.transaction()
        await slow_tx.start()
        low = await events.append(slow, acme.id, EventType.MESSAGE_RECEIVED, {"who": "slow"})
        async with fast.transaction():
            high = await events.append(fast, acme.id, EventType.MESSAGE_RECEIVED,
                                       {"who": "fast"})
        assert low < high
        page = await events.after(pool, acme.id, 0, 10)
        assert page.events == [] and page.held  # `fast` waits behind the open `slow`
        await slow_tx.commit()
    seen: list[str] = []
    cursor = 0
    while True:
        page = await events.after(pool, acme.id, cursor, 1)
        if not page.events:
            break
        seen += [e.payload["who"] for e in page]
        cursor = page.last_id or cursor
    assert sorted(seen) == ["fast", "slow"] and len(seen) == 2


async def test_a_workspace_reads_only_its_own_events(pool: asyncpg.Pool) -> None:
    acme = await add_workspace(pool, "acme")
    other = await add_workspace(pool, "other")
    async with pool.acquire() as connection, connection.transaction():
        mine = await events.append(connection, acme.id, EventType.DRAFT_CREATED, {})
        theirs = await events.append(connection, other.id, EventType.DRAFT_CREATED, {})
    assert [e.id for e in await events.after(pool, acme.id, 0, 10)] == [mine]
    assert [e.id for e in await events.after(pool, other.id, 0, 10)] == [theirs]
    # a cursor naming another workspace's event reveals nothing of it
    assert [e.id for e in await events.after(pool, other.id, mine, 10)] == [theirs]
    assert {e.id for e in await events.after(pool, None, 0, 10)} == {mine, theirs}
    assert [e.id for e in await events.after(pool, acme.id, 0, 10,
                                             types=["message.received"])] == []
    assert await events.last_id(pool, other.id) == theirs


async def test_commit_wakes_a_waiter_of_that_workspace_only(database_url: str,
                                                            pool: asyncpg.Pool) -> None:
    acme = await add_workspace(pool, "acme")
    other = await add_workspace(pool, "other")
    feed = ChangeFeed(database_url, 5)
    wakeups = events.Wakeups()
    wakeups.subscribe(feed)
    await feed.start()
    try:
        with wakeups.watch(acme.id) as mine, wakeups.watch(None) as everyone:
            mine.clear()
            everyone.clear()
            async with pool.acquire() as connection, connection.transaction():
                await events.append(connection, other.id, EventType.DRAFT_CREATED, {})
            await asyncio.wait_for(everyone.wait(), 5)
            assert not mine.is_set()
            async with pool.acquire() as connection, connection.transaction():
                await events.append(connection, acme.id, EventType.DRAFT_CREATED, {})
            await asyncio.wait_for(mine.wait(), 5)
    finally:
        await feed.close()


async def test_only_a_queued_webhook_delivery_wakes_the_delivery_workers(
        database_url: str, pool: asyncpg.Pool) -> None:
    """The webhook worker listens to deliveries, not to every event: under load every
    commit woke every process's worker to claim nothing (issue 20)."""
    acme = await add_workspace(pool, "acme")
    quiet = await add_workspace(pool, "quiet")
    endpoint = await hooks.create_endpoint(pool, acme.id, "https://hooks.example.com/in",
                                           ["draft.created"], True, None, b"sealed", 10)
    feed = ChangeFeed(database_url, 5)
    deliveries = events.Wakeups(WEBHOOKS_CHANNEL)
    deliveries.subscribe(feed)
    everything = events.Wakeups()
    everything.subscribe(feed)
    await feed.start()
    try:
        with deliveries.watch(None) as delivery, everything.watch(None) as event:
            # an event in a workspace without endpoints, and one of a type nobody wants
            for workspace, kind in ((quiet.id, EventType.DRAFT_CREATED),
                                    (acme.id, EventType.DOMAIN_VERIFIED)):
                delivery.clear()
                event.clear()
                async with pool.acquire() as connection, connection.transaction():
                    await events.append(connection, workspace, kind, {})
                await asyncio.wait_for(event.wait(), 5)
                # the feed hands out notifications in order: the event's came, so a
                # delivery's of the same commit would have come before it
                assert not delivery.is_set()
            async with pool.acquire() as connection, connection.transaction():
                wanted = await events.append(connection, acme.id, EventType.DRAFT_CREATED, {})
            await asyncio.wait_for(delivery.wait(), 5)
            delivery.clear()
            assert await hooks.replay_event(pool, acme.id, endpoint.id, wanted)
            await asyncio.wait_for(delivery.wait(), 5)
    finally:
        await feed.close()
