"""Fixtures for the HTTP surface: the running server with API keys, an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest

from smtpd_agent.store.apikeys import create_key
from tests.support import ServerThread


@dataclass
class Keys:
    acme: str
    globex: str


@pytest.fixture
async def keys(server: ServerThread, db: asyncpg.Connection) -> Keys:
    """An inbox API key for each of the two workspaces of the `server` fixture."""
    return Keys(acme=(await create_key(db, "acme")).key, globex=(await create_key(db, "globex")).key)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session
