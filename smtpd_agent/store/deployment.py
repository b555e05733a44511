"""The deployment's identity in the database: its default domain, and the hosts that served it.

Place: the store, read by the management commands (cli_common.py) and checked by every
server at start (app.py). The default domain decides every workspace's address
(<handle>@<workspace>.<default domain>); a command that silently used another one would
print wrong addresses and refuse right ones, so a disagreement is an error that names
both values, and the change itself is an explicit command.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ..config import ConfigError

SET_DOMAIN = "smtpd-agent deployment set-domain"


@dataclass(frozen=True)
class Identity:
    default_domain: str
    recorded_at: datetime
    changed_at: datetime | None
    hosts: tuple[tuple[str, datetime], ...] = ()


class DeploymentMismatch(ConfigError):
    """This process was given a default domain other than the one the database records."""

    def __init__(self, recorded: str, given: str, where: str) -> None:
        self.recorded = recorded
        self.given = given
        super().__init__(
            f"this database belongs to the deployment with default domain {recorded!r}, "
            f"but {where} {given!r}. Use {recorded!r} (leave out --default-domain, or set "
            f"server.default_domain = \"{recorded}\"), or change the deployment's domain on "
            f"purpose with `{SET_DOMAIN} {given}` (every workspace's addresses move to "
            f"<workspace>.{given}).")


Db = asyncpg.Pool | asyncpg.Connection


async def recorded(db: Db) -> Identity | None:
    row = await db.fetchrow("SELECT default_domain, recorded_at, changed_at FROM deployment")
    if row is None:
        return None
    hosts = await db.fetch(
        "SELECT hostname, last_started_at FROM deployment_hosts ORDER BY last_started_at DESC")
    return Identity(row["default_domain"], row["recorded_at"], row["changed_at"],
                    tuple((h["hostname"], h["last_started_at"]) for h in hosts))


async def record(db: Db, default_domain: str) -> str:
    """Record `default_domain` unless one is recorded already; the recorded one either way
    (two servers starting at once on an empty database agree on the first)."""
    await db.execute("INSERT INTO deployment (default_domain) VALUES ($1) "
                     "ON CONFLICT (singleton) DO NOTHING", default_domain)
    value: str = await db.fetchval("SELECT default_domain FROM deployment")
    return value


async def claim(db: Db, default_domain: str, hostname: str, where: str) -> None:
    """A server starting: record the identity if there is none, refuse a different one, and
    note this host's greeting name."""
    domain = await record(db, default_domain)
    if domain != default_domain:
        raise DeploymentMismatch(domain, default_domain, where)
    await db.execute(
        """INSERT INTO deployment_hosts (hostname) VALUES ($1)
           ON CONFLICT (hostname) DO UPDATE SET last_started_at = now()""", hostname)


async def set_domain(pool: asyncpg.Pool, default_domain: str) -> str | None:
    """Change (or first record) the default domain on purpose; the previous one."""
    async with pool.acquire() as connection, connection.transaction():
        previous: str | None = await connection.fetchval(
            "SELECT default_domain FROM deployment FOR UPDATE")
        await connection.execute(
            """INSERT INTO deployment (default_domain) VALUES ($1)
               ON CONFLICT (singleton) DO UPDATE SET default_domain = EXCLUDED.default_domain,
                                                     changed_at = now()""", default_domain)
    return previous
