"""Search indexed after the COMMIT (migration 0021, store/search.py, mailbox/indexer.py):
every stored message is queued in its own transaction, indexers take disjoint batches,
nothing is searchable before it is indexed, and the migration keeps existing vectors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from smtpd_agent.config import DatabaseSettings
from smtpd_agent.store import directory, search
from smtpd_agent.store.database import create_pool, migrate
from smtpd_agent.store.mailbox import search as search_messages
from smtpd_agent.store.messages import GroupCommit
from tests.http.test_api import deliver, message
from tests.integration.test_group_commit import VERDICTS, inbound, mailbox
from tests.support import migrate_until, wait_searchable

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, DatabaseSettings(pool_max=6))
    async with pool.acquire() as connection:
        await migrate(connection)
    await directory.add_workspace(pool, "acme")
    await directory.add_workspace(pool, "globex")
    await directory.add_agent(pool, "acme", "support")
    await directory.add_agent(pool, "globex", "support")
    yield pool
    await pool.close()


async def workspace_id(pool: asyncpg.Pool, slug: str) -> int:
    return await pool.fetchval("SELECT id FROM workspaces WHERE slug = $1", slug)


async def test_stored_mail_is_queued_and_searchable_only_once_indexed(pool):
    support = await mailbox(pool, "support")
    store = GroupCommit(pool, 30, batch_max=32, committers=1)
    stored = await asyncio.gather(*(store.store(inbound(i, support), VERDICTS, f"q{i}")
                                    for i in range(12)))
    ids = sorted(s.id for batch in stored for s in batch)
    # queued by the transaction that stored them; nothing searchable yet
    assert [r["message_id"] for r in await pool.fetch(
        "SELECT message_id FROM search_queue ORDER BY 1")] == ids
    acme = await workspace_id(pool, "acme")
    assert await search_messages(pool, acme, "question", None, 50) == []
    # a batch smaller than the queue takes the oldest first; the rest stays queued
    assert await search.index_pending(pool, 5) == 5
    assert await pool.fetchval("SELECT count(*) FROM search_queue") == 7
    assert sorted(r["id"] for r in await search_messages(pool, acme, "question", None, 50)) \
        == ids[:5]
    assert await search.index_pending(pool, 500) == 7
    assert await search.index_pending(pool, 500) == 0
    found = await search_messages(pool, acme, "question", None, 50)
    assert sorted(r["id"] for r in found) == ids
    # every vector row names the message's workspace; the other workspace finds nothing
    assert await pool.fetchval(
        """SELECT count(*) FROM message_search s JOIN messages m ON m.id = s.message_id
            WHERE s.workspace_id <> m.workspace_id""") == 0
    assert await search_messages(pool, await workspace_id(pool, "globex"), "question",
                                 None, 50) == []


async def test_a_batch_that_does_not_commit_leaves_its_mail_queued(pool):
    """An indexer that dies mid-batch (here: its transaction rolls back) has taken nothing:
    the next one indexes the same messages."""
    support = await mailbox(pool, "support")
    store = GroupCommit(pool, 30, batch_max=32, committers=1)
    await asyncio.gather(*(store.store(inbound(i, support), VERDICTS, f"q{i}")
                           for i in range(3)))
    async with pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        assert await search.index_pending(connection, 500) == 3
        await transaction.rollback()
    assert await pool.fetchval("SELECT count(*) FROM search_queue") == 3
    assert await pool.fetchval("SELECT count(*) FROM message_search") == 0
    assert await search.index_pending(pool, 500) == 3
    assert await pool.fetchval("SELECT count(*) FROM message_search") == 3


async def test_concurrent_indexers_take_disjoint_batches(pool):
    support = await mailbox(pool, "support")
    store = GroupCommit(pool, 30, batch_max=32, committers=2)
    await asyncio.gather(*(store.store(inbound(i, support), VERDICTS, f"q{i}")
                           for i in range(120)))
    taken: list[int] = []

    async def indexer() -> None:
        while count := await search.index_pending(pool, 7):
            taken.append(count)

    await asyncio.gather(*(indexer() for _ in range(4)))
    assert sum(taken) == 120
    assert await pool.fetchval("SELECT count(*) FROM message_search") == 120
    assert await pool.fetchval("SELECT count(*) FROM search_queue") == 0


async def test_the_server_indexes_mail_after_its_250(start_server, db):
    server = start_server()
    await directory.add_workspace(db, "acme")
    await directory.add_agent(db, "acme", "support")
    assert await asyncio.to_thread(deliver, server.port, message("ocelot sighting")) == 250
    await wait_searchable(db)
    acme = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
    [hit] = await search_messages(db, acme, "ocelot", None, 10)
    assert hit["subject"] == "ocelot sighting"


async def test_migration_0021_keeps_the_vectors_of_stored_mail(database_url):
    """A database at migration 0020 (search as a generated column) with mail in it:
    after 0021 the same mail is found, without being queued again."""
    connection = await asyncpg.connect(database_url)
    try:
        await migrate_until(connection, 20)
        workspace = await connection.fetchval(
            "INSERT INTO workspaces (slug, name) VALUES ('acme', 'Acme') RETURNING id")
        agent = await connection.fetchval(
            "INSERT INTO agents (workspace_id, handle) VALUES ($1, 'support') RETURNING id",
            workspace)
        thread = await connection.fetchval(
            "INSERT INTO threads (workspace_id, agent_id, subject) VALUES ($1, $2, 'old') "
            "RETURNING id", workspace, agent)
        await connection.execute(
            "INSERT INTO raw_messages (workspace_id, sha256, size, content) "
            "VALUES ($1, '\\x00', 1, 'x')", workspace)
        message_id = await connection.fetchval(
            """INSERT INTO messages (workspace_id, agent_id, thread_id, direction, dedup_key,
                                     subject, text_body, raw_sha256, size)
               VALUES ($1, $2, $3, 'inbound', 'k1', 'old', 'a capybara crossed', '\\x00', 1)
               RETURNING id""", workspace, agent, thread)
        await migrate(connection)
        assert await connection.fetchval("SELECT count(*) FROM search_queue") == 0
        [hit] = await search_messages(connection, workspace, "capybara", None, 10)
        assert hit["id"] == message_id
        assert await connection.fetchval(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'messages' AND column_name = 'search'") == 0
    finally:
        await connection.close()
