"""SQL defined once: row types match their Python field lists in the catalog; functions
live in files of their own and are re-applied when their text changes; a database
migrated by the old versioned files ends up with exactly the current definitions."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg
from structlog.testing import capture_logs

from smtpd_agent.store.database import (
    migrate,
    migration_files,
    pending_repeatables,
    repeatables,
)
from smtpd_agent.store.rows import ROW_TYPES
from tests.support import migrate_until


async def test_row_types_match_the_python_field_lists(database_url):
    connection = await asyncpg.connect(database_url)
    try:
        await migrate(connection)
        for row_type in ROW_TYPES:
            catalog = await connection.fetch(
                """SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type
                     FROM pg_attribute a JOIN pg_type t ON t.typrelid = a.attrelid
                    WHERE t.typname = $1 AND a.attnum > 0 AND NOT a.attisdropped
                    ORDER BY a.attnum""", row_type.name)
            expected = [(name, {"integer": "integer", "boolean": "boolean",
                                "timestamptz": "timestamp with time zone"}.get(sql, sql))
                        for name, sql in row_type.fields]
            assert [(r["attname"], r["type"]) for r in catalog] == expected, row_type.name
    finally:
        await connection.close()


async def test_each_function_is_defined_once_by_its_own_file(database_url):
    connection = await asyncpg.connect(database_url)
    try:
        await migrate(connection)
        names = [item.name for item in repeatables() if item.kind == "function"]
        assert {"store_message", "store_inbound_message", "store_inbound_batch"} <= set(names)
        overloads = await connection.fetch(
            """SELECT proname, count(*) AS n FROM pg_proc
                WHERE proname = ANY($1::text[])
                  AND pronamespace = current_schema()::regnamespace GROUP BY proname""", names)
        assert {r["proname"]: r["n"] for r in overloads} == {name: 1 for name in names}
        # no versioned migration after 0008 defines a function: those live in functions/
        for version, name, sql in migration_files():
            if version > 8:
                assert "CREATE FUNCTION" not in sql.upper().replace("OR REPLACE ", ""), name
    finally:
        await connection.close()


async def test_a_changed_function_is_applied_again(database_url):
    connection = await asyncpg.connect(database_url)
    try:
        await migrate(connection)
        assert await pending_repeatables(connection) == []
        # as if the file had changed since: the database holds another digest
        await connection.execute(
            "UPDATE schema_repeatables SET sha256 = 'old' WHERE name = 'function:store_message'")
        await connection.execute("DROP FUNCTION store_message")
        assert await pending_repeatables(connection) == ["function:store_message"]
        with capture_logs() as events:
            assert await migrate(connection) == []
        assert [e["repeatable"] for e in events
                if e["event"] == "database.repeatable_applied"] == ["function:store_message"]
        assert await connection.fetchval("SELECT to_regproc('store_message') IS NOT NULL")
        digest = hashlib.sha256(next(i.sql for i in repeatables()
                                     if i.key == "function:store_message").encode()).hexdigest()
        assert await connection.fetchval(
            "SELECT sha256 FROM schema_repeatables WHERE name = 'function:store_message'") == digest
    finally:
        await connection.close()


async def test_concurrent_migrators_apply_each_repeatable_once(database_url):
    first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        with capture_logs() as events:
            await asyncio.gather(migrate(first), migrate(second))
        applied = [e["repeatable"] for e in events if e["event"] == "database.repeatable_applied"]
        assert sorted(applied) == sorted(item.key for item in repeatables())
        assert await pending_repeatables(second) == []
    finally:
        await first.close()
        await second.close()


async def test_a_database_migrated_by_the_old_files_is_upgraded(database_url):
    """A deployment at migration 0008 (46-parameter store_inbound_message, raw bytes in
    each message row) keeps its mail and ends with the current functions only."""
    connection = await asyncpg.connect(database_url)
    try:
        await migrate_until(connection, 8)
        old = await connection.fetchval(
            "SELECT pronargs FROM pg_proc WHERE proname = 'store_inbound_message'")
        assert old == 46
        workspace = await connection.fetchval(
            "INSERT INTO workspaces (slug, name) VALUES ('acme', 'Acme') RETURNING id")
        agent = await connection.fetchval(
            "INSERT INTO agents (workspace_id, handle) VALUES ($1, 'support') RETURNING id",
            workspace)
        thread = await connection.fetchval(
            """INSERT INTO threads (workspace_id, agent_id, message_count) VALUES ($1, $2, 2)
               RETURNING id""", workspace, agent)
        raw = b"Subject: kept\r\n\r\nthe same bytes twice\r\n"
        for key in ("a", "b"):
            await connection.execute(
                """INSERT INTO messages (workspace_id, agent_id, thread_id, direction, dedup_key,
                                         raw, size)
                   VALUES ($1, $2, $3, 'inbound', $4, $5, $6)""",
                workspace, agent, thread, key, raw, len(raw))
        await connection.execute(
            """INSERT INTO agent_jobs (workspace_id, agent_id, thread_id, message_id)
               SELECT workspace_id, agent_id, thread_id, id FROM messages WHERE dedup_key = 'a'""")

        assert await migrate(connection) == [name for version, name, _ in migration_files()
                                             if version > 8]
        assert await connection.fetchval(
            "SELECT pronargs FROM pg_proc WHERE proname = 'store_inbound_message'") == 4
        assert [bytes(r["raw"]) for r in await connection.fetch(
            "SELECT m.raw FROM messages m ORDER BY id")] == [raw, raw]
        assert await connection.fetchval("SELECT count(*) FROM raw_messages") == 1
        job = await connection.fetchrow("SELECT status, run_at <= now() AS due FROM agent_jobs")
        assert dict(job) == {"status": "pending", "due": True}
    finally:
        await connection.close()
