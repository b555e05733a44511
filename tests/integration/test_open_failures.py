"""A start that fails part-way leaves no Postgres connection behind (runtime.Database.open).

A pool left open on a failed migration is only noticed when the collector finds its
connections, tests later, as an unraisable "unclosed" warning blamed on another test.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Awaitable
from pathlib import Path

import asyncpg
from smtpd_agent.runtime import Database
from tests.support import make_settings


async def failure_of(opening: Awaitable[object]) -> type[BaseException] | None:
    """The error's type only: a kept traceback would keep the failed frame's pool alive."""
    try:
        await opening
    except Exception as error:
        return type(error)
    return None


async def block_migration(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:  # a table in the way of migration 0001: the migration fails
        await connection.execute("CREATE TABLE workspaces (wrong_shape text)")
    finally:
        await connection.close()


def test_a_failed_migration_closes_the_pool(database_url: str, tmp_path: Path) -> None:
    """Its own event loop, closed before collecting: a connection left open stays
    registered with a running loop, and is garbage (and warns) only once the loop is gone."""
    asyncio.run(block_migration(database_url))
    settings = make_settings(database_url, tmp_path / "state")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert asyncio.run(failure_of(Database.open(settings))) is asyncpg.DuplicateTableError
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
