"""Fixtures for outgoing webhooks: a receiver on loopback, a server that delivers to it
fast (short retries), admin keys of two workspaces, and an API client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest

from smtpd_agent.store import directory
from smtpd_agent.store.apikeys import Scope, create_key
from tests.hooks.receiver import Receiver
from tests.support import ServerThread

FAST = {"webhooks.allow_loopback": True, "webhooks.poll_interval": 0.2,
        "webhooks.retry_base": 1.0, "webhooks.timeout": 5.0, "webhooks.lease": 10.0}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    running = await Receiver().start()
    yield running
    await running.stop()


@dataclass
class Api:
    """The webhook routes of one workspace, with its admin key."""

    http: aiohttp.ClientSession
    base: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def call(self, method: str, path: str, body: Any = None,
                   expect: int | None = None) -> Any:
        async with self.http.request(method, f"{self.base}{path}", json=body,
                                     headers=self.headers) as response:
            data = await response.json() if response.status != 204 else None
            if expect is not None:
                assert response.status == expect, (response.status, data)
            return data

    async def create(self, url: str, **fields: Any) -> dict[str, Any]:
        created: dict[str, Any] = await self.call("POST", "/webhooks", {"url": url, **fields},
                                                  expect=201)
        return created

    async def deliveries(self, endpoint_id: int) -> list[dict[str, Any]]:
        page = await self.call("GET", f"/webhooks/{endpoint_id}/deliveries?limit=100",
                               expect=200)
        return list(page["deliveries"])

    async def settled(self, endpoint_id: int, count: int,
                      timeout: float = 20) -> list[dict[str, Any]]:
        """The endpoint's `count` deliveries once each is delivered or failed (the
        receiver sees a request before the worker records its answer), oldest first."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.deliveries(endpoint_id)
            if len(found) >= count and all(d["status"] in ("delivered", "failed")
                                           for d in found):
                return sorted(found, key=lambda d: d["id"])
            assert asyncio.get_running_loop().time() < deadline, found
            await asyncio.sleep(0.1)


@dataclass
class Hooks:
    server: ServerThread
    acme: Api
    globex: Api


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
def hooks_server(start_server: Callable[..., ServerThread], db: asyncpg.Connection,
                 http: aiohttp.ClientSession) -> Callable[..., Any]:
    """start(**overrides) -> Hooks: the server (FAST webhooks unless overridden), the
    workspaces acme (agent support) and globex (agent support), an admin key of each."""

    async def start(**overrides: Any) -> Hooks:
        server = start_server(**{**FAST, **overrides})
        for slug in ("acme", "globex"):
            await directory.add_workspace(db, slug)
            await directory.add_agent(db, slug, "support", auto_reply=False)
        apis = []
        for slug in ("acme", "globex"):
            key = (await create_key(db, slug, scopes=frozenset({Scope.ADMIN, Scope.READ}))).key
            apis.append(Api(http, f"{server.http_url}/api/v1/workspaces/{slug}", key))
        return Hooks(server, *apis)

    return start
