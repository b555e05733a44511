"""Workspaces and agents: who has a mailbox here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

SLUG = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Labels under the default domain that the server itself uses (bounces/VERP, the
# Mail-From subdomain, MTA-STS, mail client autoconfiguration): never a workspace.
RESERVED_SLUGS = frozenset({"bounce", "mail", "mta-sts", "autoconfig", "autodiscover", "www"})
HANDLE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")


class ReplyMode(StrEnum):
    """What the built-in agent does with inbound mail: answer, write a draft, or nothing."""

    AUTO = "auto"
    DRAFT = "draft"
    OFF = "off"


class DirectoryError(ValueError):
    """A workspace or agent request that cannot be honoured (bad name, duplicate, missing)."""


@dataclass(frozen=True)
class Workspace:
    id: int
    slug: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class Agent:
    id: int
    workspace_id: int
    workspace_slug: str
    handle: str
    display_name: str | None
    system_prompt: str | None
    auto_reply: bool
    enabled: bool
    created_at: datetime
    reply_mode: str = ReplyMode.AUTO.value


# The operator workspace (migration 0003) owns the default domain's DKIM keys; it is no
# customer's: never listed, never found by slug, never holding a mailbox.
WORKSPACE_COLUMNS = "id, slug, name, created_at"

AGENT_COLUMNS = """a.id, a.workspace_id, w.slug AS workspace_slug, a.handle, a.display_name,
                   a.system_prompt, a.auto_reply, a.enabled, a.created_at,
                   a.reply_mode"""


async def add_workspace(db: asyncpg.Pool | asyncpg.Connection, slug: str, name: str | None = None) -> Workspace:
    slug = slug.lower()
    if not SLUG.match(slug):
        raise DirectoryError(f"invalid workspace slug {slug!r}: use a-z, 0-9 and '-', "
                             "not at either end, at most 63 characters")
    if slug in RESERVED_SLUGS:
        raise DirectoryError(f"workspace slug {slug!r} is reserved: {slug}.<default domain> "
                             "is one of the server's own names")
    try:
        row = await db.fetchrow(
            f"INSERT INTO workspaces (slug, name) VALUES ($1, $2) RETURNING {WORKSPACE_COLUMNS}", slug, name or slug)
    except asyncpg.UniqueViolationError:
        raise DirectoryError(f"workspace {slug!r} already exists") from None
    return Workspace(**dict(row))


async def list_workspaces(db: asyncpg.Pool | asyncpg.Connection) -> list[Workspace]:
    rows = await db.fetch(f"SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE NOT operator "
                          "ORDER BY slug")
    return [Workspace(**dict(row)) for row in rows]


async def get_workspace(db: asyncpg.Pool | asyncpg.Connection, slug: str) -> Workspace:
    row = await db.fetchrow(f"SELECT {WORKSPACE_COLUMNS} FROM workspaces "
                            "WHERE slug = $1 AND NOT operator", slug.lower())
    if row is None:
        raise DirectoryError(f"no workspace {slug!r}")
    return Workspace(**dict(row))


async def add_agent(db: asyncpg.Pool | asyncpg.Connection, workspace_slug: str, handle: str, *,
                    display_name: str | None = None, system_prompt: str | None = None,
                    auto_reply: bool = True, reply_mode: ReplyMode | None = None) -> Agent:
    handle = handle.lower()
    mode = reply_mode or (ReplyMode.AUTO if auto_reply else ReplyMode.OFF)
    if not HANDLE.match(handle) or "+" in handle:
        raise DirectoryError(f"invalid agent handle {handle!r}: use a-z, 0-9, '.', '_' and '-'")
    workspace = await get_workspace(db, workspace_slug)
    try:
        await db.execute(
            """INSERT INTO agents (workspace_id, handle, display_name, system_prompt, auto_reply,
                                   reply_mode)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            workspace.id, handle, display_name, system_prompt, mode != ReplyMode.OFF, mode.value)
    except asyncpg.UniqueViolationError:
        raise DirectoryError(f"agent {handle!r} already exists in workspace {workspace.slug!r}") from None
    return await get_agent(db, workspace.slug, handle)


async def get_agent(db: asyncpg.Pool | asyncpg.Connection, workspace_slug: str, handle: str) -> Agent:
    row = await db.fetchrow(
        f"""SELECT {AGENT_COLUMNS} FROM agents a JOIN workspaces w ON w.id = a.workspace_id
            WHERE w.slug = $1 AND a.handle = $2""", workspace_slug.lower(), handle.lower())
    if row is None:
        raise DirectoryError(f"no agent {handle!r} in workspace {workspace_slug!r}")
    return Agent(**dict(row))


async def list_agents(db: asyncpg.Pool | asyncpg.Connection, workspace_slug: str | None = None) -> list[Agent]:
    rows = await db.fetch(
        f"""SELECT {AGENT_COLUMNS} FROM agents a JOIN workspaces w ON w.id = a.workspace_id
            WHERE $1::text IS NULL OR w.slug = $1 ORDER BY w.slug, a.handle""",
        workspace_slug.lower() if workspace_slug else None)
    return [Agent(**dict(row)) for row in rows]


async def set_agent_enabled(db: asyncpg.Pool | asyncpg.Connection, workspace_slug: str, handle: str,
                            enabled: bool) -> Agent:
    agent = await get_agent(db, workspace_slug, handle)
    await db.execute("UPDATE agents SET enabled = $1 WHERE id = $2", enabled, agent.id)
    return await get_agent(db, workspace_slug, handle)


UNSET = object()


async def update_agent(db: asyncpg.Pool | asyncpg.Connection, workspace_id: int, handle: str, *,
                       display_name: object = UNSET, system_prompt: object = UNSET,
                       reply_mode: ReplyMode | None = None,
                       enabled: bool | None = None) -> bool:
    """Change what is given (UNSET/None: keep); False if the workspace has no such agent.

    reply_mode 'off' also clears auto_reply, the switch the store reads when it
    decides whether an inbound message gets an agent job.
    """
    status = await db.execute(
        """UPDATE agents SET
               display_name = CASE WHEN $3 THEN $4 ELSE display_name END,
               system_prompt = CASE WHEN $5 THEN $6 ELSE system_prompt END,
               reply_mode = coalesce($7, reply_mode),
               auto_reply = coalesce($7, reply_mode) <> 'off',
               enabled = coalesce($8, enabled)
           WHERE workspace_id = $1 AND handle = $2""",
        workspace_id, handle.lower(), display_name is not UNSET,
        None if display_name is UNSET else display_name, system_prompt is not UNSET,
        None if system_prompt is UNSET else system_prompt,
        reply_mode.value if reply_mode else None, enabled)
    return status.endswith(" 1")


async def find_mailbox(db: asyncpg.Pool | asyncpg.Connection, workspace_slug: str, handle: str) -> Agent | None:
    """The enabled agent behind a mailbox, or None."""
    row = await db.fetchrow(
        f"""SELECT {AGENT_COLUMNS} FROM agents a JOIN workspaces w ON w.id = a.workspace_id
            WHERE w.slug = $1 AND a.handle = $2 AND a.enabled AND NOT w.operator""",
        workspace_slug, handle)
    return Agent(**dict(row)) if row else None
