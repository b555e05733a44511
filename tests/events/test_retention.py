"""Retention (events/retention.py, store/retention.py) against the real Postgres: old
events and finished webhook deliveries go, in batches; young rows and every event a
delivery still needs stay; one pruner at a time per database; an SSE client resuming
after a deleted id is told it missed events; `serve` runs the pruning on its own."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import asyncpg
import pytest
from structlog.testing import capture_logs

from smtpd_agent.config import DatabaseSettings, RetentionSettings
from smtpd_agent.events.retention import Pruner
from smtpd_agent.metrics import Metrics
from smtpd_agent.store import events, retention
from smtpd_agent.store.database import create_pool, migrate
from smtpd_agent.store.directory import add_workspace
from smtpd_agent.store.events import EventType
from tests.agent.test_whom_to_write import cli
from tests.events.test_stream import Reader, events_url
from tests.http.test_api import bearer

pytestmark = pytest.mark.timeout(120)

SMALL_BATCHES = RetentionSettings(events_days=30, webhook_delivered_days=7,
                                  webhook_failed_days=30, batch_size=2, batch_pause=0.0)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, DatabaseSettings(pool_max=4))
    async with pool.acquire() as connection:
        await migrate(connection)
    yield pool
    await pool.close()


async def append(db: asyncpg.Pool | asyncpg.Connection, workspace_id: int, n: int) -> int:
    async with events.transaction(db) as connection:
        return await events.append(connection, workspace_id, EventType.DRAFT_CREATED,
                                   {"n": n, "text": "x" * 2000})


async def age(db: asyncpg.Pool | asyncpg.Connection, days: int, *ids: int) -> None:
    await db.execute("UPDATE events SET created_at = now() - make_interval(days => $1) "
                     "WHERE id = ANY($2::bigint[])", days, list(ids))


async def finish(db: asyncpg.Pool, event_id: int, status: str, days_ago: int) -> None:
    await db.execute(
        """UPDATE webhook_deliveries
              SET status = $2,
                  finished_at = CASE WHEN $2 IN ('delivered', 'failed')
                                     THEN now() - make_interval(days => $3) END
            WHERE event_id = $1""", event_id, status, days_ago)


def deleted(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("smtpd_agent_retention_deleted_total",
                                             {"kind": kind}) or 0.0


def passes(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("smtpd_agent_retention_passes_total",
                                             {"outcome": outcome}) or 0.0


async def test_old_rows_go_young_rows_and_needed_events_stay(pool, database_url):
    acme = (await add_workspace(pool, "acme")).id
    other = (await add_workspace(pool, "other")).id
    # ids grow with time, as in life: the pruner walks them in id order
    endpoint = await pool.fetchval(
        """INSERT INTO webhook_endpoints (workspace_id, url, secret, enabled)
           VALUES ($1, 'https://hooks.example.org/in', '\\x00'::bytea, false) RETURNING id""",
        acme)
    # while the endpoint is off: events no delivery refers to
    plain_old = [await append(pool, acme, n) for n in range(3)]
    other_old = await append(pool, other, 4)
    await pool.execute("UPDATE webhook_endpoints SET enabled = true WHERE id = $1", endpoint)
    # from here each acme event gets a delivery (fan_out_webhooks.sql)
    pending, sending, delivered_old, failed_mid, failed_old, delivered_new = \
        [await append(pool, acme, n) for n in range(10, 16)]
    assert await pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 6
    await pool.execute("UPDATE webhook_endpoints SET enabled = false WHERE id = $1", endpoint)
    young = await append(pool, acme, 3)
    await finish(pool, sending, "sending", 0)
    await finish(pool, delivered_old, "delivered", 10)
    await finish(pool, failed_mid, "failed", 10)
    await finish(pool, failed_old, "failed", 40)
    await finish(pool, delivered_new, "delivered", 1)
    await pool.execute(
        """INSERT INTO webhook_attempts (workspace_id, delivery_id, attempt, started_at,
                                         duration_ms, outcome)
           SELECT workspace_id, id, 1, now(), 5, 'delivered' FROM webhook_deliveries
            WHERE event_id = $1""", delivered_old)
    await age(pool, 40, *plain_old, other_old, pending, sending, delivered_old, failed_mid,
              failed_old, delivered_new)
    await age(pool, 29, young)

    metrics = Metrics()
    with capture_logs() as logs:
        result = await Pruner(database_url, SMALL_BATCHES, metrics).run_once()
    [logged] = [entry for entry in logs if entry["event"] == "retention.pruned"]
    assert (logged["events"], logged["webhook_deliveries_delivered"],
            logged["webhook_deliveries_failed"]) == (6, 1, 1)

    gone = {*plain_old, other_old, delivered_old, failed_old}
    kept = {young, pending, sending, failed_mid, delivered_new}
    assert set(await pool.fetchval("SELECT array_agg(id) FROM events")) == kept
    assert set(await pool.fetchval("SELECT array_agg(event_id) FROM webhook_deliveries")) == \
        {pending, sending, failed_mid, delivered_new}
    assert await pool.fetchval("SELECT count(*) FROM webhook_attempts") == 0
    assert (result.ran, result.events, result.delivered, result.failed) == (True, 6, 1, 1)
    assert result.kept_for_deliveries == 4  # pending, sending, failed_mid, delivered_new
    assert deleted(metrics, "events") == 6
    assert deleted(metrics, "webhook_deliveries_delivered") == 1
    assert deleted(metrics, "webhook_deliveries_failed") == 1
    assert passes(metrics, "done") == 1
    # the newest id deleted, per workspace: what the SSE stream compares a cursor with
    assert await retention.pruned_through(pool, acme) == max(gone - {other_old})
    assert await retention.pruned_through(pool, other) == other_old

    # a second pass finds nothing more; the marks never go down
    again = await Pruner(database_url, SMALL_BATCHES, metrics).run_once()
    assert (again.events, again.delivered, again.failed) == (0, 0, 0)
    assert await pool.fetchval("SELECT count(*) FROM events") == len(kept)
    assert await retention.pruned_through(pool, acme) == max(gone - {other_old})

    # once the pending delivery has been delivered and aged out, its event goes too
    await finish(pool, pending, "delivered", 8)
    third = await Pruner(database_url, SMALL_BATCHES, metrics).run_once()
    assert (third.events, third.delivered) == (1, 1)
    assert await pool.fetchval("SELECT count(*) FROM events WHERE id = $1", pending) == 0


async def test_zero_days_keeps_forever(pool, database_url):
    acme = (await add_workspace(pool, "acme")).id
    old = await append(pool, acme, 1)
    await age(pool, 3000, old)
    forever = RetentionSettings(events_days=0, webhook_delivered_days=0, webhook_failed_days=0)
    result = await Pruner(database_url, forever, Metrics()).run_once()
    assert not result.ran
    assert await pool.fetchval("SELECT count(*) FROM events") == 1


async def test_the_prune_command_runs_one_pass(pool, database_url):
    """`smtpd-agent prune`, as cron or an operator runs it: the same pass serve runs."""
    acme = (await add_workspace(pool, "acme")).id
    old, young = await append(pool, acme, 1), await append(pool, acme, 2)
    await age(pool, 31, old)
    result = await asyncio.to_thread(cli, database_url, "prune")
    assert "deleted 1 events, 0 delivered and 0 failed" in result.stdout, result.stdout
    assert await pool.fetchval("SELECT array_agg(id) FROM events") == [young]
    # with retention off it says so and deletes nothing
    await age(pool, 31, young)
    off = {f"SMTPD_AGENT_RETENTION_{key}": "0"
           for key in ("EVENTS_DAYS", "WEBHOOK_DELIVERED_DAYS", "WEBHOOK_FAILED_DAYS")}
    kept = await asyncio.to_thread(cli, database_url, "prune", env=off)
    assert "keeps everything" in kept.stdout, kept.stdout
    assert await pool.fetchval("SELECT array_agg(id) FROM events") == [young]


async def test_one_pruner_at_a_time(pool, database_url):
    """Another node holding the pruning lock: this one skips its pass and deletes nothing;
    once the lock is free it prunes. Two started at once delete each row once."""
    acme = (await add_workspace(pool, "acme")).id
    old = [await append(pool, acme, n) for n in range(6)]
    await age(pool, 40, *old)
    metrics = Metrics()
    async with pool.acquire() as other_node:
        assert await retention.try_lock(other_node)
        try:
            result = await Pruner(database_url, SMALL_BATCHES, metrics).run_once()
        finally:
            await retention.unlock(other_node)
    assert not result.ran and passes(metrics, "skipped") == 1
    assert await pool.fetchval("SELECT count(*) FROM events") == 6

    slow = RetentionSettings(events_days=30, batch_size=1, batch_pause=0.05)
    first, second = await asyncio.gather(Pruner(database_url, slow, metrics).run_once(),
                                         Pruner(database_url, slow, metrics).run_once())
    assert first.ran or second.ran
    assert first.events + second.events == 6
    assert await pool.fetchval("SELECT count(*) FROM events") == 0
    assert deleted(metrics, "events") == 6
    # the lock went with the pass: a later pass runs
    assert (await Pruner(database_url, slow, metrics).run_once()).ran


async def metric(http, server, name: str, labels: str = "") -> float:
    async with http.get(f"{server.http_url}/metrics") as response:
        text = await response.text()
    found = re.search(rf"^{re.escape(name + labels)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_a_client_resuming_after_deleted_events_is_told_it_missed_some(
        server, keys, http, db, database_url):
    acme = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
    first, second, third, fourth = [await append(db, acme, n) for n in range(4)]
    await age(db, 40, first, second)
    result = await Pruner(database_url, RetentionSettings(), Metrics()).run_once()
    assert result.events == 2

    async with http.get(events_url(server), headers={**bearer(keys.acme),
                                                     "Last-Event-ID": str(first)}) as r:
        assert r.status == 200
        reader = Reader(r)
        gap, *rest = await reader.take(3)
    assert (gap.event, gap.id) == ("gap", None)
    assert gap.body == {"type": "gap", "last_event_id": first, "pruned_through": second,
                        "retention_days": 30}
    assert [(e.id, e.event) for e in rest] == [(third, "draft.created"),
                                               (fourth, "draft.created")]
    # ?after= is a cursor as well
    async with http.get(events_url(server, query=f"?after={second - 1}"),
                        headers=bearer(keys.acme)) as r:
        gap, after = await Reader(r).take(2)
    assert gap.event == "gap" and after.id == third

    # resuming after the newest deleted id, or asking for everything kept: no gap
    for headers, query in (({"Last-Event-ID": str(second)}, ""), ({}, "?after=0")):
        async with http.get(events_url(server, query=query),
                            headers={**bearer(keys.acme), **headers}) as r:
            seen = await Reader(r).take(2)
        assert [e.id for e in seen] == [third, fourth], (headers, query)
    assert await metric(http, server, "smtpd_agent_event_stream_gaps_total") == 2

    # the mark is per workspace: globex lost nothing
    async with http.get(events_url(server, "globex"),
                        headers={**bearer(keys.globex), "Last-Event-ID": str(first)}) as r:
        globex = Reader(r)
        with pytest.raises(TimeoutError):
            await globex.next(timeout=1.0)
    assert await metric(http, server, "smtpd_agent_event_stream_gaps_total") == 2


async def test_serve_prunes_on_its_own(start_server, db, http):
    """The service of `serve`: with a short interval, an aged event disappears and the
    pass is counted and logged; a young one stays."""
    server = start_server(**{"retention.interval": 0.5, "retention.events_days": 7})
    workspace = await add_workspace(db, "acme")
    old = await append(db, workspace.id, 1)
    young = await append(db, workspace.id, 2)
    await age(db, 8, old)
    async with asyncio.timeout(60):
        while await db.fetchval("SELECT count(*) FROM events WHERE id = $1", old):
            await asyncio.sleep(0.2)
    assert await db.fetchval("SELECT count(*) FROM events WHERE id = $1", young) == 1
    async with asyncio.timeout(60):
        while await metric(http, server, "smtpd_agent_retention_deleted_total",
                           '{kind="events"}') < 1:
            await asyncio.sleep(0.2)
    assert await metric(http, server, "smtpd_agent_retention_passes_total",
                        '{outcome="done"}') >= 1
