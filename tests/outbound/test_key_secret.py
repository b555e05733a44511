"""A host whose DKIM key secret (domains.key_file) is not the one the keys were sealed with
cannot sign: its reply is given back to the queue, never failed and never sent unsigned, and a
host with the right secret sends it. (Before: the reply failed for good on the first host that
picked it up.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from smtpd_agent.domains import Domains
from smtpd_agent.store.database import migrate
from tests.agent.helpers import parse
from tests.support import make_settings

from .conftest import fast, make_agent, store_reply

pytestmark = pytest.mark.timeout(60)


async def test_a_host_with_another_secret_gives_the_reply_back(
        start_server, database_url: str, db: asyncpg.Connection, relay, tmp_path: Path) -> None:
    sink, url = relay
    right, wrong = tmp_path / "cluster.secret", tmp_path / "own.secret"
    await migrate(db)
    # The default domain's keys, made by a host with the cluster's secret.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await Domains.open(pool, make_settings(database_url, tmp_path / "maker", **{
            "domains.key_file": str(right)})).default_record_set()
    finally:
        await pool.close()
    start_server(**fast(url, **{"domains.key_file": str(wrong), "outbound.retry_base": 0.2}))
    agent = await make_agent(db)
    message_id = await store_reply(db, agent, "alice@example.org")

    async def released() -> asyncpg.Record | None:
        row = await db.fetchrow("SELECT status, attempts FROM deliveries WHERE message_id = $1",
                                message_id)
        return row if row is not None and row["status"] == "deferred" else None
    for _ in range(200):
        if row := await released():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the delivery was not given back")
    assert row["attempts"] == 0  # released untried: not an attempt
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", message_id) != "failed"
    assert sink.received == []

    start_server(**fast(url, **{"domains.key_file": str(right)}))
    [received] = await asyncio.to_thread(sink.wait_for, 1)
    assert len(parse(received.data).get_all("DKIM-Signature")) == 2
