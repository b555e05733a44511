"""Readiness follows clamd when scanning is required (and only reports it when not)."""

from __future__ import annotations

import asyncio

import aiohttp


async def ready(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.get(f"{url}/health/ready") as response:
        return response.status, await response.json()


async def test_readiness_flips_when_clamd_goes_away_and_back(start_server, db, clamd):
    required = start_server(**{"scan.clamd": clamd.unix_address, "scan.timeout": 5})
    optional = start_server(**{"scan.clamd": clamd.unix_address, "scan.required": False})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        status, body = await ready(session, required.http_url)
        assert status == 200 and body["checks"]["clamd"] == {"ok": True, "required": True,
                                                              "detail": ""}
        await asyncio.to_thread(clamd.stop)
        status, body = await ready(session, required.http_url)
        assert status == 503 and body["ready"] is False
        assert body["checks"]["clamd"]["ok"] is False
        assert body["checks"]["postgres"]["ok"] is True
        # not required: reported, but mail is still taken (stored 'unscanned')
        status, body = await ready(session, optional.http_url)
        assert status == 200 and body["checks"]["clamd"]["ok"] is False
        await asyncio.to_thread(clamd.start)
        status, body = await ready(session, required.http_url)
        assert status == 200, body
