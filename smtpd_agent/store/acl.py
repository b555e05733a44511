"""Allow and block list entries in Postgres, and the lookups that enforce them.

`check()` answers for one (workspace, agent, direction, address) with one query;
`AclCache` keeps those answers for a short TTL for RCPT and DATA (as the router
caches mailboxes), bounded in size; the outbound queue asks the database itself,
inside the transaction that queues or sends. The rules are smtpd_agent.acl's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ..acl import (
    UNLISTED,
    AclAction,
    AclDecision,
    AclDirection,
    AclEntry,
    candidates,
    decide,
    normalize_pattern,
)
from .database import CONNECTION_ERRORS, DatabaseUnavailable

DbLike = asyncpg.Pool | asyncpg.Connection
MAX_CACHE_ENTRIES = 100_000


@dataclass(frozen=True)
class StoredEntry:
    id: int
    workspace: str
    agent: str | None
    action: str
    direction: str
    pattern: str
    note: str | None
    created_at: datetime


async def add_entry(db: DbLike, workspace_id: int, agent_id: int | None, action: AclAction,
                    direction: AclDirection, pattern: str, note: str | None = None) -> str:
    """Add (or change the action of) an entry; the normalized pattern. AclPatternError if bad."""
    normalized = normalize_pattern(pattern)
    await db.execute(
        """INSERT INTO acl_entries (workspace_id, agent_id, action, direction, pattern, note)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (workspace_id, coalesce(agent_id, 0), direction, pattern)
           DO UPDATE SET action = EXCLUDED.action, note = EXCLUDED.note,
                         created_at = now()""",
        workspace_id, agent_id, action.value, direction.value, normalized, note)
    return normalized


async def remove_entry(db: DbLike, workspace_id: int, agent_id: int | None,
                       direction: AclDirection, pattern: str,
                       action: AclAction | None = None) -> int:
    """Remove the scope's entry for `pattern` (of that action only, if given); how many."""
    status = await db.execute(
        """DELETE FROM acl_entries
            WHERE workspace_id = $1 AND agent_id IS NOT DISTINCT FROM $2 AND direction = $3
              AND pattern = $4 AND ($5::text IS NULL OR action = $5)""",
        workspace_id, agent_id, direction.value, normalize_pattern(pattern),
        action.value if action else None)
    return int(status.split()[-1])


async def list_entries(db: DbLike, workspace_id: int,
                       agent_id: int | None = None) -> list[StoredEntry]:
    """The workspace's entries (with an agent: the workspace's and that agent's)."""
    rows = await db.fetch(
        """SELECT e.id, w.slug AS workspace, a.handle AS agent, e.action, e.direction, e.pattern,
                  e.note, e.created_at
             FROM acl_entries e JOIN workspaces w ON w.id = e.workspace_id
             LEFT JOIN agents a ON a.id = e.agent_id AND a.workspace_id = e.workspace_id
            WHERE e.workspace_id = $1 AND ($2::bigint IS NULL OR e.agent_id IS NULL
                                           OR e.agent_id = $2)
            ORDER BY e.agent_id NULLS FIRST, e.direction, e.pattern""", workspace_id, agent_id)
    return [StoredEntry(**dict(row)) for row in rows]


def _directions(direction: AclDirection) -> list[str]:
    return [direction.value, AclDirection.BOTH.value]


async def check(db: DbLike, workspace_id: int, agent_id: int | None, direction: AclDirection,
                address: str) -> AclDecision:
    """The decision for `address` (an empty `address`, the null sender, matches nothing)."""
    wanted = candidates(address)
    rows = await db.fetch(
        """SELECT agent_id, action, pattern, false AS probe FROM acl_entries
            WHERE workspace_id = $1 AND (agent_id IS NULL OR agent_id = $2)
              AND direction = ANY($3::text[]) AND pattern = ANY($4::text[])
           UNION ALL
           (SELECT NULL, 'allow', '', true FROM acl_entries
             WHERE workspace_id = $1 AND (agent_id IS NULL OR agent_id = $2)
               AND direction = ANY($3::text[]) AND action = 'allow' LIMIT 1)""",
        workspace_id, agent_id, _directions(direction), wanted)
    entries = [AclEntry(AclAction(r["action"]), r["pattern"], r["agent_id"])
               for r in rows if not r["probe"]]
    return decide(address, entries, any(r["probe"] for r in rows))


class AclCache:
    """`check()` answers for receiving, kept `ttl` seconds: RCPT costs no round trip each time.

    Most workspaces have no receiving entries at all: that is asked once per workspace
    and TTL, so a new sender costs a query only where lists exist. Only answers that
    let mail in are kept: a refusal (550, permanent) always comes from the database as
    it is now, so a removed entry never refuses from the cache; an added one takes
    effect within `ttl`.
    """

    def __init__(self, db: asyncpg.Pool, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._ttl = ttl
        self._clock = clock
        self._listed: dict[int, tuple[float, bool]] = {}
        self._cache: dict[tuple[int, int, str], tuple[float, AclDecision]] = {}

    async def receiving(self, workspace_id: int, agent_id: int, sender: str) -> AclDecision:
        """May `sender` mail this agent? DatabaseUnavailable when Postgres is away."""
        key = (workspace_id, agent_id, sender.strip().strip("<>").lower())
        now = self._clock()
        try:
            listed = self._listed.get(workspace_id)
            if listed is None or listed[0] <= now:
                listed = (now + self._ttl, bool(await self._db.fetchval(
                    """SELECT EXISTS (SELECT 1 FROM acl_entries WHERE workspace_id = $1
                                        AND direction = ANY($2::text[]))""",
                    workspace_id, _directions(AclDirection.RECEIVE))))
                if len(self._listed) >= MAX_CACHE_ENTRIES:
                    self._listed.clear()
                self._listed[workspace_id] = listed
            if not listed[1]:
                return UNLISTED
            cached = self._cache.get(key)
            if cached and cached[0] > now:
                return cached[1]
            decision = await check(self._db, workspace_id, agent_id, AclDirection.RECEIVE,
                                   key[2])
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(str(error)) from error
        if decision.refused:
            return decision
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[key] = (now + self._ttl, decision)
        return decision

    def invalidate(self) -> None:
        self._listed.clear()
        self._cache.clear()
