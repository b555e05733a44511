"""Migrations: numbered SQL applied in order, once, even when two processes race."""

from __future__ import annotations

import asyncio

import asyncpg

from smtpd_agent.store.database import migrate, migration_files, pending_migrations


async def test_two_concurrent_migrators_apply_each_migration_once(database_url):
    first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        assert await pending_migrations(first) == [name for _, name, _ in migration_files()]
        applied = await asyncio.gather(migrate(first), migrate(second))
        # one of them did all the work; the other found nothing left to do
        assert sorted(map(len, applied)) == [0, len(migration_files())]
        versions = [r["version"] for r in
                    await first.fetch("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [version for version, _, _ in migration_files()]
        assert await pending_migrations(first) == []
        assert await migrate(first) == []
    finally:
        await first.close()
        await second.close()


def test_migration_files_have_unique_increasing_numbers():
    versions = [version for version, _, _ in migration_files()]
    assert versions == sorted(set(versions))
    assert versions[0] == 1
