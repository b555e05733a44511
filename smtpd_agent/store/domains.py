"""Custom domains: which workspace a domain belongs to, and whether it is verified.

Queries only; the record sets and checks live in `smtpd_agent.domains`. Every
statement that changes or reads one domain is scoped by its workspace_id too,
so a bug elsewhere cannot flip another tenant's domain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeAlias

import asyncpg

from . import events
from .directory import DirectoryError, get_workspace
from .events import EventType

DbLike: TypeAlias = asyncpg.Pool | asyncpg.Connection
State = Literal["pending", "verified", "degraded"]
# RFC 1035 2.3.1 host names, at least two labels, a letter first in the last one
DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+"
                    r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")

# pg_advisory_xact_lock key: domains that nest inside delegated zones are checked one at a time
NESTING_LOCK = 0x646F6D6E657374

COLUMNS = """d.id, d.workspace_id, w.slug AS workspace_slug, d.name, d.state, d.ownership_token,
             d.mail_from, d.verified_at, d.checked_at, d.failing, d.created_at, d.delegated,
             d.zone_serial"""


@dataclass(frozen=True)
class Domain:
    id: int
    workspace_id: int
    workspace_slug: str
    name: str
    state: State
    ownership_token: str
    mail_from: str
    verified_at: datetime | None
    checked_at: datetime | None
    failing: list[str]
    created_at: datetime
    delegated: bool = False
    zone_serial: int = 1

    @property
    def receives(self) -> bool:
        """Only a domain verified once takes mail; a degraded one keeps taking it (its
        records broke after setup: we warn, the mail that still arrives is the customer's)."""
        return self.verified_at is not None and self.state in ("verified", "degraded")


def normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


async def add_domain(db: DbLike, workspace_slug: str, name: str, token: str,
                     mail_from: str, delegated: bool = False) -> Domain:
    name = normalize(name)
    if not DOMAIN.match(name):
        raise DirectoryError(f"invalid domain {name!r}")
    workspace = await get_workspace(db, workspace_slug)
    await db.execute("SELECT pg_advisory_xact_lock($1)", NESTING_LOCK)
    conflict = await db.fetchrow(
        """SELECT d.name, d.delegated FROM domains d
           WHERE d.workspace_id <> $2
             AND ((d.delegated AND $1 LIKE '%.' || d.name)
                  OR ($3 AND d.name LIKE '%.' || $1))
           LIMIT 1""", name, workspace.id, delegated)
    if conflict is not None:
        # Our DNS server answers for a delegated zone's whole subtree; a zone of another
        # workspace inside or around it would let one tenant speak for another's names.
        raise DirectoryError(
            f"domain {name!r} is inside another workspace's delegated domain "
            f"{conflict['name']!r}" if name.endswith("." + conflict["name"]) else
            f"domain {name!r} contains another workspace's domain {conflict['name']!r}")
    parent = name.partition(".")[2]
    if delegated and "." not in parent:
        # the ownership proof of a delegated domain is published in its parent zone
        raise DirectoryError(f"{name!r} cannot be delegated: its parent {parent!r} is a "
                             f"top-level domain; delegate a subdomain such as 'mail.{name}'")
    try:
        await db.execute(
            """INSERT INTO domains (workspace_id, name, ownership_token, mail_from, delegated)
               VALUES ($1, $2, $3, $4, $5)""", workspace.id, name, token, mail_from, delegated)
    except asyncpg.UniqueViolationError:
        raise DirectoryError(f"domain {name!r} is already registered") from None
    found = await find_domain(db, name)
    assert found is not None
    return found


async def find_domain(db: DbLike, name: str) -> Domain | None:
    row = await db.fetchrow(
        f"""SELECT {COLUMNS} FROM domains d JOIN workspaces w ON w.id = d.workspace_id
            WHERE d.name = $1""", normalize(name))
    return Domain(**dict(row)) if row else None


async def get_domain(db: DbLike, name: str) -> Domain:
    domain = await find_domain(db, name)
    if domain is None:
        raise DirectoryError(f"no domain {normalize(name)!r}: add it with "
                             "`smtpd-agent domain add <domain> --workspace <slug>`")
    return domain


async def list_domains(db: DbLike, workspace_slug: str | None = None) -> list[Domain]:
    rows = await db.fetch(
        f"""SELECT {COLUMNS} FROM domains d JOIN workspaces w ON w.id = d.workspace_id
            WHERE $1::text IS NULL OR w.slug = $1 ORDER BY w.slug, d.name""",
        workspace_slug.lower() if workspace_slug else None)
    return [Domain(**dict(row)) for row in rows]


async def receives_for(db: DbLike, workspace_id: int, name: str) -> bool:
    """True when `name` is a custom domain of the workspace that receives mail (an agent
    may answer from its address there)."""
    return bool(await db.fetchval(
        """SELECT EXISTS (SELECT 1 FROM domains WHERE name = $1 AND workspace_id = $2
                            AND state IN ('verified', 'degraded'))""", name, workspace_id))


async def verified_domains(db: DbLike) -> list[Domain]:
    """Domains the periodic re-check watches: those that receive mail."""
    rows = await db.fetch(
        f"""SELECT {COLUMNS} FROM domains d JOIN workspaces w ON w.id = d.workspace_id
            WHERE d.verified_at IS NOT NULL ORDER BY d.checked_at NULLS FIRST, d.name""")
    return [Domain(**dict(row)) for row in rows]


async def record_check(db: DbLike, domain: Domain, failing: list[str]) -> Domain:
    """Store a check's outcome: all pass -> verified; a failure -> degraded once verified.
    A change of state to verified or degraded is announced (domain.verified,
    domain.degraded) in the same transaction; a re-check that changes nothing is not."""
    async with events.transaction(db) as connection:
        before = await connection.fetchval(
            "SELECT state FROM domains WHERE id = $1 AND workspace_id = $2 FOR UPDATE",
            domain.id, domain.workspace_id)
        row = await connection.fetchrow(
            f"""WITH updated AS (
                    UPDATE domains SET
                        state = CASE WHEN cardinality($3::text[]) = 0 THEN 'verified'
                                     WHEN verified_at IS NULL THEN 'pending'
                                     ELSE 'degraded' END,
                        verified_at = CASE WHEN cardinality($3::text[]) = 0
                                           THEN coalesce(verified_at, now())
                                           ELSE verified_at END,
                        checked_at = now(),
                        failing = $3
                    WHERE id = $1 AND workspace_id = $2
                    RETURNING *)
                SELECT {COLUMNS} FROM updated d JOIN workspaces w ON w.id = d.workspace_id""",
            domain.id, domain.workspace_id, failing)
        if row is None:
            raise DirectoryError(f"domain {domain.name!r} was removed")
        updated = Domain(**dict(row))
        if updated.state != before and updated.state in STATE_EVENTS:
            await events.append(connection, updated.workspace_id, STATE_EVENTS[updated.state], {
                "workspace": updated.workspace_slug,
                "domain": {"id": updated.id, "name": updated.name, "state": updated.state,
                           "previous_state": before, "failing": list(updated.failing),
                           "verified_at": _iso(updated.verified_at),
                           "checked_at": _iso(updated.checked_at)}})
        return updated


STATE_EVENTS = {"verified": EventType.DOMAIN_VERIFIED, "degraded": EventType.DOMAIN_DEGRADED}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


async def remove_domain(db: DbLike, domain: Domain) -> None:
    await db.execute("DELETE FROM domains WHERE id = $1 AND workspace_id = $2",
                     domain.id, domain.workspace_id)


async def delegated_zone_names(db: DbLike) -> set[str]:
    """Every zone the DNS server is authoritative for (any state: a pending delegated zone
    answers its SOA and NS, or `domain check` could never see the delegation work)."""
    return {row["name"] for row in await db.fetch("SELECT name FROM domains WHERE delegated")}


async def bump_zone_serial(db: DbLike, domain: Domain, zone_hash: str) -> int:
    """The zone's SOA serial: bumped when its content (hash) differs from the last load.

    Conditional, so several DNS hosts loading the same change bump it once.
    """
    serial = await db.fetchval(
        """UPDATE domains SET zone_serial = zone_serial + 1, zone_hash = $3
           WHERE id = $1 AND workspace_id = $2 AND zone_hash IS DISTINCT FROM $3
           RETURNING zone_serial""", domain.id, domain.workspace_id, zone_hash)
    if serial is None:
        serial = await db.fetchval(
            "SELECT zone_serial FROM domains WHERE id = $1 AND workspace_id = $2",
            domain.id, domain.workspace_id)
    if serial is None:
        raise DirectoryError(f"domain {domain.name!r} was removed")
    return int(serial)
