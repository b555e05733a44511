"""Where Postgres is, the connection pool, and the migrations.

Numbered files in migrations/ hold tables and data, applied once each; the
composite types (rows.py) and the functions (one per file in functions/) are
applied again whenever their text changes, after the numbered files.

With `DATABASE_URL` set we use that server. Without it an embedded Postgres
(the pgserver wheel) lives in `<state_dir>/pgdata`; pgserver keeps a list of
the processes using it, so `smtpd-agent inbox` run beside a running `serve`
attaches to the same postmaster instead of starting a second one, and the
last process to leave stops it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from ..config import DatabaseSettings
from .rows import ROW_TYPES

log = structlog.get_logger(__name__)

EMBEDDED_DATABASE = "smtpd_agent"
# pg_advisory_lock key: "smtpd-agent migrations" folded into a bigint.
MIGRATION_LOCK = 0x736D74706461676E

# Errors that mean "the server went away", after which a fresh connection may work.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


class DatabaseUnavailable(RuntimeError):
    """Postgres could not be reached or failed mid-transaction; the caller answers 4xx."""


@dataclass
class EmbeddedPostgres:
    """A handle on the pgserver instance in a state directory."""

    pgdata: Path
    server: Any

    @classmethod
    def start(cls, state_dir: Path) -> EmbeddedPostgres:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        state_dir.mkdir(parents=True, exist_ok=True)
        pgdata = (state_dir / "pgdata").resolve()
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        if EMBEDDED_DATABASE not in server.psql("SELECT datname FROM pg_database;"):
            server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
        return cls(pgdata=pgdata, server=server)

    @property
    def url(self) -> str:
        return self.server.get_uri(EMBEDDED_DATABASE)

    def release(self) -> None:
        """Drop our handle; pgserver stops the postmaster when no process holds one."""
        self.server.cleanup()


def resolve_database_url(settings: DatabaseSettings, state_dir: Path) -> tuple[str, EmbeddedPostgres | None]:
    if settings.url:
        return settings.url, None
    embedded = EmbeddedPostgres.start(state_dir)
    log.info("database.embedded", pgdata=str(embedded.pgdata))
    return embedded.url, embedded


def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + json.dumps(value).encode()


def _decode_jsonb(data: bytes) -> Any:
    return json.loads(data[1:])


async def init_connection(connection: asyncpg.Connection) -> None:
    """What every connection of ours needs: the pool runs it on each new connection."""
    # Binary (jsonb's wire format: version 1, then the text), because asyncpg encodes a
    # composite value (store_inbound_batch's rows) only when every field codec is binary.
    await connection.set_type_codec("jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb,
                                    schema="pg_catalog", format="binary")


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query (a round trip per release, on the hot path).

    Nothing here leaves session state on a pooled connection: no SET, LISTEN runs
    on connections of its own, advisory locks are transaction-scoped or unlocked
    in a finally; an open transaction is still rolled back by asyncpg itself.
    """


async def create_pool(url: str, settings: DatabaseSettings) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url,
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
        init=init_connection,
        reset=_keep_session,
    )


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every numbered SQL file, in order: tables and data."""
    folder = resources.files("smtpd_agent.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text()))
    found.sort()
    for (version, first, _), (again, second, _) in zip(found, found[1:]):
        if version == again:
            # schema_migrations is keyed by the number: the second file would never run.
            raise RuntimeError(f"two migrations numbered {version:04d}: {first}, {second}")
    return found


@dataclass(frozen=True)
class Repeatable:
    """A type or function, defined in one place and (re)applied whenever its text changes."""

    kind: str  # "type" or "function"
    name: str
    sql: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def repeatables() -> list[Repeatable]:
    """The composite types (from the field lists in rows.py), then one function per file."""
    found = [Repeatable("type", row_type.name, row_type.ddl()) for row_type in ROW_TYPES]
    folder = resources.files("smtpd_agent.store") / "functions"
    functions = sorted((entry.name, entry.read_text()) for entry in folder.iterdir()
                       if entry.name.endswith(".sql"))
    found += [Repeatable("function", name.removesuffix(".sql"), sql) for name, sql in functions]
    return found


async def migrate(connection: asyncpg.Connection) -> list[str]:
    """Apply pending migrations, then changed types and functions; safe to run twice and
    from two processes at once. The names of the versioned migrations applied."""
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await connection.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())""")
        applied = {row["version"] for row in
                   await connection.fetch("SELECT version FROM schema_migrations")}
        done = []
        for version, name, sql in migration_files():
            if version in applied:
                continue
            async with connection.transaction():
                await connection.execute(sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            log.info("database.migrated", migration=name)
            done.append(name)
        await _apply_repeatables(connection)
        return done
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def _applied_digests(connection: asyncpg.Connection) -> dict[str, str]:
    if not await connection.fetchval("SELECT to_regclass('schema_repeatables') IS NOT NULL"):
        return {}
    return {row["name"]: row["sha256"] for row in
            await connection.fetch("SELECT name, sha256 FROM schema_repeatables")}


async def _apply_repeatables(connection: asyncpg.Connection) -> None:
    """Flyway's "repeatable" migrations, after the versioned ones, in one transaction.

    A changed type is dropped and created again; that drops the functions taking
    it (CASCADE), so then every function is applied again. A changed function
    first loses every overload of its name, so a new signature leaves no stale one;
    with CASCADE, so a trigger function's file creates its triggers as well.
    """
    await connection.execute(
        """CREATE TABLE IF NOT EXISTS schema_repeatables (
               name       text PRIMARY KEY,
               sha256     text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())""")
    applied = await _applied_digests(connection)
    items = repeatables()
    changed = [item for item in items if applied.get(item.key) != item.digest]
    if not changed:
        return
    if any(item.kind == "type" for item in changed):
        changed = [item for item in items
                   if item.kind == "function" or applied.get(item.key) != item.digest]
    async with connection.transaction():
        for item in changed:
            if item.kind == "type":
                await connection.execute(f"DROP TYPE IF EXISTS {item.name} CASCADE")
            else:
                for (signature,) in await connection.fetch(
                        """SELECT p.oid::regprocedure::text FROM pg_proc p
                            WHERE p.proname = $1
                              AND p.pronamespace = current_schema()::regnamespace""",
                        item.name):
                    await connection.execute(f"DROP FUNCTION {signature} CASCADE")
            await connection.execute(item.sql)
            await connection.execute(
                """INSERT INTO schema_repeatables (name, sha256) VALUES ($1, $2)
                   ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256,
                                                    applied_at = now()""",
                item.key, item.digest)
            log.info("database.repeatable_applied", repeatable=item.key)


async def pending_migrations(connection: asyncpg.Connection) -> list[str]:
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = set()
    if exists:
        applied = {row["version"] for row in
                   await connection.fetch("SELECT version FROM schema_migrations")}
    return [name for version, name, _ in migration_files() if version not in applied]


async def pending_repeatables(connection: asyncpg.Connection) -> list[str]:
    """Types and functions whose text differs from what the database last applied."""
    applied = await _applied_digests(connection)
    return [item.key for item in repeatables() if applied.get(item.key) != item.digest]
