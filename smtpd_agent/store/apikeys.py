"""Workspace API keys: created by `smtpd-agent apikey create` or an admin key, checked on
every API request, each with its scopes (read, send, admin).

A key is printed once and stored as its SHA-256 only; the HTTP layer hashes
the presented Bearer token and looks the hash up, so the database never holds
anything that grants access.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

from .directory import get_workspace

KEY_PREFIX = "sak_"


class Scope(StrEnum):
    """What a key may do: read the inbox, send as the workspace's agents, manage agents and keys."""

    READ = "read"
    SEND = "send"
    ADMIN = "admin"


def parse_scopes(values: list[str] | tuple[str, ...] | str) -> frozenset[Scope]:
    """Scopes from a list (or a comma-separated string); ValueError naming an unknown one."""
    items = values.split(",") if isinstance(values, str) else list(values)
    scopes = set()
    for item in items:
        name = item.strip().lower() if isinstance(item, str) else item
        try:
            scopes.add(Scope(name))
        except ValueError:
            raise ValueError(f"unknown scope {item!r}: use read, send, admin") from None
    if not scopes:
        raise ValueError("at least one scope is needed (read, send, admin)")
    return frozenset(scopes)


@dataclass(frozen=True)
class CreatedKey:
    id: int
    workspace_slug: str
    prefix: str
    key: str  # the secret itself: shown once, never stored
    scopes: frozenset[Scope] = frozenset({Scope.READ})


@dataclass(frozen=True)
class KeyOwner:
    """The workspace a presented key belongs to; every API query is scoped by it."""

    key_id: int
    workspace_id: int
    workspace_slug: str
    scopes: frozenset[Scope] = frozenset({Scope.READ})


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _sorted(scopes: frozenset[Scope]) -> list[str]:
    return [scope.value for scope in Scope if scope in scopes]


async def create_key(db: asyncpg.Pool | asyncpg.Connection, workspace_slug: str,
                     name: str | None = None,
                     scopes: frozenset[Scope] = frozenset({Scope.READ})) -> CreatedKey:
    workspace = await get_workspace(db, workspace_slug)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    prefix = key[:len(KEY_PREFIX) + 6]
    key_id = await db.fetchval(
        """INSERT INTO api_keys (workspace_id, prefix, key_hash, name, scopes)
           VALUES ($1, $2, $3, $4, $5) RETURNING id""",
        workspace.id, prefix, hash_key(key), name, _sorted(scopes))
    return CreatedKey(key_id, workspace.slug, prefix, key, scopes)


async def find_key(db: asyncpg.Pool | asyncpg.Connection, key: str) -> KeyOwner | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    # last_used_at is written at most once a minute per key, not on every request.
    row = await db.fetchrow(
        """WITH found AS (
               SELECT k.id, k.workspace_id, w.slug, k.scopes, k.last_used_at
               FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id
               WHERE k.key_hash = $1 AND k.revoked_at IS NULL),
           touched AS (
               UPDATE api_keys SET last_used_at = now()
               WHERE id IN (SELECT id FROM found WHERE last_used_at IS NULL
                                OR last_used_at < now() - interval '1 minute'))
           SELECT id, workspace_id, slug, scopes FROM found""", hash_key(key))
    if row is None:
        return None
    return KeyOwner(row["id"], row["workspace_id"], row["slug"],
                    frozenset(Scope(s) for s in row["scopes"]))


@dataclass(frozen=True)
class KeyInfo:
    id: int
    prefix: str
    name: str | None
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


async def list_keys(db: asyncpg.Pool | asyncpg.Connection, workspace_slug: str) -> list[KeyInfo]:
    workspace = await get_workspace(db, workspace_slug)
    rows = await db.fetch(
        """SELECT id, prefix, name, scopes, created_at, last_used_at, revoked_at FROM api_keys
           WHERE workspace_id = $1 ORDER BY id""", workspace.id)
    return [KeyInfo(**dict(r)) for r in rows]


async def revoke_key(db: asyncpg.Pool | asyncpg.Connection, workspace_slug: str,
                     key_id: int) -> bool:
    workspace = await get_workspace(db, workspace_slug)
    result = await db.execute(
        """UPDATE api_keys SET revoked_at = now()
           WHERE workspace_id = $1 AND id = $2 AND revoked_at IS NULL""", workspace.id, key_id)
    return result.endswith(" 1")
